"""Torch rank tasks for ``test_integration_diffusers.py``: the tiny Flux and DiT transformers of
``examples.diffusers_flux`` (seeded random weights, no downloads) against diffusers' own
context-parallel Ulysses, called in the ways the integration must refuse, and with the plan
removed again. The sharded-vs-unsharded comparisons run
``examples.diffusers_flux.compare_on_rank``."""

from __future__ import annotations

from typing import Any

import numpy as np

from examples.diffusers_flux import flux_inputs, tiny_dit, tiny_flux
from sp_common.testing import to_numpy


def _flux_inputs(image: int = 8, text: int = 4) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(v) for k, v in flux_inputs(image, text).items()}


def _diffusers_ulysses(model: Any) -> None:
    """diffusers' own context parallelism (Ulysses over the 2 ranks) on ``model``: the steps of
    ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))``, which on a
    machine without an accelerator stops at ``rank % torch.accelerator.device_count()``
    (ZeroDivisionError); its mesh is built on the CPU instead."""
    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    cp = ContextParallelConfig(ulysses_degree=dist.get_world_size())
    config = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        if hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = config
    apply_context_parallel(model, cp, model._cp_plan)


def against_diffusers_ulysses_task() -> tuple[np.ndarray, np.ndarray]:
    """Flux on 8 image + 4 text tokens (diffusers' Ulysses needs lengths 2 divides): the output
    under ``apply_flux_plan`` and under diffusers' own context-parallel Ulysses."""
    import torch

    from sp_common.integrations.diffusers import apply_flux_plan

    ours, theirs = tiny_flux(), tiny_flux()
    with torch.no_grad(), apply_flux_plan(ours):
        got = ours(**_flux_inputs()).sample
    _diffusers_ulysses(theirs)
    with torch.no_grad():
        want = theirs(**_flux_inputs(), return_dict=False)[0]
    return to_numpy(got), to_numpy(want)


def refused_task(what: str) -> str:
    """Call a tiny model in a way the integration refuses; ``"<type>: <message>"``."""
    import torch

    from sp_common import sp_shard
    from sp_common.integrations import diffusers as sp_diffusers

    model = tiny_flux()
    inputs = _flux_inputs(7, 3)
    try:
        if what == "attention_mask":
            mask = torch.ones(2, 10, dtype=torch.bool)
            with sp_diffusers.apply_flux_plan(model):
                model(**inputs, joint_attention_kwargs={"attention_mask": mask})
        elif what == "outside_plan":
            sp_diffusers.set_sp_attention(model)
            even = _flux_inputs(8, 4)
            for name, dim in (("hidden_states", 1), ("encoder_hidden_states", 1)):
                even[name] = sp_shard(even[name], dim)
            for name in ("img_ids", "txt_ids"):
                even[name] = sp_shard(even[name], 0)
            model(**even)
        elif what == "other_processor":
            from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

            block = model.transformer_blocks[0].attn
            block.set_processor(FluxIPAdapterAttnProcessor(16, 16))
            sp_diffusers.apply_flux_plan(model)
        elif what == "wrong_model":
            sp_diffusers.apply_flux_plan(tiny_dit())
        elif what == "3d_ids":
            inputs["img_ids"] = inputs["img_ids"][None]
            with sp_diffusers.apply_flux_plan(model):
                model(**inputs)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def removed_plan_task() -> dict[str, Any]:
    """After ``apply_flux_plan(...).remove()`` the model has its own processors again and runs
    unsharded: the processor classes, and whether its output equals a fresh model's bit for
    bit."""
    import torch

    from sp_common.integrations.diffusers import apply_flux_plan

    model, fresh = tiny_flux(), tiny_flux()
    before = sorted({type(p).__name__ for p in model.attn_processors.values()})
    with apply_flux_plan(model):
        during = sorted({type(p).__name__ for p in model.attn_processors.values()})
    after = sorted({type(p).__name__ for p in model.attn_processors.values()})
    with torch.no_grad():
        equal = torch.equal(model(**_flux_inputs()).sample, fresh(**_flux_inputs()).sample)
    return {"before": before, "during": during, "after": after, "equal": equal}
