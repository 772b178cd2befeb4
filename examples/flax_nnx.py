"""A tiny flax nnx transformer sharded on the sequence over 4 JAX devices, against unsharded.

Run from the repository root::

    .venv/bin/python -m examples.flax_nnx

A 2-layer nnx transformer (``nnx.MultiHeadAttention`` with 2 heads and an MLP, hidden 16,
seeded ``nnx.Rngs``: nothing is downloaded) runs under ``apply_nnx_plan`` with
``attention_fn=sp_attention_fn(causal=...)`` on 4 CPU devices, on a batch of 2 sequences of 10
tokens (not divisible by 4, so the plan pads), causal and not. The same weights run unsharded
with nnx's own attention (``nnx.make_causal_mask`` for causal). It prints the largest
difference of the output and of the parameter gradients and exits 1 when one exceeds ``TOL``
(relative to ``max(1, max|unsharded|)``, float32).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from examples.verdict import relative
from sp_common.attention.api import Strategy
from sp_common.layouts import Layout

WORLD = 4
BATCH, SEQ, HIDDEN, HEADS = 2, 10, 16, 2
SEED = 0
TOL = 1e-5


def tiny_model(attention_fn: Callable[..., Any] | None = None, seed: int = SEED) -> Any:
    """A 2-layer nnx transformer: per layer LayerNorm, ``nnx.MultiHeadAttention`` (2 heads of
    8, ``attention_fn``; ``None``: nnx's own), residual, LayerNorm, MLP 16 -> 32 -> 16 (gelu),
    residual; float32, weights from ``nnx.Rngs(seed)`` (the same for every ``attention_fn``).
    Called as ``model(x, mask=None)``: ``x [B, S, 16] -> [B, S, 16]``."""
    import jax
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.norm1 = nnx.LayerNorm(HIDDEN, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                HEADS,
                HIDDEN,
                attention_fn=attention_fn or nnx.dot_product_attention,
                decode=False,
                keep_rngs=False,
                rngs=rngs,
            )
            self.norm2 = nnx.LayerNorm(HIDDEN, rngs=rngs)
            self.up = nnx.Linear(HIDDEN, 2 * HIDDEN, rngs=rngs)
            self.down = nnx.Linear(2 * HIDDEN, HIDDEN, rngs=rngs)

        def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
            x = x + self.attn(self.norm1(x), mask=mask)
            return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    class TinyTransformer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.layers = nnx.List([Block(rngs) for _ in range(2)])

        def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
            for layer in self.layers:
                x = layer(x, mask)
            return x

    return TinyTransformer(nnx.Rngs(seed))


def inputs(seq: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The input ``x [B, S, 16]`` and the output weights ``w [B, S, 16]`` of the loss
    ``sum(y * w)`` (every output element gets its own gradient), float32."""
    rng = np.random.default_rng(seed)
    x, w = (rng.standard_normal((BATCH, seq, HIDDEN)).astype(np.float32) for _ in range(2))
    return x, w


@functools.cache
def unsharded(seq: int, causal: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """The tiny model with nnx's own attention (``nnx.make_causal_mask`` when ``causal``) on
    ``inputs(seq)``: the output ``[B, S, 16]`` and the parameter gradients of ``sum(y * w)``
    (``jax.tree.leaves`` order), as numpy; cached, so cases of one length share it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    x, w = (jnp.asarray(a) for a in inputs(seq))
    graphdef, params = nnx.split(tiny_model())
    mask = nnx.make_causal_mask(x[..., 0]) if causal else None

    def loss(params: Any) -> tuple[jax.Array, jax.Array]:
        y = nnx.merge(graphdef, params)(x, mask)
        return (y * w).sum(), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(y), [np.asarray(g) for g in jax.tree.leaves(grads)]


def compare(
    n: int, seq: int, causal: bool, strategy: Strategy = "ulysses", layout: Layout = "contiguous"
) -> dict[str, float]:
    """The tiny model sharded on ``n`` devices (``apply_nnx_plan``, ``sp_attention_fn``) vs
    :func:`unsharded`: the largest relative difference of the output ``[B, S, 16]``
    (``"output"``) and over every parameter gradient of ``sum(y * w)`` (``"gradients"``). One
    ``jit`` gives the output and the gradients."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sp_common.integrations.flax as sp_flax
    from sp_common.testing.mesh import mesh_of

    x, w = (jnp.asarray(a) for a in inputs(seq))
    mesh = mesh_of(n)
    model = tiny_model(sp_flax.sp_attention_fn(causal=causal, strategy=strategy))
    graphdef, params = nnx.split(model)
    forward = sp_flax.apply_nnx_plan(mesh, layout=layout)

    def loss(params: Any) -> tuple[jax.Array, jax.Array]:
        y = forward(graphdef, params, x)
        return (y * w).sum(), y

    with jax.set_mesh(mesh):
        (_, got), got_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    want, want_grads = unsharded(seq, causal)
    grads = zip(jax.tree.leaves(got_grads), want_grads, strict=True)
    return {
        "output": relative(got, want),
        "gradients": max(relative(g, r) for g, r in grads),
    }


def main() -> int:
    worst = 0.0
    for causal in (False, True):
        diffs = compare(WORLD, SEQ, causal)
        print(
            f"flax nnx, {WORLD} devices, S={SEQ}, causal={causal}: max |sharded - unsharded| "
            f"output {diffs['output']:.2e}, parameter gradients {diffs['gradients']:.2e}"
        )
        worst = max(worst, *diffs.values())
    if worst > TOL:
        print(f"FAIL: {worst:.2e} exceeds the tolerance {TOL:.0e}")
        return 1
    print(f"ok: within {TOL:.0e} (relative to max(1, max|unsharded|))")
    return 0


if __name__ == "__main__":
    # Before JAX starts: WORLD virtual CPU devices.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={WORLD}"
    ).strip()
    sys.exit(main())
