"""ShardingValidator: pairs every shard with its gather, by name.

Tracking state lives in a context variable, so two threads (or two asyncio tasks that each enter
``track()``) serving two requests never see each other's names. In JAX it runs at trace time: it
sees each trace once, and a cached ``jit`` call does not run it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

from .api import sp_gather, sp_shard, sp_shard_with_padding
from .backend import backend_for
from .shapes import normalize_dim

T = TypeVar("T")


@dataclasses.dataclass
class _Record:
    dim: int
    ndim: int
    pad_size: int


@dataclasses.dataclass
class _TrackState:
    sharded: dict[str, _Record] = dataclasses.field(default_factory=dict)
    gathered: set[str] = dataclasses.field(default_factory=set)


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

    _active: ContextVar[_TrackState | None] = dataclasses.field(init=False, repr=False)
    _last: ContextVar[_TrackState | None] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._active = ContextVar(f"sp_validator_active_{id(self)}", default=None)
        self._last = ContextVar(f"sp_validator_last_{id(self)}", default=None)

    # Reference attributes, read-only views of the current context's state.
    @property
    def _enabled(self) -> bool:
        return self._active.get() is not None

    @property
    def _sharded(self) -> set[str]:
        state = self._current()
        return set(state.sharded) if state else set()

    @property
    def _gathered(self) -> set[str]:
        state = self._current()
        return set(state.gathered) if state else set()

    def _current(self) -> _TrackState | None:
        state = self._active.get()
        return state if state is not None else self._last.get()

    @contextlib.contextmanager
    def track(self) -> Iterator[ShardingValidator]:
        """Record every shard and gather in this block (of the current context) under a fresh
        record; an enclosing block's record is restored untouched on exit."""
        state = _TrackState()
        token = self._active.set(state)
        try:
            yield self
        finally:
            self._active.reset(token)
            self._last.set(state)

    def reset(self) -> None:
        """Forget the names recorded so far in the current context (a new forward pass)."""
        active = self._active.get()
        if active is not None:
            active.sharded.clear()
            active.gathered.clear()
        self._last.set(None)

    def shard(self, tensor: T, name: str, dim: int, validate_divisible: bool = True) -> T:
        """Shard ``tensor`` along ``dim`` and record it under ``name``.

        Shapes: ``[..., S, ...] -> [..., ceil(S / N), ...]``.

        With ``validate_divisible=True`` a size N does not divide raises ValueError (as
        :func:`sp_shard`). With ``False`` the tensor is padded at the end (as
        :func:`sp_shard_with_padding`) and the pad size is recorded under ``name``, so
        :meth:`gather` removes it; that needs an active ``track()`` block to remember it.
        """
        if validate_divisible:
            out = sp_shard(tensor, dim)
            pad_size = 0
        else:
            out, pad_size = sp_shard_with_padding(tensor, dim)
        state = self._active.get()
        if state is None:
            if pad_size:
                raise ValueError(
                    f"ShardingValidator.shard: tensor {name!r} needed {pad_size} elements of "
                    f"padding on dim {dim}, but no track() block is active to remember it for "
                    "gather; call it inside `with validator.track():`, or use "
                    "sp_shard_with_padding and sp_gather(..., pad_size=...)."
                )
            return out
        shape = backend_for("ShardingValidator.shard", tensor).shape(tensor)
        d = normalize_dim("ShardingValidator.shard", dim, shape)
        state.sharded[name] = _Record(dim=d, ndim=len(shape), pad_size=pad_size)
        return out

    def gather(self, tensor: T, name: str, dim: int) -> T:
        """Gather ``tensor`` along ``dim`` and mark ``name`` gathered.

        Shapes: ``[..., S / N, ...] -> [..., S, ...]``; padding recorded when ``name`` was sharded
        is removed. Gathering a tracked name on another dim than it was sharded on raises
        ValueError.
        """
        state = self._active.get()
        pad_size = 0
        if state is not None:
            shape = backend_for("ShardingValidator.gather", tensor).shape(tensor)
            d = normalize_dim("ShardingValidator.gather", dim, shape)
            record = state.sharded.get(name)
            if record is not None:
                if (d, len(shape)) != (record.dim, record.ndim):
                    raise ValueError(
                        f"ShardingValidator.gather: {name!r} was sharded on dim {record.dim} of a "
                        f"{record.ndim}-d tensor but is gathered on dim {dim} of shape "
                        f"{tuple(shape)}; gather it on the dim it was sharded on."
                    )
                pad_size = record.pad_size
        out = sp_gather(tensor, dim, pad_size=pad_size)
        if state is not None:
            state.gathered.add(name)
        return out

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
