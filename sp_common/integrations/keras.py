"""Keras 3 (``KERAS_BACKEND=torch`` or ``jax``): multi-head attention over a sequence sharded
across the SP ranks, and the layers that shard and gather the sequence inside a Keras model.

One model definition runs on both backends::

    import sp_common.integrations.keras as sp_keras

    x = keras.Input((None, 16))
    h = sp_keras.SPShard()(x)                                    # [B, S, F] -> [B, s, F]
    a = sp_keras.SPMultiHeadAttention(num_heads=2, key_dim=8)(h, h, use_causal_mask=True)
    h = keras.layers.LayerNormalization()(h + a)
    y = sp_keras.SPGather()(h)                                   # [B, s, F] -> [B, S, F]
    model = keras.Model(x, keras.layers.Dense(4)(y))

- **torch** (one process per SP rank, ``torchrun`` or ``init_process_group``): every rank is
  given the same batch; ``model(x)`` is the unsharded model's output on every rank. For
  training, call ``sync_gradients(model)`` once after building the model: the gradients are
  then averaged over the SP ranks at the end of each ``backward()``, so ``model.fit`` (or any
  loop) gives every rank the unsharded model's gradients and the weights never diverge.
- **JAX** (one process, a device mesh): run the model inside ``jax.shard_map`` through
  ``jax_forward(model, mesh)``, a pure ``(trainable, non_trainable, x) -> y`` of
  ``model.stateless_call``; ``jax.grad`` of it is the unsharded model's gradient (``shard_map``
  sums the devices' terms). ``model.fit`` and ``model(x)`` bind no mesh axis: there the SP
  layers raise instead of silently running unsharded.

The real length of a sequence that the SP world size does not divide is recorded by
:class:`SPShard` (which pads) and read by :class:`SPMultiHeadAttention` (padded keys never take
part) and :class:`SPGather` (which drops the padding), for the one model call that ran it; a
sequence sharded by hand passes its real length per call, ``attention(h, h, seq_len=S)``.
Cross-attention names the keys' sequence (``SPMultiHeadAttention(..., sequence="ctx")``). In a
functional model, Keras layers that combine tokens between ``SPShard`` and ``SPGather``
(attention that is not sequence-parallel, convolutions, pooling, ...) raise, naming them.

Gradients on torch follow one convention: every replicated tensor's cotangent is the whole
gradient on every rank, and every sharded tensor's is ``N`` times its rank's part
(:class:`SPGather` scales the cotangent of its shard by ``N``, :class:`SPShard` divides the
gathered one by ``N``). Parameters used on the replicated side then hold the whole gradient and
those used on the sharded side ``N`` times their rank's term, so the mean over the ranks
(:func:`sync_gradients`) is the unsharded gradient for both. On JAX, ``shard_map`` does this
itself and the layers use the plain rules.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import keras  # type: ignore[import-untyped]
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sp_common.integrations.keras needs Keras 3 with the torch or jax backend; install it "
        "with pip install 'sp-sharding[integrations-keras]' (and torch or jax)."
    ) from e

from ..api import sp_gather, sp_shard_with_padding, sp_world_size
from ..attention import sp_attention
from ..attention.api import Strategy
from ..layouts import Layout, check_layout
from ..plan import PlanError
from ..strict import sp_strict

BACKEND: str = keras.backend.backend()
if BACKEND not in ("torch", "jax"):
    raise ImportError(
        f"sp_common.integrations.keras: Keras runs on the {BACKEND!r} backend; sequence "
        "parallelism runs on torch or jax: set KERAS_BACKEND=torch or KERAS_BACKEND=jax before "
        "keras is first imported."
    )

__all__ = [
    "BACKEND",
    "SEQUENCE",
    "SPGather",
    "SPMultiHeadAttention",
    "SPShard",
    "jax_forward",
    "sync_gradients",
]

# The default name of the sequence that SPShard records and the other layers read.
SEQUENCE = "sequence"
_PACKAGE = "sp_common"


@dataclass(frozen=True)
class _Sharded:
    """What :class:`SPShard` recorded of one sequence in the running forward pass."""

    length: int  # the real length S
    pad: int  # padding added at the end, so that N divides S + pad
    local: int  # this rank's tokens, (S + pad) / N
    layout: Layout


class _State(threading.local):
    def __init__(self) -> None:
        self.owner: object | None = None  # the model call the records belong to
        self.sharded: dict[str, _Sharded] = {}


_STATE = _State()


def _current_call() -> object | None:
    """The model call running now: the ``StatelessScope`` of a ``stateless_call`` (what
    :func:`jax_forward` runs), else Keras's call context, which a layer call opens and the
    layers it calls share (Keras 3 has no public query for either)."""
    from keras.src.backend.common import global_state  # type: ignore[import-untyped]
    from keras.src.backend.common.stateless_scope import get_stateless_scope  # type: ignore[import-untyped]

    scope = get_stateless_scope()
    return scope if scope is not None else global_state.get_global_attribute("current_call_ctx")


def _records() -> dict[str, _Sharded]:
    """The records of the model call running now. A record lives for one model call: a later
    call (after a forward pass that failed, or whose sequence was never gathered) sees none."""
    owner = _current_call()
    if owner is None or _STATE.owner is not owner:
        _STATE.owner, _STATE.sharded = owner, {}
    return _STATE.sharded


def _mixes_tokens(layer: Any, training: bool) -> bool:
    """Whether a Keras layer combines tokens along the sequence (so on a shard it would see only
    this rank's): attention that is not sequence-parallel, convolutions, pooling, recurrent
    layers, reshapes, and normalizations over the sequence (BatchNormalization in training:
    its statistics would be the shard's)."""
    L = keras.layers
    mixing: tuple[type, ...] = (
        L.MultiHeadAttention, L.Attention, L.AdditiveAttention, L.GroupQueryAttention,
        L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.SeparableConv1D, L.DepthwiseConv1D,
        L.MaxPooling1D, L.AveragePooling1D, L.GlobalMaxPooling1D, L.GlobalAveragePooling1D,
        L.RNN, L.LSTM, L.GRU, L.SimpleRNN, L.Bidirectional, L.GroupNormalization,
        L.Flatten, L.Reshape, L.Permute, L.Cropping1D, L.ZeroPadding1D, L.UpSampling1D,
    )  # fmt: skip
    if isinstance(layer, SPMultiHeadAttention):
        return False
    return isinstance(layer, mixing) or (training and isinstance(layer, L.BatchNormalization))


def _check_region(shard: Any, training: bool) -> None:
    """Raise ValueError naming the layers of a functional model that mix tokens between
    ``shard`` (an :class:`SPShard`) and the :class:`SPGather` of its sequence."""
    found, seen, todo = [], set(), list(shard._outbound_nodes)
    while todo:
        op = todo.pop().operation
        if id(op) in seen or isinstance(op, SPGather):
            continue
        seen.add(id(op))
        inner = op._flatten_layers() if isinstance(op, keras.layers.Layer) else [op]
        found += [f"{x.name!r} ({type(x).__name__})" for x in inner if _mixes_tokens(x, training)]
        todo += op._outbound_nodes
    if found:
        raise ValueError(
            f"SPShard (sp_common.integrations.keras): {', '.join(sorted(set(found)))} between "
            f"SPShard and SPGather combine tokens along the sequence, so on a shard they would "
            "see only this rank's tokens and silently differ from the unsharded model. Move them "
            "before SPShard or after SPGather, or use their sequence-parallel form "
            "(SPMultiHeadAttention for attention)."
        )


def _bound_error(layer: str, error: ValueError) -> ValueError:
    where = (
        " On JAX run the model inside jax.shard_map, e.g. "
        "sp_common.integrations.keras.jax_forward(model, mesh): model.fit, model.predict and "
        "model(x) bind no mesh axis. On torch call dist.init_process_group first. strict=False "
        "runs the layer unsharded at world size 1."
        if "strict mode is on" in str(error)
        else f" Name the SP axis or group with {layer}(..., group=...)."
    )
    return ValueError(f"{layer} (sp_common.integrations.keras): {error}{where}")


def _axis(layer: str, axis: int, ndim: int) -> int:
    """``axis`` as a positive dimension of an ``ndim``-d input; the batch dimension 0 and the
    feature dimension ``ndim - 1`` are not sequence dimensions."""
    positive = axis + ndim if axis < 0 else axis
    if not 1 <= positive <= ndim - 2:
        raise ValueError(
            f"{layer}: axis={axis} for a {ndim}-d input; the sequence axis lies between the "
            f"batch axis 0 and the feature axis {ndim - 1} (axis=1 for [batch, seq, features])."
        )
    return positive


def _scale_grad(x: Any, multiply: int, divide: int) -> Any:
    """torch: ``x`` itself, whose cotangent is multiplied by ``multiply / divide``; JAX: ``x``."""
    if BACKEND != "torch":
        return x
    from . import _keras_torch

    return _keras_torch.scale_grad(x, multiply, divide)


class _SequenceLayer(keras.layers.Layer):
    """What :class:`SPShard` and :class:`SPGather` share: the sequence axis, the record's name,
    strict mode, the world size, and a shape and mask whose sequence length is unknown while a
    functional model is built (it depends on the world size)."""

    def __init__(
        self, axis: int, sequence: str, strict: bool, group: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.axis, self.sequence, self.strict, self.group = axis, sequence, strict, group
        self.supports_masking = True

    def _dim(self, ndim: int) -> int:
        return _axis(type(self).__name__, self.axis, ndim)

    def _world_size(self, inputs: Any) -> int:
        try:
            with sp_strict(self.strict):
                return sp_world_size(inputs, group=self.group)
        except ValueError as e:  # nothing bound, or not the axis named
            raise _bound_error(type(self).__name__, e) from None

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
        if previous_mask is None:
            return None
        if keras.backend.is_keras_tensor(previous_mask):  # building a functional model
            shape = self.compute_output_shape((*previous_mask.shape, 1))[:-1]
            return keras.KerasTensor(shape, dtype=previous_mask.dtype)
        return self._mask(self._dim(len(inputs.shape)), previous_mask)

    def _mask(self, dim: int, mask: Any) -> Any:
        """This layer's Keras mask of the output, from the input's (sequence dim ``dim``)."""
        raise NotImplementedError

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        dim = self._dim(len(input_shape))
        return tuple(None if i == dim else d for i, d in enumerate(input_shape))

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(axis=self.axis, sequence=self.sequence, strict=self.strict)
        return config | _group_config(self.group)


def _group_config(group: Any) -> dict[str, Any]:
    """A group in a layer's config: a JAX mesh axis name (a torch process group is not
    serializable: a loaded layer uses the default group, or the active ``sp_group``)."""
    if isinstance(group, str) or (
        isinstance(group, tuple) and all(isinstance(a, str) for a in group)
    ):
        return {"group": group}
    return {}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SPShard(_SequenceLayer):
    """This rank's shard of the sequence: ``[B, S, ...] -> [B, ceil(S / N), ...]`` along
    ``axis``, padded at the end where N does not divide S (the real length is recorded under
    ``sequence`` for the attention and :class:`SPGather`). Every rank passes the same full
    input. A Keras mask of the input (``Embedding(mask_zero=True)``) is sharded with it
    (padding masked out).

    Args:
        axis: the sequence axis (default 1: ``[batch, seq, features]``).
        layout: ``"contiguous"`` or ``"zigzag"`` (``sp_common.layouts``; zigzag balances causal
            attention); the attention and :class:`SPGather` read it from the record.
        sequence: the name of the record (two sequences sharded at once need two names).
        strict: raise where no SP group is bound (JAX outside ``shard_map``, torch without a
            process group) instead of running at world size 1.
        group: the SP group (a JAX mesh axis name, a torch process group or 2-D DeviceMesh;
            default: the active ``sp_group``, else ``"sp"`` / the default group).
        check_replicated: torch: check that every rank was given the same input (one
            all-reduce of two numbers per call; different batches per rank would train
            silently wrong). JAX: ``jax_forward`` replicates the input itself.

    The record lives for one model call (``model(x)``, ``model.fit``'s step, ``jax_forward``):
    a later call never reads it.

    Raises (when called): ``ValueError`` where no group is bound and ``strict``, where the
    ranks were given different inputs, where a functional model has a layer that combines
    tokens (attention that is not ``SPMultiHeadAttention``, convolution, pooling, a recurrent
    layer, a reshape, ``BatchNormalization`` in training) between this layer and its
    ``SPGather``, or for an ``axis`` that is the batch or the feature axis.
    """

    def __init__(
        self,
        axis: int = 1,
        *,
        layout: Layout = "contiguous",
        sequence: str = SEQUENCE,
        strict: bool = True,
        group: Any = None,
        check_replicated: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(axis, sequence, strict, group, **kwargs)
        self.layout = check_layout("SPShard", layout)
        self.check_replicated = check_replicated
        self._region_checked: set[bool] = set()

    def call(self, inputs: Any, training: Any = None) -> Any:
        dim = self._dim(len(inputs.shape))
        n = self._world_size(inputs)
        if bool(training) not in self._region_checked:  # once per layer and mode
            _check_region(self, bool(training))
            self._region_checked.add(bool(training))
        if BACKEND == "torch" and n > 1 and self.check_replicated:
            from . import _keras_torch

            _keras_torch.check_replicated("SPShard", inputs, self.group)
        out, pad = sp_shard_with_padding(
            _scale_grad(inputs, 1, n), dim, layout=self.layout, group=self.group
        )
        length = int(inputs.shape[dim])
        _records()[self.sequence] = _Sharded(length, pad, (length + pad) // n, self.layout)
        return out

    def _mask(self, dim: int, mask: Any) -> Any:
        shard, _ = sp_shard_with_padding(mask, dim, False, layout=self.layout, group=self.group)
        return shard

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        return config | {"layout": self.layout, "check_replicated": self.check_replicated}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SPGather(_SequenceLayer):
    """The whole sequence again: ``[B, s, ...] -> [B, S, ...]`` along ``axis``, the shards of
    every rank concatenated and :class:`SPShard`'s padding (the record ``sequence``) dropped;
    the same on every rank. A Keras mask is gathered with it. One ``SPGather`` per
    ``SPShard``: it closes the record (concatenate what else you gather from that sequence
    first).

    Args:
        axis, sequence, strict, group: as :class:`SPShard`'s.

    Raises (when called): ``PlanError`` when no :class:`SPShard` recorded ``sequence`` in this
    forward pass, or the shard has another length than the one it recorded.
    """

    def __init__(
        self,
        axis: int = 1,
        *,
        sequence: str = SEQUENCE,
        strict: bool = True,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(axis, sequence, strict, group, **kwargs)
        self._record: _Sharded | None = None

    def _sharded(self, inputs: Any) -> tuple[int, _Sharded]:
        dim = self._dim(len(inputs.shape))
        record = _records().get(self.sequence)
        if record is None:
            raise PlanError(
                f"SPGather: no SPShard(sequence={self.sequence!r}) ran before it in this model "
                "call, so the padding to drop is unknown; shard the sequence with SPShard, or "
                "gather a sequence sharded by hand with sp_common.sp_gather(x, dim, pad_size=...)."
            )
        if int(inputs.shape[dim]) != record.local:
            raise PlanError(
                f"SPGather: the input has {inputs.shape[dim]} tokens on axis {self.axis}, but "
                f"SPShard(sequence={self.sequence!r}) gave this rank {record.local}; gather the "
                "sequence that SPShard sharded (give other sequences their own name)."
            )
        return dim, record

    def call(self, inputs: Any) -> Any:
        dim, record = self._sharded(inputs)
        n = self._world_size(inputs)
        out = sp_gather(
            _scale_grad(inputs, n, 1),
            dim,
            pad_size=record.pad,
            layout=record.layout,
            group=self.group,
        )
        del _records()[self.sequence]
        self._record = record
        return out

    def _mask(self, dim: int, mask: Any) -> Any:
        record = self._record
        if record is None:
            raise PlanError("SPGather.compute_mask runs only after the layer's call().")
        return sp_gather(mask, dim, pad_size=record.pad, layout=record.layout, group=self.group)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SPMultiHeadAttention(keras.layers.MultiHeadAttention):
    """``keras.layers.MultiHeadAttention`` over this rank's shard of a sequence sharded across
    the SP ranks (``sp_attention``): the unsharded layer's output at this rank's positions, and
    its gradients. The projections and their weights are Keras's own, so weights load from and
    into a plain ``MultiHeadAttention``.

    Shapes (``s`` = this rank's tokens; ``query`` and ``value``/``key`` are the same sharded
    sequence, self-attention)::

        query [B, s, F], value [B, s, Fv], key [B, s, Fk] -> [B, s, output_shape or F]

    Args:
        num_heads, key_dim, **kwargs: as ``MultiHeadAttention``'s (``value_dim``, ``use_bias``,
            ``output_shape``, initializers, ...).
        strategy: as ``sp_attention``'s (they differ only in cost).
        layout: ``None``: the layout :class:`SPShard` recorded, else ``"contiguous"``.
        sequence: the name of the :class:`SPShard` record of the keys' and values' sequence,
            to read its real length from. Cross-attention (``value`` is not ``query``) must name
            it: the default name is the query's sequence, whose length would mask the wrong
            keys.
        strict: raise where no SP group is bound (as :class:`SPShard`'s).
        group: the SP group (as :class:`SPShard`'s).

    Call as ``MultiHeadAttention`` (``use_causal_mask=True`` is causal over the global
    positions), plus ``seq_len``: the real length of a sequence sharded by hand with padding
    (default: :class:`SPShard`'s record in this model call, else nothing padded).
    ``value_mask``/``key_mask`` (and a Keras mask of ``value``) are this rank's key padding
    masks ``[B, s]``. A query mask (a Keras mask of ``query``) is passed on to the output, and a
    masked query's output is Keras's: every key of the row is masked, so it is the uniform
    average of the values over the whole sequence.

    Raises:
        ValueError: ``dropout > 0``, a ``sliding_window``, ``attention_axes`` other than the
            sequence axis (at construction); an ``attention_mask`` (a mask over pairs of a shard
            is over local positions; say causal with ``use_causal_mask``, padding with
            ``value_mask``), ``return_attention_scores=True`` (the ``[S, S]`` scores are never
            materialized), inputs that are not 3-d, cross-attention (``value`` is not
            ``query``) without ``sequence=`` or ``seq_len=``, keys whose count on this rank is
            not the one the named sequence's ``SPShard`` recorded, no SP group bound with
            ``strict`` (when called).
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        *,
        strategy: Strategy = "ulysses",
        layout: Layout | None = None,
        sequence: str | None = None,
        strict: bool = True,
        group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_heads, key_dim, **kwargs)
        func = "SPMultiHeadAttention"
        if layout is not None:
            check_layout(func, layout)
        if self._dropout > 0.0:
            raise ValueError(
                f"{func}: dropout={self._dropout}: attention dropout is not implemented by "
                "sequence-parallel attention; pass dropout=0.0 (dropout after the attention "
                "layer works)."
            )
        if getattr(self, "_sliding_window", None) is not None:
            raise ValueError(
                f"{func}: sliding_window={self._sliding_window}: windowed attention is not "
                "implemented by sequence-parallel attention; leave sliding_window=None."
            )
        axes = self._attention_axes
        if axes is not None and tuple(axes) not in ((1,), (-2,)):
            raise ValueError(
                f"{func}: attention_axes={axes}: only the sequence axis 1 of [batch, seq, "
                "features] inputs is sharded; leave attention_axes=None."
            )
        self.strategy, self.layout, self.strict, self.group = strategy, layout, strict, group
        self.named = sequence is not None  # cross-attention must name the keys' sequence
        self.sequence = sequence or SEQUENCE
        self._sp_call: dict[str, Any] | None = None

    def call(  # type: ignore[override]
        self,
        query: Any,
        value: Any,
        key: Any = None,
        query_mask: Any = None,
        value_mask: Any = None,
        key_mask: Any = None,
        attention_mask: Any = None,
        return_attention_scores: bool = False,
        training: Any = None,
        use_causal_mask: bool = False,
        seq_len: int | None = None,
    ) -> Any:
        func = "SPMultiHeadAttention"
        if attention_mask is not None:
            raise ValueError(
                f"{func}: attention_mask of shape {tuple(attention_mask.shape)}: a mask over "
                "(query, key) pairs of a shard is over local positions, not global ones; say "
                "causal with use_causal_mask=True and key padding with value_mask [B, s] (or a "
                "Keras mask), or run the layer unsharded."
            )
        if return_attention_scores:
            raise ValueError(
                f"{func}: return_attention_scores=True: the [S, S] attention scores are never "
                "materialized under sequence parallelism; call it without."
            )
        if len(query.shape) != 3:
            raise ValueError(
                f"{func}: query of shape {tuple(query.shape)}; expected [batch, seq, features] "
                "(fold extra batch dimensions into one)."
            )
        record = _records().get(self.sequence)
        if record is not None and value is not query and not self.named and seq_len is None:
            raise ValueError(
                f"{func}: cross-attention (value is not query) with the default sequence name "
                f"{SEQUENCE!r}, the query's: its real length would mask the keys of another "
                "sequence. Name the keys' sequence, SPMultiHeadAttention(..., sequence=NAME) as "
                "its SPShard(sequence=NAME) recorded it (recorded in this model call: "
                f"{sorted(_records())}), or pass seq_len= per call (for self-attention of one "
                "sequence through two tensors, sequence='sequence')."
            )
        if record is not None and record.local != int(value.shape[1]):
            raise ValueError(
                f"{func}: the keys have {value.shape[1]} tokens on this rank, but "
                f"SPShard(sequence={self.sequence!r}) gave it {record.local}; name the keys' "
                "sequence with sequence=, or pass seq_len= per call."
            )
        masks = [m for m in (value_mask, key_mask) if m is not None]
        keys = None
        if masks:
            keys = keras.ops.cast(masks[0], "bool")
            for m in masks[1:]:
                keys = keras.ops.logical_and(keys, keras.ops.cast(m, "bool"))
        self._sp_call = {
            "causal": bool(use_causal_mask),
            "seq_len": seq_len if seq_len is not None else (record and record.length),
            "key_mask": keys,
            "layout": self.layout or (record.layout if record else "contiguous"),
            "query_mask": query_mask,
        }
        try:
            return super().call(query, value, key, training=training)
        finally:
            self._sp_call = None

    def _compute_attention(
        self,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any = None,
        training: Any = None,
        return_attention_scores: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        # attention_mask is Keras's [B, T, 1] from the query mask only (call() refuses the rest);
        # the query mask itself came through call().
        options = self._sp_call
        if options is None:
            raise RuntimeError(
                "SPMultiHeadAttention._compute_attention runs only from the layer's call()."
            )
        common = {
            "strategy": self.strategy,
            "seq_len": options["seq_len"],
            "group": self.group,
            "layout": options["layout"],
        }
        try:
            with sp_strict(self.strict):
                out = sp_attention(
                    query,
                    key,
                    value,
                    causal=options["causal"],
                    key_mask=options["key_mask"],
                    scale=float(self._inverse_sqrt_key_dim),
                    **common,
                )
                rows = options["query_mask"]
                if rows is not None:
                    # Keras masks every key of a masked query's row: its softmax is then
                    # uniform over the whole sequence (equal logits), which zero queries give.
                    uniform = sp_attention(keras.ops.zeros_like(query), key, value, **common)
                    keep = keras.ops.cast(rows, "bool")[:, :, None, None]
                    out = keras.ops.where(keep, out, uniform)
        except ValueError as e:
            if "is not bound here" in str(e) or "strict mode is on" in str(e):
                raise _bound_error("SPMultiHeadAttention", e) from None
            raise
        return out, None

    def compute_output_spec(self, query: Any, value: Any, key: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("seq_len", None)
        return super().compute_output_spec(query, value, key, **kwargs)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(strategy=self.strategy, layout=self.layout, strict=self.strict)
        return (
            config | {"sequence": self.sequence if self.named else None} | _group_config(self.group)
        )


def sync_gradients(model: Any, *, group: Any = None) -> Any:
    """torch: average every trainable weight's gradient over the SP group at the end of each
    ``backward()`` (one all-reduce per gradient dtype), so ``model.fit``, or any loop that runs
    ``backward()`` and an optimizer, gives every rank the unsharded model's gradient and the
    same weights. Call it once per model, before training; returns a handle whose
    ``remove()`` undoes it.

    Shapes: each gradient keeps its weight's shape; it becomes the mean of the ranks' values.
    Gradient accumulation works (what earlier passes accumulated is already the same on every
    rank), and so do several backward passes of one forward pass.

    Raises:
        TypeError: on the JAX backend (``jax.grad`` through :func:`jax_forward` is already the
            unsharded gradient: ``shard_map`` sums the devices' terms).
        PlanError: from ``backward()``, when the backward pass went through no
            :class:`SPShard` or :class:`SPGather` (a sequence sharded by hand follows the plain
            rules of ``sp_shard``/``sp_gather``, whose gradient terms the mean does not sum).
    """
    if BACKEND != "torch":
        raise TypeError(
            "sync_gradients: Keras runs on the jax backend, where jax.grad through "
            "jax_forward(model, mesh) is already the unsharded gradient (shard_map sums the "
            "devices' terms); no sync is needed."
        )
    from . import _keras_torch

    return _keras_torch.sync_gradients(model, group)


def jax_forward(
    model: Any, mesh: Any, *, training: bool = False
) -> Callable[[Sequence[Any], Sequence[Any], Any], Any]:
    """JAX: ``forward(trainable, non_trainable, x) -> y``, ``model.stateless_call`` inside
    ``jax.shard_map`` over ``mesh``, everything replicated in and out (the model shards and
    gathers with :class:`SPShard` / :class:`SPGather`).

    Shapes: ``x`` is the model's full input (``[B, S, F]``, the same on every device), ``y`` its
    full output, replicated. ``trainable`` and ``non_trainable`` are lists of arrays in the order
    of ``model.trainable_variables`` and ``model.non_trainable_variables`` (``[v.value for v in
    ...]``). ``jax.grad`` with respect to ``trainable`` is the unsharded model's gradient. Wrap
    it in ``jax.jit``.

    Raises (from ``forward``): ``PlanError`` when the model updates a non-trainable weight
    (batch statistics, a seed state): the pure forward pass would drop the update.
    """
    if BACKEND != "jax":
        raise TypeError(
            "jax_forward: Keras runs on the torch backend; there every rank runs the model "
            "itself (torchrun), with sync_gradients(model) for training."
        )
    import jax
    from jax.sharding import PartitionSpec

    def body(trainable: Sequence[Any], non_trainable: Sequence[Any], x: Any) -> Any:
        y, after = model.stateless_call(list(trainable), list(non_trainable), x, training=training)
        if any(a is not b for a, b in zip(non_trainable, after, strict=True)):
            raise PlanError(
                "jax_forward: the model updated a non-trainable weight (batch statistics, a "
                "seed state) in the forward pass, which the pure forward pass would drop; run "
                "it with training=False, or without such layers."
            )
        return y

    replicated = PartitionSpec()
    return jax.shard_map(  # type: ignore[no-any-return]
        body, mesh=mesh, in_specs=(replicated, replicated, replicated), out_specs=replicated
    )
