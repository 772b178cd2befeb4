"""A tiny transformers causal LM sharded on the sequence over 4 torch ranks, against unsharded.

Run from the repository root::

    .venv/bin/python -m examples.transformers_lm

A 2-layer Llama (hidden 32, 4 query heads, 2 KV heads, vocabulary 64, seeded random weights:
nothing is downloaded) runs on 4 gloo ranks (a ``sp_common.testing.RankPool``) with
``attn_implementation="sp_attention"`` under ``apply_causal_lm_plan``, on a batch of 2 sequences
of 10 tokens (not divisible by 4, so the plan pads) whose second row is right-padded. Every rank
also runs the same weights unsharded with transformers' own ``sdpa`` attention. It prints the
largest difference of the logits and of the parameter gradients (after ``all_reduce_grads``)
and exits 1 when one exceeds ``TOL`` (relative to ``max(1, max|unsharded|)``, float32).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NamedTuple

import numpy as np

from examples.verdict import verdict, worst
from sp_common.attention.api import Strategy
from sp_common.testing import RankPool, to_numpy

WORLD = 4
BATCH, SEQ, VOCAB = 2, 10, 64
SEED = 0
TOL = 1e-5
CALL_TIMEOUT_S = 120.0


def tiny_model(family: str = "llama", implementation: str = "sp_attention", seed: int = 0) -> Any:
    """A 2-layer causal LM (``"llama"`` or ``"qwen3"``): hidden 32, 4 query heads, 2 KV heads
    (head size 8), vocabulary 64, float32, weights from ``torch.manual_seed(seed)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    sizes: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        attn_implementation=implementation,
    )
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes))
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**sizes))
    raise ValueError(f"tiny_model: family={family!r}; pass 'llama' or 'qwen3'.")


def lm_inputs(batch: int, seq: int, seed: int, padded_row: bool) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[B, S]`` (int64); with ``padded_row``
    the last 3 tokens of row 1 are padding (mask 0, label -100)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if padded_row:
        mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def forward_backward(model: Any, inputs: dict[str, Any], planned: bool) -> dict[str, np.ndarray]:
    """Logits ``[B, S, V]`` and parameter gradients of the CE loss plus a weighted sum of the
    logits (so every position's logits get a gradient), as numpy."""
    import torch

    from sp_common import all_reduce_grads

    out = model(**inputs)
    weights = torch.linspace(-1.0, 1.0, out.logits.numel()).reshape(out.logits.shape)
    (out.loss + 1e-2 * (out.logits * weights).sum()).backward()
    if planned:
        all_reduce_grads(model)  # per-rank terms -> the unsharded gradients
    result = {"logits": to_numpy(out.logits.detach())}
    for name, p in model.named_parameters():
        result[f"grad/{name}"] = to_numpy(p.grad)
    return result


class LMRun(NamedTuple):
    """One rank's results: the sharded model's and the unsharded model's."""

    sharded: dict[str, np.ndarray]
    unsharded: dict[str, np.ndarray]


def compare_on_rank(
    family: str, batch: int, seq: int, seed: int, padded_row: bool, layout: str, strategy: Strategy
) -> LMRun:
    """On every rank: the model under ``apply_causal_lm_plan`` (attention ``strategy``) and the
    same weights unsharded (``sdpa``), on the same full inputs."""
    import torch

    from sp_common.integrations.transformers import apply_causal_lm_plan, register_sp_attention
    from sp_common.layouts import check_layout

    inputs = {k: torch.from_numpy(v) for k, v in lm_inputs(batch, seq, seed, padded_row).items()}
    if not padded_row:
        del inputs["attention_mask"]
    implementation = register_sp_attention(f"sp_attention_{strategy}", strategy=strategy)
    model = tiny_model(family, implementation, seed)
    reference = tiny_model(family, "sdpa", seed)
    reference.load_state_dict(model.state_dict())
    with apply_causal_lm_plan(model, layout=check_layout("compare_on_rank", layout)):
        sharded = forward_backward(model, inputs, planned=True)
    return LMRun(sharded, forward_backward(reference, inputs, planned=False))


def max_differences(runs: list[LMRun]) -> dict[str, float]:
    """The largest ``|sharded - unsharded| / max(1, max|unsharded|)`` over ranks: of the logits,
    and of any parameter gradient."""
    return worst([(run.sharded, run.unsharded) for run in runs], "logits")


def compare(
    pool: RankPool,
    family: str = "llama",
    *,
    seq: int = SEQ,
    padded_row: bool = True,
    layout: str = "contiguous",
    strategy: Strategy = "ulysses",
) -> dict[str, float]:
    """Run the comparison on ``pool``'s ranks; the max differences (see :func:`max_differences`)."""
    return max_differences(
        pool.run(compare_on_rank, family, BATCH, seq, SEED, padded_row, layout, strategy)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=WORLD)
    parser.add_argument("--family", choices=("llama", "qwen3"), default="llama")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    parser.add_argument(
        "--strategy", choices=("ulysses", "allgather_kv", "ring", "auto"), default="ulysses"
    )
    args = parser.parse_args(argv)
    with RankPool(args.world_size, call_timeout_s=CALL_TIMEOUT_S) as pool:
        differences = compare(pool, args.family, layout=args.layout, strategy=args.strategy)
    title = (
        f"tiny {args.family} causal LM, B={BATCH} S={SEQ} (row 1 right-padded), "
        f"{args.world_size} ranks, layout={args.layout}, strategy={args.strategy}, sharded vs "
        "unsharded (sdpa):"
    )
    return verdict(title, differences, TOL)


if __name__ == "__main__":
    sys.exit(main())
