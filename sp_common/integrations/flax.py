"""flax nnx (JAX): ``nnx.MultiHeadAttention`` through ``sp_attention``, and nnx models sharded on
the sequence through ``nnx.split`` / ``nnx.merge``.

Two pieces, used together or apart::

    import sp_common.integrations.flax as sp_flax

    attn = nnx.MultiHeadAttention(..., attention_fn=sp_flax.sp_attention_fn(causal=True))
    model = MyModel(...)                           # any nnx model built with that attention
    graphdef, params = nnx.split(model)            # or nnx.split(model, nnx.Param, ...)
    forward = jax.jit(sp_flax.apply_nnx_plan(mesh))  # forward(graphdef, params, x)
    with jax.set_mesh(mesh):
        y = forward(graphdef, params, x)           # x [B, S, F] -> y [B, S, F], replicated
        grads = jax.grad(lambda p: loss(forward(graphdef, p, x)))(params)  # == unsharded

:func:`sp_attention_fn` returns an ``attention_fn`` for ``nnx.MultiHeadAttention``: it runs
``sp_attention`` over this device's shard of the sequence. Causality is a global property of the
sharded sequence, so it is said by ``sp_attention_fn(causal=True)`` or the module call's
``is_causal=True``, never by a mask (``nnx.make_causal_mask`` of a shard masks the shard's local
positions, which is wrong for every device but the first: such masks raise). A key padding mask
broadcast over the queries (``[B, 1, 1, s]``, this device's keys) is honoured; a bias, attention
dropout, ``sow_weights=True`` and ``precision`` raise ``ValueError`` naming them.

:func:`apply_nnx_plan` is the plan recipe: ``(graphdef, state, x, *more_states) -> y`` in
``jax.shard_map`` over ``mesh`` (through ``sp_common.apply_plan``): the states enter replicated,
``x`` is sharded on the sequence (padded when the device count does not divide it) and the
model's output gathered. ``shard_map`` sums the per-device parameter-gradient terms (the
transpose of a replicated input), so ``jax.grad`` of the planned forward is the unsharded
gradient. The real length and the layout reach :func:`sp_attention_fn` through the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

try:
    import jax
    import jax.numpy as jnp
    from flax import nnx
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sp_common.integrations.flax needs jax and flax; install them with "
        "pip install 'sp-sharding[jax,integrations-flax]'."
    ) from e

from ..attention import sp_attention
from ..attention.api import Strategy
from ..layouts import Layout, check_layout
from ..plan import GatherOutput, PlanError, ShardInput, SPPlan, active_run, apply_plan

__all__ = ["SEQUENCE", "AttentionFn", "apply_nnx_plan", "nnx_plan", "sp_attention_fn"]

# The plan's name for the model's input sequence (what planned_seq_len reads).
SEQUENCE = "sequence"


class AttentionFn(Protocol):
    """What ``nnx.MultiHeadAttention`` calls as its ``attention_fn`` (flax 0.12)."""

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: nnx.Module | None = None,
        is_causal: bool = False,
    ) -> jax.Array: ...


def sp_attention_fn(
    *,
    causal: bool = False,
    seq_len: int | None = None,
    strategy: Strategy = "ulysses",
    layout: Layout | None = None,
    group: Any = None,
    name: str = SEQUENCE,
) -> AttentionFn:
    """An ``attention_fn`` for ``nnx.MultiHeadAttention`` that runs ``sp_attention`` over this
    device's shard of the sequence (inside ``jax.shard_map``; outside, world size 1: plain
    attention).

    Shapes (flax's layout, ``s`` = this device's tokens)::

        query [B, s, Hq, D], key [B, s, Hkv, D], value [B, s, Hkv, Dv] -> [B, s, Hq, Dv]

    Args:
        causal: causal attention over the global positions (also turned on per call by
            ``MultiHeadAttention(...)(x, is_causal=True)``).
        seq_len: the real length before padding; ``None``: the length the running plan
            sharded under ``name`` (:func:`apply_nnx_plan`), else the unpadded sequence.
        strategy: as ``sp_attention``'s (they differ only in cost).
        layout: ``None``: the layout the running plan sharded ``name`` in, else
            ``"contiguous"``; or name it (sequences sharded by hand).
        group: the SP axis (``None``: the active ``sp_group``, else ``"sp"``).
        name: the plan's name of the sequence (``ShardInput(..., name=...)``).

    Raises (from the returned function), ``ValueError`` naming the option: a ``bias``, a mask
    with a query dimension (``nnx.make_causal_mask``, a pairwise ``make_attention_mask``),
    attention dropout (``dropout_rate > 0`` and not ``deterministic``), ``sow_weights=True``
    (``module``), ``precision``, inputs that are not 4-d.
    """
    if layout is not None:
        check_layout("sp_attention_fn", layout)
    func = "sp_attention_fn (sp_common.integrations.flax)"

    def attention_fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: nnx.Module | None = None,
        is_causal: bool = False,
    ) -> jax.Array:
        _refuse(func, query, key, value, bias, dropout_rate, deterministic, precision, module)
        if dtype is not None:
            query, key, value = (jnp.asarray(t, dtype) for t in (query, key, value))
        run = active_run()
        planned_len = run.lengths.get(name) if run is not None else None
        planned_layout = run.layouts.get(name) if run is not None else None
        return sp_attention(
            query,
            key,
            value,
            strategy=strategy,
            causal=causal or bool(is_causal),
            seq_len=seq_len if seq_len is not None else planned_len,
            key_mask=None if mask is None else _key_mask(func, mask, key),
            group=group,
            layout=layout or planned_layout or "contiguous",
        )

    return attention_fn


def _refuse(
    func: str,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    dropout_rate: float,
    deterministic: bool,
    precision: Any,
    module: nnx.Module | None,
) -> None:
    """ValueError for what ``sp_attention`` does not compute, naming it and what to do."""
    if any(t.ndim != 4 for t in (query, key, value)):
        raise ValueError(
            f"{func}: query, key, value have shapes {query.shape}, {key.shape}, {value.shape}; "
            "expected 4-d [batch, seq, heads, head_dim] (fold extra batch dimensions into one)."
        )
    if bias is not None:
        raise ValueError(
            f"{func}: bias of shape {bias.shape}: an additive attention bias is not implemented "
            "by sequence-parallel attention; drop it, or run the model unsharded."
        )
    if dropout_rate > 0.0 and not deterministic:
        raise ValueError(
            f"{func}: dropout_rate={dropout_rate} with deterministic=False: attention dropout is "
            "not implemented; build the module with dropout_rate=0.0 or call it with "
            "deterministic=True."
        )
    if module is not None:
        raise ValueError(
            f"{func}: sow_weights=True: the [S, S] attention weights are never materialized, so "
            "they cannot be sowed; call the module with sow_weights=False."
        )
    if precision is not None:
        raise ValueError(
            f"{func}: precision={precision!r}: sp_attention accumulates at its own precision "
            "(float32 for float16/bfloat16 inputs); build the module with precision=None."
        )


def _key_mask(func: str, mask: jax.Array, key: jax.Array) -> jax.Array:
    """This device's key mask ``[B, s]`` (True = attend) from an nnx mask ``[B|1, 1, 1, s]``."""
    batch, keys = key.shape[0], key.shape[1]
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"{func}: mask of shape {mask.shape}: only a key padding mask [B, 1, 1, s] (this "
            f"device's {keys} keys, broadcast over heads and queries) is honoured. A mask over "
            "(query, key) pairs of a shard, such as nnx.make_causal_mask(x_shard), masks local "
            "positions, not global ones: say causal with sp_attention_fn(causal=True) or "
            "is_causal=True, and pass key padding as mask[:, None, None, :]."
        )
    if mask.shape[3] != keys:
        raise ValueError(
            f"{func}: mask of shape {mask.shape} for {keys} keys on this device: shard the key "
            "padding mask with the sequence (same dim, same padding, pad_value=False)."
        )
    return jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (batch, keys))


def nnx_forward(graphdef: nnx.GraphDef[Any], state: Any, x: jax.Array, *more_states: Any) -> Any:
    """``nnx.merge(graphdef, state, *more_states)(x)``: the pure function of an nnx model that
    :func:`apply_nnx_plan` plans.

    Raises:
        PlanError: the model changed its state during the call (batch statistics, RNG counts,
            a cache): the planned forward pass is pure and would drop the change.
    """
    model = nnx.merge(graphdef, state, *more_states)
    before = jax.tree_util.tree_leaves((state, *more_states))
    out = model(x)
    after = jax.tree_util.tree_leaves(nnx.state(model))
    if len(before) != len(after) or any(a is not b for a, b in zip(before, after, strict=True)):
        raise PlanError(
            "apply_nnx_plan: the model changed its state during the forward pass (batch "
            "statistics, an RNG stream's count, a decode cache); the planned forward pass "
            "returns only the output and would drop the change. Split off what changes "
            "(nnx.split(model, nnx.Param, ...)) and run it without (deterministic=True, "
            "use_running_average=True, dropout_rate=0.0, keep_rngs=False)."
        )
    return out


def nnx_plan(dim: int = 1, ndim: int | None = 3, layout: Layout = "contiguous") -> SPPlan:
    """The plan of :func:`nnx_forward`: ``x [B, S, F]`` sharded on ``dim`` (padded where the
    device count does not divide ``S``) under the name ``"sequence"``, the output ``[B, s, F]``
    gathered back on ``dim`` to ``[B, S, F]``."""
    shard = ShardInput("x", dim=dim, ndim=ndim, pad=True, name=SEQUENCE, layout=layout)
    return SPPlan({"": (shard, GatherOutput(dim=dim, ndim=ndim, name=SEQUENCE))})


def apply_nnx_plan(
    mesh: jax.sharding.Mesh, *, dim: int = 1, ndim: int | None = 3, layout: Layout = "contiguous"
) -> Callable[..., Any]:
    """``forward(graphdef, state, x, *more_states) -> y``: :func:`nnx_forward` in ``shard_map``
    over ``mesh`` (``sp_common.apply_plan`` of :func:`nnx_plan`).

    Shapes: ``x [B, S, F]`` (the full input, the same on every device) ``-> y [B, S, F]``
    (gathered, replicated). ``state`` and ``more_states`` (``nnx.split``'s states) enter
    replicated; ``jax.grad`` with respect to them gives the unsharded model's gradients (the
    per-device terms are summed by ``shard_map``). Wrap it in ``jax.jit``; differentiate inside
    ``jax.set_mesh(mesh)`` on jax 0.10's Explicit-axis meshes (``jax.make_mesh``).
    """
    check_layout("apply_nnx_plan", layout)
    return apply_plan(nnx_forward, nnx_plan(dim=dim, ndim=ndim, layout=layout), mesh=mesh)
