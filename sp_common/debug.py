"""Debug mode: cross-rank agreement checks before collectives (torch).

On when the environment variable ``SP_SHARDING_DEBUG`` is ``1``/``true``/``yes``/``on`` at import
time, or inside a ``sp_debug()`` block (which wins over the environment variable). Off by
default: then the only cost is one context-variable read per op, and no collective.

In debug mode every op first runs one small collective in which each rank announces a
:class:`CallRecord` of its call: the shape and dtype of each tensor, the arguments that must be
equal on every rank (dims, ``pad_size``, ``grad_rule``, ``seq_len``, ``scale``) and the error its
local checks raised, if any. A rank whose local checks fail still takes part, so its peers never
wait for it; when the records differ every rank raises the ValueError of :func:`disagreement`.
This module builds and words the records; each backend's ``check_consistent`` exchanges them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .backend import Backend

_ENV_VAR = "SP_SHARDING_DEBUG"
_FROM_ENV = os.environ.get(_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
_DEBUG: ContextVar[bool | None] = ContextVar("sp_common_debug", default=None)


def debug_enabled() -> bool:
    """Whether cross-rank checks run in the current context."""
    flag = _DEBUG.get()
    return _FROM_ENV if flag is None else flag


@contextlib.contextmanager
def sp_debug(enabled: bool = True) -> Iterator[None]:
    """Turn cross-rank checks on (or off) for this block in the current context.

    With checks on, every torch op over N > 1 ranks (``sp_shard`` and ``sp_gather`` unless
    ``validate=False``, ``sp_shard_with_padding``, ``sp_all_to_all``, ``sp_reduce_scatter``,
    ``sp_ulysses_attention``) first runs one small collective in which all ranks compare the
    shapes and dtypes of their tensors and the arguments that must agree; a disagreement, or a
    local check that fails on some ranks only, raises ValueError on every rank that lists what
    each rank passed, instead of hanging or returning data of the wrong length. Turn it on on
    every rank.
    """
    if not isinstance(enabled, bool):
        raise TypeError(
            f"sp_debug: enabled must be a bool, got {enabled!r} of type "
            f"{type(enabled).__name__}; pass True or False."
        )
    token = _DEBUG.set(enabled)
    try:
        yield
    finally:
        _DEBUG.reset(token)


class CallRecord(NamedTuple):
    """What one rank passed to one op, as text every rank can compare and print.

    ``passed``: one entry per tensor (``"shape (2, 4) torch.float32"``, or ``"q shape ..."``)
    and per argument (``"dim=1"``); ``failure``: the error this rank's local checks raised, as
    ``"ValueError: ..."``, or ``""`` when they passed.
    """

    passed: tuple[str, ...]
    failure: str


def call_record(
    backend: Backend,
    tensors: Mapping[str, object],
    values: Mapping[str, object],
    failure: BaseException | None,
) -> CallRecord:
    """The :class:`CallRecord` of a call with ``tensors`` (by argument name; ``"tensor"`` is
    printed without its name) and argument ``values``; ``failure`` is the error of the local
    checks (None when they passed)."""
    passed = []
    for name, t in tensors.items():
        label = "" if name == "tensor" else f"{name} "
        if backend.is_tensor(t):
            passed.append(f"{label}shape {backend.shape(t)} {backend.dtype_info(t).name}")
        else:
            passed.append(
                f"{label or 'tensor '}of type {type(t).__module__}.{type(t).__qualname__}"
            )
    passed += [f"{name}={value!r}" for name, value in values.items()]
    error = "" if failure is None else f"{type(failure).__name__}: {failure}"
    return CallRecord(tuple(passed), error)


def disagreement(func: str, records: Sequence[CallRecord]) -> ValueError:
    """The error every rank raises when the ranks' records of a call to ``func`` differ."""
    listing = "; ".join(
        f"rank {r}: {', '.join(rec.passed)}"
        + (f" -> {rec.failure.rstrip('.')}" if rec.failure else "")
        for r, rec in enumerate(records)
    )
    failed = [r for r, rec in enumerate(records) if rec.failure]
    why = (
        f"rank(s) {failed} failed the local checks shown, so every rank stops here instead of "
        "waiting for them in the collective; fix their input. "
        if failed and len(failed) < len(records)
        else ""
    )
    return ValueError(
        f"{func}: the ranks of the SP group disagree on this call (found by debug mode): "
        f"{listing}. "
        f"{why}Every rank must pass tensors of one shape and dtype and the same arguments (dims, "
        "pad_size, grad_rule, seq_len, scale); pad variable-length sequences to one length with "
        "sp_shard_with_padding."
    )
