"""The local attention kernel of the JAX backend: blockwise over the keys, online softmax.

``jax.nn.dot_product_attention`` takes its softmax in float32 (float64 inputs come out only
float32-accurate), has no float16 on the CPU under ``jit``, and holds the whole ``[Sq, Sk]``
logits. This kernel accumulates in float32 (half types, float32) or float64 (float64), walks the
keys in blocks of at most ``KEY_BLOCK`` with a running max and sum (the online softmax), so it
holds one ``[Sq, block]`` tile of logits at a time, and recomputes each tile in the backward
pass (``jax.checkpoint``) instead of keeping them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

KEY_BLOCK = 512


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    causal: bool,
    key_mask: jax.Array | None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
) -> jax.Array:
    """See ``sp_common.backend.Backend.attention``."""
    batch, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    if sk == 0:  # nothing to attend: every query gets zeros
        return jnp.zeros((batch, sq, hq, dv), q.dtype)
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    blocks = -(-sk // KEY_BLOCK)
    size = -(-sk // blocks)
    pad = blocks * size - sk
    masked = key_mask is not None or causal or pad > 0
    valid = jnp.ones((1, sk), bool) if key_mask is None else key_mask
    k_pos = jnp.arange(sk) if k_positions is None else k_positions
    if pad:
        k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
        k_pos = jnp.pad(k_pos, (0, pad))
    # Batched-matmul layout: the G query heads of a key/value head (h = kv * G + g) are stacked
    # as rows, [B, Hkv, G * Sq, D]; keys [B, Hkv, Sk, D], in blocks along Sk.
    rows = q.reshape(batch, sq, hkv, groups, d).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, hkv, groups * sq, d)
    kb = k.transpose(0, 2, 1, 3).reshape(batch, hkv, blocks, size, d).transpose(2, 0, 1, 3, 4)
    vb = v.transpose(0, 2, 1, 3).reshape(batch, hkv, blocks, size, dv).transpose(2, 0, 1, 3, 4)
    mb = valid.reshape(valid.shape[0], blocks, size).swapaxes(0, 1)
    pb = k_pos.reshape(blocks, size)
    q_pos = jnp.tile(jnp.arange(sq) if q_positions is None else q_positions, groups)

    def step(carry: tuple[jax.Array, ...], block: tuple[jax.Array, ...]) -> tuple:
        m, total, o = carry  # running max and sum [B, Hkv, G * Sq], output [.., G * Sq, Dv]
        kj, vj, mj, kp = block
        s = jnp.einsum("bhqd,bhkd->bhqk", rows, kj, preferred_element_type=acc) * scale
        if masked:
            allowed = mj[:, None, None, :]
            if causal:
                allowed = allowed & (kp[None, :] <= q_pos[:, None])
            s = jnp.where(allowed, s, -jnp.inf)
        # The result does not depend on the running max (it cancels), so the max is a constant
        # to differentiation, in every block alike; a row with no key so far keeps max -inf and
        # is shifted by 0 instead.
        m_new = lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - shift[..., None])
        rescale = jnp.exp(m - shift)
        total = total * rescale + p.sum(axis=-1)
        o = o * rescale[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p, vj.astype(acc))
        return (m_new, total, o), None

    init = (
        jnp.full((batch, hkv, groups * sq), -jnp.inf, acc),
        jnp.zeros((batch, hkv, groups * sq), acc),
        jnp.zeros((batch, hkv, groups * sq, dv), acc),
    )
    # The first block outside the scan: its carry has the types (and, under shard_map, the
    # device variance) of every later one.
    carry, _ = step(init, (kb[0], vb[0], mb[0], pb[0]))
    if blocks > 1:
        later = (kb[1:], vb[1:], mb[1:], pb[1:])
        carry, _ = lax.scan(jax.checkpoint(step), carry, later)
    _, total, o = carry
    out = jnp.where(total[..., None] > 0, o / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    # [B, Hkv, G * Sq, Dv] -> [B, Sq, Hq, Dv]
    out = out.reshape(batch, hkv, groups, sq, dv).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, sq, hq, dv).astype(q.dtype)
