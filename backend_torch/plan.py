"""Apply an SPPlan to an ``nn.Module`` with forward hooks, and remove it again."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.hooks import RemovableHandle

from sp_common.plan import (
    GatherOutput,
    PlanError,
    ShardInput,
    SPPlan,
    active_run,
    begin_run,
    end_run,
)


class AppliedPlan:
    """The hooks of one applied plan. ``remove()`` (or leaving the ``with`` block) takes them all
    off, leaving the model exactly as it was."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _expand(model: torch.nn.Module, path: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, module) for a plan path; ``a.*`` is every child of ``a``."""
    base, star = (path[:-2], True) if path == "*" or path.endswith(".*") else (path, False)
    base = "" if path == "*" else base
    try:
        module = model.get_submodule(base)
    except AttributeError as e:
        children = [name for name, _ in model.named_modules() if name][:20]
        raise PlanError(
            f"apply_plan: the model has no submodule {base!r} (plan path {path!r}); some of its "
            f"paths: {children}."
        ) from e
    if not star:
        yield path, module
        return
    children = list(module.named_children())
    if not children:
        raise PlanError(f"apply_plan: plan path {path!r}: {base or '<model>'} has no children.")
    for name, child in children:
        yield f"{base}.{name}" if base else name, child


def _shard_hook(path: str, module: torch.nn.Module, specs: list[ShardInput]) -> Any:
    """A pre-hook that shards the planned inputs, found in args or kwargs. The argument
    positions come from ``forward``'s signature here, at registration: binding in the hook
    itself (``Signature.bind``) would break torch.compile's graph."""
    params = inspect.signature(module.forward).parameters
    names = list(params)
    positional = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    where: list[tuple[ShardInput, str, int | None]] = []  # (spec, name, position or None)
    for spec in specs:
        name = spec.arg if isinstance(spec.arg, str) else None
        if name is None and 0 <= int(spec.arg) < len(positional):
            name = positional[int(spec.arg)]
        if name is None or name not in names:
            raise PlanError(
                f"apply_plan: {path or '<model>'}.forward has no argument {spec.arg!r}; its "
                f"arguments are {names}."
            )
        where.append((spec, name, positional.index(name) if name in positional else None))

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        run = active_run()
        if run is None:
            raise PlanError(f"{path}: a planned submodule ran outside its model's forward pass.")
        args, kwargs = list(args), dict(kwargs)
        for spec, name, position in where:
            if position is not None and position < len(args):
                args[position] = run.shard(path, spec, args[position])
            elif name in kwargs:
                kwargs[name] = run.shard(path, spec, kwargs[name])
            else:
                raise PlanError(
                    f"{path or '<model>'} input {spec.arg!r}: the plan shards it, but the call "
                    f"did not pass it ({len(args)} positional, keywords {sorted(kwargs)})."
                )
        return tuple(args), kwargs

    return hook


def _gather_hook(path: str, specs: list[GatherOutput]) -> Any:
    def hook(mod: torch.nn.Module, args: tuple, output: Any) -> Any:
        run = active_run()
        if run is None:
            raise PlanError(f"{path}: a planned submodule ran outside its model's forward pass.")
        for spec in specs:
            if spec.index is None:
                output = run.gather(path, spec, output)
                continue
            if not isinstance(output, (tuple, list)) or not -len(output) <= spec.index < len(
                output
            ):
                run.abandon()
                raise PlanError(
                    f"{path or '<model>'} output[{spec.index}]: the output is "
                    f"{type(output).__name__}"
                    + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
                    + "; fix GatherOutput.index."
                )
            items = list(output)
            items[spec.index] = run.gather(path, spec, items[spec.index])
            output = type(output)(items)
        return output

    return hook


def apply_plan(model: torch.nn.Module, plan: SPPlan) -> AppliedPlan:
    """Shard and gather what ``plan`` names, on every forward pass of ``model``.

    Inputs are found by name in args or kwargs through each module's ``forward`` signature;
    gathered outputs may be a tensor or an element of a tuple. Each forward pass of ``model``
    checks that every name sharded was gathered. Works under ``torch.compile(fullgraph=True)``
    (apply the plan before compiling). Any error while registering removes the hooks already
    registered and raises :class:`PlanError`.
    """
    if not isinstance(plan, SPPlan):
        raise TypeError(f"apply_plan: plan must be an SPPlan, got {type(plan).__name__}.")
    handles: list[RemovableHandle] = []
    outer: list[Any] = []

    def begin(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        outer.append(begin_run())

    def finish(mod: torch.nn.Module, args: tuple, output: Any) -> None:
        # Also runs when the forward pass raised (always_call): then only restore the outer
        # run, so the original error is not masked by an unpaired-name error.
        end_run(outer.pop(), check=output is not None)

    try:
        handles.append(model.register_forward_pre_hook(begin, with_kwargs=True, prepend=True))
        for path, specs in plan.specs().items():
            for full_path, module in _expand(model, path):
                shards = [s for s in specs if isinstance(s, ShardInput)]
                gathers = [s for s in specs if isinstance(s, GatherOutput)]
                if shards:
                    hook = _shard_hook(full_path, module, shards)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                if gathers:
                    handles.append(module.register_forward_hook(_gather_hook(full_path, gathers)))
        handles.append(model.register_forward_hook(finish, always_call=True))
    except Exception as e:
        for handle in handles:
            handle.remove()
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"apply_plan: registering the plan failed: {e}") from e
    return AppliedPlan(handles)


def all_reduce_grads(model: torch.nn.Module, group: Any = None) -> None:
    """Sum every parameter gradient of ``model`` over the SP group, in place.

    Under a plan each rank runs the replicated parameters on its own tokens only, so after
    ``backward()`` a parameter's gradient holds this rank's share; the sum over the SP group is
    the single-device gradient (JAX's ``shard_map`` does this sum by itself). Call it after
    ``backward()`` and before the optimizer step, as DDP does over data-parallel ranks.
    ``group`` as in ``sp_shard`` (default: the active ``sp_group``, else the default group).
    """
    from sp_common.api import resolve

    for param in model.parameters():
        if param.grad is None:
            continue
        _, g, n = resolve("all_reduce_grads", param.grad, group)
        if n > 1:
            dist.all_reduce(param.grad, group=g)
