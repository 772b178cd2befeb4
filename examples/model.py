"""A small sequence-parallel transformer block, written once for PyTorch and JAX.

The block only touches tensors through a tiny framework-neutral :class:`Ops` shim (plus the
arithmetic operators and basic slicing, which ``torch.Tensor`` and ``jax.Array`` share) and
through ``sp_common``. The same Python function therefore runs

* on torch tensors, sharded over a ``torch.distributed`` process group,
* on JAX arrays, sharded over the ``"sp"`` axis inside ``jax.shard_map``,
* unsharded in either framework (no process group / outside ``shard_map``), where every
  ``sp_*`` op is the identity.

Sequence parallelism here is the simple all-gather-KV scheme: each rank keeps its own slice of
the sequence (queries, residual stream, MLP), and only keys and values are gathered for
attention. Neither framework is imported at module level; :func:`torch_ops` and :func:`jax_ops`
import their framework on request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sp_common import sp_gather, sp_shard_with_padding

Tensor = Any
"""A ``torch.Tensor`` or a ``jax.Array``; the block never needs to know which."""

SEQ_DIM = 1
"""Activations are laid out ``[batch, sequence, hidden]``."""


@dataclass(frozen=True)
class Ops:
    """The few framework functions the block needs, with numpy-style signatures."""

    name: str
    asarray: Callable[[np.ndarray], Tensor]
    matmul: Callable[[Tensor, Tensor], Tensor]
    mean: Callable[[Tensor, int], Tensor]  # keeps the reduced dim
    amax: Callable[[Tensor, int], Tensor]  # keeps the reduced dim
    sum: Callable[[Tensor, int], Tensor]  # keeps the reduced dim
    exp: Callable[[Tensor], Tensor]
    sqrt: Callable[[Tensor], Tensor]
    tanh: Callable[[Tensor], Tensor]
    reshape: Callable[[Tensor, tuple[int, ...]], Tensor]
    swapaxes: Callable[[Tensor, int, int], Tensor]


def torch_ops() -> Ops:
    """The :class:`Ops` shim over PyTorch (float32 tensors on the CPU)."""
    import torch

    return Ops(
        name="torch",
        asarray=lambda a: torch.from_numpy(np.ascontiguousarray(a)),
        matmul=torch.matmul,
        mean=lambda x, axis: torch.mean(x, dim=axis, keepdim=True),
        amax=lambda x, axis: torch.amax(x, dim=axis, keepdim=True),
        sum=lambda x, axis: torch.sum(x, dim=axis, keepdim=True),
        exp=torch.exp,
        sqrt=torch.sqrt,
        tanh=torch.tanh,
        reshape=lambda x, shape: x.reshape(shape),
        swapaxes=torch.swapaxes,
    )


def jax_ops() -> Ops:
    """The :class:`Ops` shim over ``jax.numpy``."""
    import jax.numpy as jnp

    return Ops(
        name="jax",
        asarray=jnp.asarray,
        matmul=jnp.matmul,
        mean=lambda x, axis: jnp.mean(x, axis=axis, keepdims=True),
        amax=lambda x, axis: jnp.max(x, axis=axis, keepdims=True),
        sum=lambda x, axis: jnp.sum(x, axis=axis, keepdims=True),
        exp=jnp.exp,
        sqrt=jnp.sqrt,
        tanh=jnp.tanh,
        reshape=jnp.reshape,
        swapaxes=jnp.swapaxes,
    )


def init_params(hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights of one block, as numpy arrays shared by both frameworks."""
    rng = np.random.default_rng(seed)

    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(np.float32)

    def vec(n: int, center: float) -> np.ndarray:
        return (center + 0.1 * rng.standard_normal(n)).astype(np.float32)

    return {
        "ln1_g": vec(hidden, 1.0),
        "ln1_b": vec(hidden, 0.0),
        "w_qkv": dense(hidden, 3 * hidden),
        "b_qkv": vec(3 * hidden, 0.0),
        "w_o": dense(hidden, hidden),
        "b_o": vec(hidden, 0.0),
        "ln2_g": vec(hidden, 1.0),
        "ln2_b": vec(hidden, 0.0),
        "w_1": dense(hidden, 4 * hidden),
        "b_1": vec(4 * hidden, 0.0),
        "w_2": dense(4 * hidden, hidden),
        "b_2": vec(hidden, 0.0),
    }


def layer_norm(ops: Ops, x: Tensor, gain: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (biased variance, as ``torch.nn.LayerNorm``)."""
    mu = ops.mean(x, -1)
    centered = x - mu
    var = ops.mean(centered * centered, -1)
    return centered / ops.sqrt(var + eps) * gain + bias


def gelu(ops: Ops, x: Tensor) -> Tensor:
    """GELU, tanh approximation."""
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(ops: Ops, x: Tensor, axis: int = -1) -> Tensor:
    """Numerically stable softmax along ``axis``."""
    e = ops.exp(x - ops.amax(x, axis))
    return e / ops.sum(e, axis)


def split_heads(ops: Ops, x: Tensor, heads: int) -> Tensor:
    """``[B, S, H] -> [B, heads, S, H / heads]``."""
    b, s, h = x.shape
    return ops.swapaxes(ops.reshape(x, (b, s, heads, h // heads)), 1, 2)


def merge_heads(ops: Ops, x: Tensor) -> Tensor:
    """``[B, heads, S, D] -> [B, S, heads * D]``."""
    b, heads, s, d = x.shape
    return ops.reshape(ops.swapaxes(x, 1, 2), (b, s, heads * d))


def transformer_block(ops: Ops, params: dict[str, Tensor], x: Tensor, heads: int) -> Tensor:
    """One pre-LN transformer block with full (non-causal) self-attention, sequence-parallel.

    Shapes: ``x`` is the full ``[B, S, H]`` input, the same on every rank; ``S`` need not be
    divisible by the SP world size N. Returns the full ``[B, S, H]`` output, the same on every
    rank. Weights in ``params`` are replicated tensors of ``x``'s framework.

    Data flow on each rank (s = ceil(S / N), the shard length)::

        x --sp_shard_with_padding--> x_s    [B, s, H]  this rank's tokens, zero-padded
        LN1, QKV projection of x_s                     per token: local
        K, V --sp_gather(pad_size)-->       [B, S, H]  every real token, padding dropped
        attention of local queries over all keys      [B, heads, s, S] scores
        out-projection, residual, LN2, MLP, residual   per token: local
        y_s --sp_gather(pad_size)--> y      [B, S, H]

    The K/V gathers use ``grad_rule="reduce_scatter"``: after them each rank computes different
    tokens' outputs, so in a backward pass each rank's K/V gradient is the sum over ranks. The
    final gather uses the default ``"slice"``: whatever follows it runs replicated.
    """
    p = params
    hidden = x.shape[-1]
    x_s, pad = sp_shard_with_padding(x, dim=SEQ_DIM)

    h = layer_norm(ops, x_s, p["ln1_g"], p["ln1_b"])
    qkv = ops.matmul(h, p["w_qkv"]) + p["b_qkv"]
    q = qkv[..., :hidden]
    k = sp_gather(qkv[..., hidden : 2 * hidden], SEQ_DIM, pad_size=pad, grad_rule="reduce_scatter")
    v = sp_gather(qkv[..., 2 * hidden :], SEQ_DIM, pad_size=pad, grad_rule="reduce_scatter")

    qh, kh, vh = (split_heads(ops, t, heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(hidden // heads)
    scores = ops.matmul(qh, ops.swapaxes(kh, -1, -2)) * scale  # [B, heads, s, S]
    attn = merge_heads(ops, ops.matmul(softmax(ops, scores), vh))
    x_s = x_s + ops.matmul(attn, p["w_o"]) + p["b_o"]

    h = layer_norm(ops, x_s, p["ln2_g"], p["ln2_b"])
    h = gelu(ops, ops.matmul(h, p["w_1"]) + p["b_1"])
    y_s = x_s + ops.matmul(h, p["w_2"]) + p["b_2"]

    return sp_gather(y_s, SEQ_DIM, pad_size=pad)


def shard_roundtrip(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_shard, x_gathered)``: this rank's padded shard of ``x`` and its gather back.

    Pure data movement (no arithmetic), so both frameworks must agree on it byte for byte, and
    ``x_gathered`` must equal ``x`` exactly.
    """
    x_shard, pad = sp_shard_with_padding(x, dim=SEQ_DIM)
    return x_shard, sp_gather(x_shard, SEQ_DIM, pad_size=pad)
