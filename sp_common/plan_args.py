"""Where a plan's inputs are in a call and which output it gathers, written once for both backends.

Both plan appliers (torch module hooks, the JAX ``shard_map`` transform) find a ``ShardInput``'s
argument the same way, from the function's signature, once, when the plan is applied (binding
per call with ``Signature.bind`` would break torch.compile's graph), and pick a
``GatherOutput``'s element of a tuple output the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .plan import GatherOutput, PlanError, ShardInput

_KIND = inspect.Parameter


class InputSlot(NamedTuple):
    """Where a call holds one planned input: at ``position`` of its positional arguments when
    it has that many, else under ``keyword`` (None where the parameter is positional-only or
    only ``*args`` can hold it)."""

    spec: ShardInput
    keyword: str | None
    position: int | None


def locate_inputs(
    where: str, fn: Callable[..., Any], specs: Sequence[ShardInput]
) -> list[InputSlot]:
    """Where each of ``specs`` is in a call of ``fn`` (``where`` names it in errors).

    - A parameter name: its position (if it has one), else that keyword of the call.
    - A position ``i``: the positional parameter at ``i`` (so, passed by keyword, its name);
      past the named ones, when ``fn`` takes ``*args``, position ``i`` of the call's positional
      arguments (never the whole ``args`` tuple).
    - Any other name, when ``fn`` takes ``**kwargs``: that keyword of the call.

    So a wrapper whose ``forward(*args, **kwargs)`` hides its parameters (such as
    ``DistributedDataParallel``) takes positions and keywords, and a ``functools.wraps``'d
    function is planned by the wrapped signature.

    Raises:
        PlanError: an argument ``fn`` has no place for, naming its signature.
    """
    params = inspect.signature(fn).parameters
    positional = [
        n
        for n, p in params.items()
        if p.kind in (_KIND.POSITIONAL_ONLY, _KIND.POSITIONAL_OR_KEYWORD)
    ]
    named = [
        n for n, p in params.items() if p.kind not in (_KIND.VAR_POSITIONAL, _KIND.VAR_KEYWORD)
    ]
    var_args = any(p.kind == _KIND.VAR_POSITIONAL for p in params.values())
    var_kwargs = any(p.kind == _KIND.VAR_KEYWORD for p in params.values())
    slots = []
    for spec in specs:
        arg = spec.arg
        if isinstance(arg, str) and (arg in named or var_kwargs):
            position = positional.index(arg) if arg in positional else None
            keyword = None if arg in named and params[arg].kind == _KIND.POSITIONAL_ONLY else arg
            slots.append(InputSlot(spec, keyword, position))
        elif isinstance(arg, int) and 0 <= arg < len(positional):
            name = positional[arg]
            keyword = None if params[name].kind == _KIND.POSITIONAL_ONLY else name
            slots.append(InputSlot(spec, keyword, arg))
        elif isinstance(arg, int) and arg >= 0 and var_args:
            slots.append(InputSlot(spec, None, arg))
        else:
            stars: dict[Any, str] = {_KIND.VAR_POSITIONAL: "*", _KIND.VAR_KEYWORD: "**"}
            shown = ", ".join(stars.get(p.kind, "") + n for n, p in params.items())
            raise PlanError(
                f"apply_plan: {where}({shown}) has no argument {arg!r}; name one of its "
                f"parameters {named} or give a position counted from 0"
                + ("" if var_args else f" below {len(positional)}")
                + "."
            )
    return slots


def shard_inputs(
    where: str,
    slots: Sequence[InputSlot],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    shard: Callable[[ShardInput, Any], Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a call with each planned input replaced by ``shard(spec, value)``.

    Raises:
        PlanError: the call did not pass a planned input, naming what it passed.
    """
    new_args, new_kwargs = list(args), dict(kwargs)
    for spec, keyword, position in slots:
        if position is not None and position < len(new_args):
            new_args[position] = shard(spec, new_args[position])
        elif keyword is not None and keyword in new_kwargs:
            new_kwargs[keyword] = shard(spec, new_kwargs[keyword])
        else:
            raise PlanError(
                f"{where} input {spec.arg!r}: the plan shards it, but the call did not pass it "
                f"({len(args)} positional, keywords {sorted(kwargs)})."
            )
    return tuple(new_args), new_kwargs


def gather_output(where: str, spec: GatherOutput, output: Any, gather: Callable[[Any], Any]) -> Any:
    """``output`` with the part ``spec`` names replaced by ``gather(part)``: the output itself
    (``index=None``), or element ``index`` of a tuple or list output (a namedtuple keeps its
    type and fields).

    Raises:
        PlanError: a dict output, a tuple output without an index, or an index out of range.
    """
    if isinstance(output, Mapping):
        keys = list(output)
        example = f" (e.g. the one whose result becomes output[{keys[0]!r}])" if keys else ""
        raise PlanError(
            f"{where} output" + ("" if spec.index is None else f"[{spec.index}]") + ": the "
            f"output is a {type(output).__name__} with keys {keys}, but GatherOutput gathers a "
            "tensor output (index=None) or element `index` of a tuple/list output, not a dict "
            f"entry; put the GatherOutput on the submodule that computes the tensor{example}, or "
            "return a tuple and pass GatherOutput(dim, index=...)."
        )
    if spec.index is None:
        if isinstance(output, (tuple, list)):
            raise PlanError(
                f"{where} output: the output is a {type(output).__name__} of length "
                f"{len(output)}, and GatherOutput(index=None) gathers a tensor output; pick the "
                f"element with GatherOutput(dim, index=...) (0 to {len(output) - 1})."
            )
        return gather(output)
    if not isinstance(output, (tuple, list)) or not -len(output) <= spec.index < len(output):
        length = f" of length {len(output)}" if isinstance(output, (tuple, list)) else ""
        raise PlanError(
            f"{where} output[{spec.index}]: the output is {type(output).__name__}{length}; fix "
            "GatherOutput.index."
        )
    items = list(output)
    items[spec.index] = gather(items[spec.index])
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple takes fields
        return type(output)(*items)
    return type(output)(items)
