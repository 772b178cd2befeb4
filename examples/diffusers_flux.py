"""A tiny diffusers Flux transformer sharded on both token streams over 2 torch ranks, against
unsharded.

Run from the repository root::

    .venv/bin/python -m examples.diffusers_flux

A ``FluxTransformer2DModel`` (1 double-stream and 1 single-stream block, 2 heads of size 8,
seeded random weights: nothing is downloaded) runs on 2 gloo ranks (a
``sp_common.testing.RankPool``) under ``apply_flux_plan``, on 9 image tokens and 5 text tokens
(neither divisible by 2, so each stream is padded on its own and attention masks both paddings).
Every rank also runs the same weights unsharded with diffusers' own processors. It prints the
largest difference of the output and of the parameter gradients (after ``all_reduce_grads``)
and exits 1 when one exceeds ``TOL`` (relative to ``max(1, max|unsharded|)``, float32).
``tiny_dit`` and :func:`compare` serve the DiT too (``tests/test_integration_diffusers.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from examples.verdict import verdict, worst
from sp_common.attention.api import Strategy
from sp_common.testing import RankPool, to_numpy

WORLD = 2
BATCH = 2
IMAGE_TOKENS, TEXT_TOKENS = 9, 5
SEED = 0
TOL = 1e-5
CALL_TIMEOUT_S = 120.0


def tiny_flux(seed: int = 0) -> Any:
    """A ``FluxTransformer2DModel``: 1 double- and 1 single-stream block, 2 heads of size 8,
    4 latent channels, text features 16, rope axes (2, 2, 4); float32, ``torch.manual_seed``."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_dit(seed: int = 0) -> Any:
    """A ``DiTTransformer2DModel``: 2 layers, 2 heads of size 8, patch 2, 4 latent channels,
    10 classes; float32, ``torch.manual_seed``."""
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )


def flux_inputs(image: int, text: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Flux's inputs: latent tokens ``[B, image, 4]``, text ``[B, text, 16]``, pooled ``[B, 16]``,
    timestep ``[B]``, ``img_ids [image, 3]`` (distinct grid positions), ``txt_ids [text, 3]``."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(image)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    img_ids = np.concatenate([np.zeros((side * side, 1)), grid.reshape(-1, 2)], 1)[:image]
    f32 = np.float32
    return {
        "hidden_states": rng.standard_normal((BATCH, image, 4)).astype(f32),
        "encoder_hidden_states": rng.standard_normal((BATCH, text, 16)).astype(f32),
        "pooled_projections": rng.standard_normal((BATCH, 16)).astype(f32),
        "timestep": np.array([0.3, 0.8], dtype=f32),
        "img_ids": img_ids.astype(f32),
        "txt_ids": np.zeros((text, 3), dtype=f32),
    }


def dit_inputs(side: int, seed: int = 1) -> dict[str, np.ndarray]:
    """DiT's inputs: a latent ``[B, 4, side, side]`` (``(side/2)**2`` tokens), timestep and
    class labels ``[B]``."""
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((BATCH, 4, side, side)).astype(np.float32),
        "timestep": np.array([3, 7], dtype=np.int64),
        "class_labels": np.array([1, 4], dtype=np.int64),
    }


def forward_backward(model: Any, inputs: dict[str, Any], planned: bool) -> dict[str, np.ndarray]:
    """The output ``sample`` and the parameter gradients of a weighted sum of it, as numpy."""
    import torch

    from sp_common import all_reduce_grads

    out = model(**inputs).sample
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    if planned:
        all_reduce_grads(model)  # per-rank terms -> the unsharded gradients
    result = {"output": to_numpy(out.detach())}
    for name, p in model.named_parameters():
        if p.grad is not None:
            result[f"grad/{name}"] = to_numpy(p.grad)
    return result


class DiffusionRun(NamedTuple):
    """One rank's results: the sharded model's and the unsharded model's."""

    sharded: dict[str, np.ndarray]
    unsharded: dict[str, np.ndarray]


def compare_on_rank(model_name: str, tokens: tuple[int, ...], strategy: Strategy) -> DiffusionRun:
    """On every rank: the model (``"flux"``: ``tokens = (image, text)``; ``"dit"``: ``(side,)``)
    under its plan (attention ``strategy``) and the same weights unsharded."""
    import torch

    from sp_common.integrations import diffusers as sp_diffusers

    apply: Callable[..., Any]
    if model_name == "flux":
        model, reference, apply = tiny_flux(SEED), tiny_flux(SEED), sp_diffusers.apply_flux_plan
        arrays = flux_inputs(*tokens)
    else:
        model, reference, apply = tiny_dit(SEED), tiny_dit(SEED), sp_diffusers.apply_dit_plan
        arrays = dit_inputs(*tokens)
    reference.load_state_dict(model.state_dict())
    inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
    with apply(model, strategy=strategy):
        sharded = forward_backward(model, inputs, planned=True)
    return DiffusionRun(sharded, forward_backward(reference, inputs, planned=False))


def max_differences(runs: list[DiffusionRun]) -> dict[str, float]:
    """The largest ``|sharded - unsharded| / max(1, max|unsharded|)`` over ranks: of the output,
    and of any parameter gradient (a gradient only one side has counts as infinite)."""
    return worst([(run.sharded, run.unsharded) for run in runs], "output")


def compare(
    pool: RankPool,
    model_name: str = "flux",
    tokens: tuple[int, ...] = (IMAGE_TOKENS, TEXT_TOKENS),
    strategy: Strategy = "ulysses",
) -> dict[str, float]:
    """Run the comparison on ``pool``'s ranks; the max differences (see :func:`max_differences`)."""
    return max_differences(pool.run(compare_on_rank, model_name, tokens, strategy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=WORLD)
    parser.add_argument(
        "--strategy", choices=("ulysses", "allgather_kv", "ring", "auto"), default="ulysses"
    )
    args = parser.parse_args(argv)
    with RankPool(args.world_size, call_timeout_s=CALL_TIMEOUT_S) as pool:
        differences = compare(pool, strategy=args.strategy)
    title = (
        f"tiny Flux transformer, B={BATCH}, {IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens, "
        f"{args.world_size} ranks, strategy={args.strategy}, sharded vs unsharded:"
    )
    return verdict(title, differences, TOL)


if __name__ == "__main__":
    sys.exit(main())
