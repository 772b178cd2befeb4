"""A small sequence-parallel transformer block, written once for PyTorch and JAX.

The math touches arrays only through the array API standard: the operators, basic slicing, and
the namespace that ``array_api_compat.array_namespace(x)`` returns (``array_api_compat.torch``
for torch tensors, ``jax.numpy`` for JAX arrays and tracers). Sequence parallelism comes from
``sp_common``. The same Python functions therefore run

* on torch tensors, sharded over a ``torch.distributed`` process group,
* on JAX arrays, sharded over the ``"sp"`` axis inside ``jax.shard_map``,
* unsharded in either framework (no process group / outside ``shard_map``), where every
  ``sp_*`` op is the identity.

The scheme is the simple all-gather-KV one: each rank keeps its own slice of the sequence
(queries, residual stream, MLP), and only keys and values are gathered for attention. The code
is split in two so that the math can be checked on any array API library:

* :func:`transformer_block` is the math on this rank's tokens. The one step that needs other
  ranks, the K/V gather, is passed in as ``gather_kv``; its default, :func:`no_gather`, is what
  ``sp_gather`` is at world size 1. It never calls ``sp_common``, so it also runs on
  ``array_api_strict`` arrays (which ``sp_common`` rightly refuses), where a call outside the
  standard fails.
* :func:`sp_transformer_block` is the sequence-parallel block: it shards the input with
  padding, hands :func:`transformer_block` an ``sp_gather`` that drops the padding, and gathers
  the output.

Neither framework is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from sp_common import sp_gather, sp_shard_with_padding

Tensor = Any
"""An array of any array API library (a ``torch.Tensor``, a ``jax.Array``, ...)."""

SEQ_DIM = 1
"""Activations are laid out ``[batch, sequence, hidden]``."""


def init_params(hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights of one block, as numpy arrays shared by every framework."""
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


def layer_norm(x: Tensor, gain: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim (biased variance, as ``torch.nn.LayerNorm``)."""
    xp = array_namespace(x)
    centered = x - xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean(centered * centered, axis=-1, keepdims=True)
    return centered / xp.sqrt(var + eps) * gain + bias


def gelu(x: Tensor) -> Tensor:
    """GELU, tanh approximation (``approximate="tanh"`` in torch, the default in JAX)."""
    xp = array_namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Numerically stable softmax along ``axis``."""
    xp = array_namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, S, H] -> [B, heads, S, H / heads]``."""
    xp = array_namespace(x)
    b, s, h = x.shape
    return xp.permute_dims(xp.reshape(x, (b, s, heads, h // heads)), (0, 2, 1, 3))


def merge_heads(x: Tensor) -> Tensor:
    """``[B, heads, S, D] -> [B, S, heads * D]``."""
    xp = array_namespace(x)
    b, heads, s, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, s, heads * d))


def no_gather(kv: Tensor) -> Tensor:
    """The K/V gather at world size 1: this rank already holds every token."""
    return kv


def transformer_block(
    params: dict[str, Tensor],
    x: Tensor,
    heads: int,
    gather_kv: Callable[[Tensor], Tensor] = no_gather,
) -> Tensor:
    """One pre-LN transformer block with full (non-causal) self-attention, on this rank's tokens.

    Shapes: ``x [B, s, H] -> [B, s, H]`` (``s`` tokens on this rank); ``gather_kv`` maps this
    rank's keys or values ``[B, s, H]`` to every real token's ``[B, S, H]``; the scores are
    ``[B, heads, s, S]``. ``params`` hold arrays of ``x``'s library (see :func:`init_params`).
    """
    p = params
    hidden = x.shape[-1]

    h = layer_norm(x, p["ln1_g"], p["ln1_b"])
    qkv = h @ p["w_qkv"] + p["b_qkv"]
    q = qkv[..., :hidden]
    k = gather_kv(qkv[..., hidden : 2 * hidden])
    v = gather_kv(qkv[..., 2 * hidden :])

    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(hidden // heads)
    scores = qh @ array_namespace(kh).permute_dims(kh, (0, 1, 3, 2)) * scale
    x = x + merge_heads(softmax(scores) @ vh) @ p["w_o"] + p["b_o"]

    h = gelu(layer_norm(x, p["ln2_g"], p["ln2_b"]) @ p["w_1"] + p["b_1"])
    return x + h @ p["w_2"] + p["b_2"]


def sp_transformer_block(params: dict[str, Tensor], x: Tensor, heads: int) -> Tensor:
    """:func:`transformer_block` over the whole sequence, sequence-parallel over the SP group.

    ``x`` (the full ``[B, S, H]``, the same on every rank) -> ``[B, S, H]`` (replicated) on torch
    tensors or JAX arrays. Data flow on each rank (``s = ceil(S / N)``, the shard length)::

        x --sp_shard_with_padding--> x_s    [B, s, H]  this rank's tokens, zero-padded
        transformer_block(x_s), in which
            K, V --sp_gather(pad_size)-->   [B, S, H]  every real token, padding dropped
        y_s --sp_gather(pad_size)--> y      [B, S, H]

    The K/V gathers use ``grad_rule="reduce_scatter"``: after them each rank computes different
    tokens' outputs, so in a backward pass each rank's K/V gradient is the sum over ranks. The
    final gather uses the default ``"slice"``: whatever follows it runs replicated.
    """
    x_s, pad = sp_shard_with_padding(x, dim=SEQ_DIM)

    def gather_kv(kv: Tensor) -> Tensor:
        return sp_gather(kv, SEQ_DIM, pad_size=pad, grad_rule="reduce_scatter")

    return sp_gather(transformer_block(params, x_s, heads, gather_kv), SEQ_DIM, pad_size=pad)


def shard_roundtrip(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_shard, x_gathered)``: this rank's padded shard of ``x`` and its gather back.

    Pure data movement (no arithmetic), so both frameworks must agree on it byte for byte, and
    ``x_gathered`` must equal ``x`` exactly.
    """
    x_shard, pad = sp_shard_with_padding(x, dim=SEQ_DIM)
    return x_shard, sp_gather(x_shard, SEQ_DIM, pad_size=pad)
