"""ShardingValidator: pairs every shard with its gather, by name.

Tracking state lives in a context variable, so two threads (or two asyncio tasks that each enter
``track()``) serving two requests never see each other's names. In JAX it runs at trace time: it
sees each trace once, and a cached ``jit`` call does not run it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from .api import LOCAL_ERRORS, resolve, sp_gather, sp_shard, sp_shard_with_padding
from .shapes import check_divisible, normalize_dim

T = TypeVar("T")


@dataclasses.dataclass
class _Record:
    dim: int
    ndim: int
    pad_size: int


@dataclasses.dataclass(eq=False)
class _TrackState:
    """The record of one ``track()`` block; ``outer`` is the enclosing block's (whose padded
    shards a gather inside this block must still unpad)."""

    outer: _TrackState | None = None
    sharded: dict[str, _Record] = dataclasses.field(default_factory=dict)
    gathered: set[str] = dataclasses.field(default_factory=set)

    def chain(self) -> Iterator[_TrackState]:
        state: _TrackState | None = self
        while state is not None:
            yield state
            state = state.outer


@dataclasses.dataclass(frozen=True)
class _Slots:
    """One validator's state in one context: the innermost active block and the block that
    finished last."""

    active: _TrackState | None = None
    last: _TrackState | None = None


# Every validator's state, per context, in ONE context variable (a validator per request must not
# add context variables forever): validator key -> its slots, replaced (never mutated) on change
# so that a context copied into a thread or task never shares a dict with its parent.
_STATE: ContextVar[dict[int, _Slots]] = ContextVar("sp_validator_state", default={})  # noqa: B039
_KEYS = itertools.count()


@dataclasses.dataclass(eq=False)
class ShardingValidator:
    """Tracks which named tensors were sharded and checks that each one is gathered.

    Usage::

        validator = ShardingValidator()
        with validator.track():
            hidden = validator.shard(hidden, "hidden_states", dim=1)
            ...  # model computation
            output = validator.gather(output, "hidden_states", dim=1)
        validator.validate()  # raises if any shard was not gathered

    ``validate()`` checks the innermost active ``track()`` block of the current context, or, when
    none is active, the block that finished last in this context. Nested ``track()`` blocks get
    their own record and leave the outer one as it was.
    """

    _key: int = dataclasses.field(init=False, repr=False, default_factory=lambda: next(_KEYS))

    def _slots(self) -> _Slots:
        return _STATE.get().get(self._key, _Slots())

    def _set(self, slots: _Slots) -> None:
        _STATE.set({**_STATE.get(), self._key: slots})

    # Reference attributes, read-only views of the current context's state.
    @property
    def _enabled(self) -> bool:
        return self._slots().active is not None

    @property
    def _sharded(self) -> set[str]:
        state = self._current()
        return set(state.sharded) if state else set()

    @property
    def _gathered(self) -> set[str]:
        state = self._current()
        return set(state.gathered) if state else set()

    def _current(self) -> _TrackState | None:
        slots = self._slots()
        return slots.active if slots.active is not None else slots.last

    @contextlib.contextmanager
    def track(self) -> Iterator[ShardingValidator]:
        """Record every shard and gather in this block (of the current context) under a fresh
        record; an enclosing block's record is restored untouched on exit."""
        outer = self._slots().active
        state = _TrackState(outer=outer)
        self._set(_Slots(active=state, last=self._slots().last))
        try:
            yield self
        finally:
            self._set(_Slots(active=outer, last=state))

    def reset(self) -> None:
        """Forget the names recorded so far in the current context (a new forward pass)."""
        active = self._slots().active
        if active is not None:
            active.sharded.clear()
            active.gathered.clear()
        self._set(_Slots(active=active, last=None))

    def shard(
        self,
        tensor: T,
        name: str,
        dim: int,
        validate_divisible: bool = True,
        *,
        group: Any = None,
    ) -> T:
        """Shard ``tensor`` along ``dim`` and record it under ``name``.

        Shapes: ``[..., S, ...] -> [..., ceil(S / N), ...]``.

        With ``validate_divisible=True`` a size N does not divide raises ValueError (as
        :func:`sp_shard`). With ``False`` the tensor is padded at the end (as
        :func:`sp_shard_with_padding`) and the pad size is recorded under ``name``, so
        :meth:`gather` removes it; that needs an active ``track()`` block to remember it.
        ``group`` as in :func:`sp_shard`.
        """
        func = "ShardingValidator.shard"
        backend, g, n = resolve(func, tensor, group)
        try:
            shape = backend.shape(tensor)
            d = normalize_dim(func, dim, shape)
            if not isinstance(validate_divisible, bool):
                raise TypeError(
                    f"{func}: validate_divisible must be a bool, got {validate_divisible!r}; "
                    "pass True (raise when N does not divide) or False (pad)."
                )
            if validate_divisible:
                check_divisible(func, shape, d, n)
        except LOCAL_ERRORS as e:
            if n > 1:  # debug mode: the peers, already in sp_shard's check, must not wait
                backend.check_consistent(func, g, {"tensor": tensor}, {"dim": dim}, e)
            raise
        if validate_divisible:
            out, pad_size = sp_shard(tensor, dim, group=group), 0
        else:
            out, pad_size = sp_shard_with_padding(tensor, dim, group=group)
        state = self._slots().active
        if state is None:
            if pad_size:
                raise ValueError(
                    f"{func}: tensor {name!r} needed {pad_size} elements of "
                    f"padding on dim {dim}, but no track() block is active to remember it for "
                    "gather; call it inside `with validator.track():`, or use "
                    "sp_shard_with_padding and sp_gather(..., pad_size=...)."
                )
            return out
        state.sharded[name] = _Record(dim=d, ndim=len(shape), pad_size=pad_size)
        return out

    def gather(self, tensor: T, name: str, dim: int, *, group: Any = None) -> T:
        """Gather ``tensor`` along ``dim`` and mark ``name`` gathered.

        Shapes: ``[..., S / N, ...] -> [..., S, ...]``: the padding recorded when ``name`` was
        sharded is removed, wherever that shard was recorded: in this ``track()`` block, an
        enclosing one, or (outside any block) the block that finished last. The name is marked
        gathered in the innermost active block (else the block that finished last). Gathering a
        name on another dim than it was sharded on raises ValueError. ``group`` as in
        :func:`sp_gather`.
        """
        func = "ShardingValidator.gather"
        backend, g, n = resolve(func, tensor, group)
        slots = self._slots()
        target = slots.active if slots.active is not None else slots.last
        record = self._find(name, slots)
        pad_size = 0
        try:
            shape = backend.shape(tensor)
            d = normalize_dim(func, dim, shape)
            if record is not None:
                if (d, len(shape)) != (record.dim, record.ndim):
                    raise ValueError(
                        f"{func}: {name!r} was sharded on dim {record.dim} of a "
                        f"{record.ndim}-d tensor but is gathered on dim {dim} of shape "
                        f"{tuple(shape)}; gather it on the dim it was sharded on."
                    )
                pad_size = record.pad_size
        except LOCAL_ERRORS as e:
            if n > 1:  # debug mode: the peers, already in sp_gather's check, must not wait
                backend.check_consistent(func, g, {"tensor": tensor}, {"dim": dim}, e)
            raise
        out = sp_gather(tensor, dim, pad_size=pad_size, group=group)
        if target is not None:
            target.gathered.add(name)
        return out

    @staticmethod
    def _find(name: str, slots: _Slots) -> _Record | None:
        """The record of ``name``'s latest shard: innermost active block outwards, then the
        block that finished last and its enclosing blocks."""
        for start in (slots.active, slots.last):
            if start is not None:
                for state in start.chain():
                    if name in state.sharded:
                        return state.sharded[name]
        return None

    def validate(self) -> None:
        """Raise ValueError listing every name sharded but not gathered (see class docstring for
        which record is checked)."""
        state = self._current()
        if state is None:
            return
        missing = sorted(set(state.sharded) - state.gathered)
        if missing:
            raise ValueError(
                f"ShardingValidator.validate: {len(missing)} tensor(s) sharded but never "
                f"gathered: {', '.join(map(repr, missing))}; call gather(tensor, name, dim) for "
                "each before the end of the forward pass."
            )


_GLOBAL = ShardingValidator()


def get_sharding_validator() -> ShardingValidator:
    """The process-wide :class:`ShardingValidator` (its tracking state is still per context)."""
    return _GLOBAL
