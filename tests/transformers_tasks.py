"""Torch rank tasks for ``test_integration_transformers.py``: tiny transformers causal LMs
(``examples.transformers_lm.tiny_model``: seeded random weights, no downloads) called in the ways
the integration must refuse, or sharded by hand. The sharded-vs-unsharded comparisons run
``examples.transformers_lm.compare_on_rank``."""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.transformers_lm import lm_inputs, tiny_model
from sp_common.testing import to_numpy


def _ids(seq: int = 8) -> Any:
    import torch

    return torch.from_numpy(lm_inputs(2, seq, 0, padded_row=False)["input_ids"])


def positions_missing_task(how: str) -> str:
    """A tiny Llama on a sharded sequence whose positions nobody sharded: ``how="by_hand"``
    shards input_ids with ``sp_shard`` and passes no position_ids; ``"tokens_only_plan"``
    applies ``causal_lm_plan`` alone (no input hook). Returns the error (every rank raises)."""
    from sp_common import apply_plan, sp_shard
    from sp_common.integrations.transformers import causal_lm_plan

    model = tiny_model("llama")
    try:
        if how == "by_hand":
            model(input_ids=sp_shard(_ids(), 1), use_cache=False)
        else:
            with apply_plan(model, causal_lm_plan(model)):
                model(input_ids=_ids(), use_cache=False)
    except ValueError as e:
        return str(e)
    return "no error"


def sharded_by_hand_task() -> tuple[np.ndarray, np.ndarray]:
    """Tokens and positions sharded by hand (no plan; S = 8 divides 2): the gathered logits,
    and the unsharded model's (sdpa)."""
    import torch

    from sp_common import sp_gather, sp_shard

    model = tiny_model("llama")
    reference = tiny_model("llama", "sdpa")
    positions = torch.arange(8)[None]
    out = model(input_ids=sp_shard(_ids(), 1), position_ids=sp_shard(positions, 1), use_cache=False)
    want = reference(input_ids=_ids(), use_cache=False).logits
    return to_numpy(sp_gather(out.logits.detach(), 1)), to_numpy(want.detach())


def refused_task(what: str) -> str:
    """Call a planned tiny model in a way the integration refuses; ``"<type>: <message>"``."""
    import torch

    from sp_common.integrations.transformers import apply_causal_lm_plan

    kwargs: dict[str, Any] = {}
    if what == "sliding_window":
        model = tiny_model("qwen3")
        model.config.use_sliding_window = True
        model.config.sliding_window = 4
        model.config.layer_types = ["sliding_attention"] * 2
        model = type(model)(model.config)
    else:
        model = tiny_model("llama")
    if what == "4d_mask":
        kwargs["attention_mask"] = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    elif what == "use_cache":
        kwargs["use_cache"] = True
    elif what == "packed_positions":
        kwargs["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    elif what == "dropout":
        model.config.attention_dropout = 0.1
        model = type(model)(model.config).train()
    try:
        with apply_causal_lm_plan(model):
            model(input_ids=_ids(), **kwargs)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def unregistered_implementation_task() -> str:
    """``apply_causal_lm_plan`` on a model built with ``sdpa``: the error."""
    from sp_common.integrations.transformers import apply_causal_lm_plan

    try:
        apply_causal_lm_plan(tiny_model("llama", "sdpa"))
    except ValueError as e:
        return str(e)
    return "no error"
