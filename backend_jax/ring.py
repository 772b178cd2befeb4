"""Ring attention's gradient on JAX: a ``custom_vjp`` whose backward is the explicit ring of
``sp_common.attention.ring`` (nothing of the forward's blocks is kept for it)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax

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
