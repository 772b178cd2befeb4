"""Ring attention on JAX: a ``custom_vjp`` whose backward is the explicit ring of
``sp_common.attention.ring`` (nothing of the forward's blocks is kept for it), and the blocks'
key tiles in ``lax.scan`` (one tile of logits live at a time)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sp_common.attention import blocks
from sp_common.attention.blocks import merge, tile_forward, tile_grads
from sp_common.attention.ring import RingSpec, ring_backward, ring_forward


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(
    backend: Any,
    spec: RingSpec,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None,
) -> jax.Array:
    return ring_forward(backend, spec, q, k, v, key_mask)[0]


def _forward(
    backend: Any,
    spec: RingSpec,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None,
) -> tuple[jax.Array, tuple]:
    out, o5, lse = ring_forward(backend, spec, q, k, v, key_mask)
    return out, (q, k, v, key_mask, o5, lse)


def _backward(backend: Any, spec: RingSpec, saved: tuple, dout: jax.Array) -> tuple:
    q, k, v, key_mask, o5, lse = saved
    dq, dk, dv = ring_backward(backend, spec, q, k, v, key_mask, o5, lse, dout)
    return dq, dk, dv, None


_ring.defvjp(_forward, _backward)


def ring_attention(
    backend: Any,
    spec: RingSpec,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None,
) -> jax.Array:
    """See ``sp_common.backend.Backend.ring_attention``."""
    return _ring(backend, spec, q, k, v, key_mask)  # type: ignore[no-any-return]


def _tiles(
    k: jax.Array, v: jax.Array, allowed: jax.Array | None, sq: int
) -> tuple[int, jax.Array, jax.Array, jax.Array]:
    """The keys padded to whole tiles of ``KEY_BLOCK`` and stacked: ``[T, B, KEY_BLOCK, H, *]``,
    with the mask ``[T, B | 1, sq | 1, KEY_BLOCK]`` (padded keys never attended)."""
    sk = k.shape[1]
    count = -(-sk // blocks.KEY_BLOCK)
    pad = count * blocks.KEY_BLOCK - sk
    mask = jnp.ones((1, 1, sk), bool) if allowed is None else allowed
    k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k, v))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))

    def stack(t: jax.Array) -> jax.Array:
        return jnp.moveaxis(t.reshape(t.shape[0], count, blocks.KEY_BLOCK, *t.shape[2:]), 1, 0)

    masks = jnp.moveaxis(mask.reshape(*mask.shape[:2], count, blocks.KEY_BLOCK), 2, 0)
    return count, stack(k), stack(v), masks


def block_forward(
    backend: Any, q5: jax.Array, k: jax.Array, v: jax.Array, allowed: Any, scale: float
) -> tuple[jax.Array, jax.Array]:
    """``sp_common.attention.blocks.block_forward`` with the key tiles in a ``lax.scan``, so
    XLA holds one tile's logits at a time (a Python loop lets it keep them all)."""
    if k.shape[1] <= blocks.KEY_BLOCK:
        return tile_forward(backend, q5, k, v, allowed, scale)
    _, ks, vs, masks = _tiles(k, v, allowed, q5.shape[1])
    first = tile_forward(backend, q5, ks[0], vs[0], masks[0], scale)

    def step(acc: tuple, tile: tuple) -> tuple:
        kt, vt, mt = tile
        return merge(backend, acc, tile_forward(backend, q5, kt, vt, mt, scale)), None

    acc, _ = lax.scan(step, first, (ks[1:], vs[1:], masks[1:]))
    return acc  # type: ignore[no-any-return]


def block_grads(
    backend: Any,
    q5: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: Any,
    scale: float,
    lse: jax.Array,
    do5: jax.Array,
    delta: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``sp_common.attention.blocks.block_grads`` with the key tiles in a ``lax.scan``."""
    if k.shape[1] <= blocks.KEY_BLOCK:
        return tile_grads(backend, q5, k, v, allowed, scale, lse, do5, delta)
    sk = k.shape[1]
    _, ks, vs, masks = _tiles(k, v, allowed, q5.shape[1])
    dq, dk0, dv0 = tile_grads(backend, q5, ks[0], vs[0], masks[0], scale, lse, do5, delta)

    def step(dq: jax.Array, tile: tuple) -> tuple:
        kt, vt, mt = tile
        gq, gk, gv = tile_grads(backend, q5, kt, vt, mt, scale, lse, do5, delta)
        return dq + gq, (gk, gv)

    stacked: tuple[jax.Array, jax.Array]
    dq, stacked = lax.scan(step, dq, (ks[1:], vs[1:], masks[1:]))
    dks, dvs = stacked

    def unstack(first: jax.Array, rest: jax.Array) -> jax.Array:
        tiles = jnp.concatenate([first[None], rest])  # [T, B, KEY_BLOCK, H, *]
        whole = jnp.moveaxis(tiles, 0, 1).reshape(first.shape[0], -1, *first.shape[2:])
        return whole[:, :sk]

    return dq, unstack(dk0, dks), unstack(dv0, dvs)
