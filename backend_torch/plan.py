"""Apply an SPPlan to an ``nn.Module`` with forward hooks, and remove it again.

Gradients: a planned forward pass runs under the *per-rank terms* convention (see
``sp_common.grad_rules``), which makes every parameter's gradient exact wherever the plan's
shard and gather points sit. At the model's boundary the convention is converted back: the
cotangent that reaches each tensor output is kept on rank 0 only (every rank computes the same
loss from the replicated outputs, so rank 0's copy is the one term), and the gradient of each
tensor input that requires grad is summed over the SP ranks (so it is whole again, for whatever
ran before the model). Inside, shards use ``grad_rule="local"`` and gathers
``"reduce_scatter"``, so after ``backward()`` every parameter of the planned model holds this
rank's term, parameters before a shard, between shard and gather, and after a gather alike;
:func:`all_reduce_grads` sums them into the single-device gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from sp_common.api import resolve
from sp_common.grad_rules import enter_per_rank_terms, exit_per_rank_terms
from sp_common.plan import (
    GatherOutput,
    PlanError,
    PlanRun,
    ShardInput,
    SPPlan,
    active_run,
    begin_run,
    end_run,
)
from sp_common.plan_args import gather_output, locate_inputs, shard_inputs

# The modules with an applied plan (weakly: a plan does not keep its model alive).
_APPLIED: weakref.WeakKeyDictionary[torch.nn.Module, AppliedPlan] = weakref.WeakKeyDictionary()


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of the per-rank terms ``x`` over the group, the whole value on every
    rank. Backward: the gradient unchanged: every rank computes the same loss from the whole
    value, so each term's gradient is that gradient (summing it again would count it N times,
    as a second backward through a planned model's input gradient did)."""

    @staticmethod
    def forward(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SumGradient(torch.autograd.Function):
    """Forward: identity (a replicated input entering the planned model). Backward: the sum over
    ranks of the per-rank gradient terms, i.e. the whole gradient on every rank."""

    @staticmethod
    def forward(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _SumOverRanks.apply(grad, ctx.group), None


class _RankZeroGradient(torch.autograd.Function):
    """Forward: identity (a replicated output leaving the planned model). Backward: the gradient
    on rank 0, zeros elsewhere: every rank computed the same loss, so one copy is the term."""

    @staticmethod
    def forward(x: torch.Tensor, rank: int) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.rank = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # One graph shape on every rank (a Python branch on the rank would make torch.compile
        # trace a different backward per rank, whose collectives it may then order differently).
        keep = torch.full((), ctx.rank == 0, dtype=torch.bool, device=grad.device)
        return torch.where(keep, grad, torch.zeros_like(grad)), None


def _leave_model(t: torch.Tensor, rank: int, run: PlanRun | None) -> torch.Tensor:
    """``t`` as an output of the planned model: rank-0 gradients, and (eager only) a note on
    ``run`` of which backward pass reached it, for activation checkpointing to replay."""
    out = _RankZeroGradient.apply(t, rank)
    if run is not None and not torch.compiler.is_compiling():
        # Compiled models checkpoint inside their graph and never replay through hooks.

        def note(grad_outputs: Any) -> None:
            run.graph_task = torch._C._current_graph_task_id()

        out.grad_fn.register_prehook(note)
    return out


class AppliedPlan:
    """The hooks of one applied plan. ``remove()`` (or leaving the ``with`` block) takes them all
    off, leaving the model exactly as it was."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._handles: list[RemovableHandle] = []
        self._model = weakref.ref(model)
        # Forward passes whose backward may replay them (held alive by their autograd graph).
        self.runs: weakref.WeakSet[PlanRun] = weakref.WeakSet()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self._model()
        if model is not None and _APPLIED.get(model) is self:
            del _APPLIED[model]

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
    """A pre-hook that shards the planned inputs, found in args or kwargs where
    ``sp_common.plan_args.locate_inputs`` says (from ``forward``'s signature, here, at
    registration)."""
    where = path or "<model>"
    slots = locate_inputs(f"{where}.forward", module.forward, specs)

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        run = active_run()
        if run is None:
            raise PlanError(f"{path}: a planned submodule ran outside its model's forward pass.")

        def shard(spec: ShardInput, value: Any) -> Any:
            return run.shard(path, spec, value, grad_rule="local")

        return shard_inputs(where, slots, args, kwargs, shard)

    return hook


def _gather_hook(path: str, specs: list[GatherOutput]) -> Any:
    def hook(mod: torch.nn.Module, args: tuple, output: Any) -> Any:
        run = active_run()
        if run is None:
            raise PlanError(f"{path}: a planned submodule ran outside its model's forward pass.")
        for spec in specs:

            def gather(value: Any, spec: GatherOutput = spec) -> Any:
                return run.gather(path, spec, value, grad_rule="reduce_scatter")

            try:
                output = gather_output(path or "<model>", spec, output, gather)
            except PlanError:
                run.abandon()
                raise
        return output

    return hook


_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _hidden_tensors(func: str, what: str, tree: Any) -> None:
    """Raise PlanError when ``tree`` holds tensors that require grad inside containers
    ``torch.utils._pytree`` does not know (an unregistered dataclass, Mapping subclass or
    object): the plan could not give them their gradient rule, and their gradients would be
    wrong by a factor of N, silently."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, (torch.Tensor, *_PLAIN)):
            continue
        if isinstance(leaf, Mapping):
            inner: Any = leaf.values()
        elif isinstance(leaf, (list, tuple, set)):
            inner = leaf
        else:
            inner = vars(leaf).values() if hasattr(leaf, "__dict__") else ()
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in inner):
            raise PlanError(
                f"{func}: {what} holds tensors that require grad inside a "
                f"{type(leaf).__module__}.{type(leaf).__qualname__}, which "
                "torch.utils._pytree cannot see into, so the plan cannot give them their "
                "gradient rule; register the type (torch.utils._pytree.register_dataclass or "
                "register_pytree_node), or pass them in tuples, lists or dicts."
            )


def _sp_group_of(like: torch.Tensor) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, world size, rank) of the SP group in force for this forward pass."""
    backend, g, n = resolve("apply_plan", like, None)
    return g, n, backend.rank(g)


def _first_tensor(tree: Any) -> torch.Tensor | None:
    return next((t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)), None)


def _boundary_hooks(applied: AppliedPlan) -> tuple[Any, Any]:
    """The model's own pre-hook (start a run under the per-rank convention; whole gradients for
    the inputs) and forward hook (rank-0 gradients for the outputs; end the run)."""
    outer: list[tuple[PlanRun | None, bool]] = []

    def begin(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = active_run()
        if run is not None and not run.replay:
            raise PlanError(
                "apply_plan: a model with an applied SPPlan ran inside the forward pass of "
                "another planned model; apply one plan, to the outer model, that names both "
                "models' shard and gather points."
            )
        like = _first_tensor((args, kwargs))
        group, n, _ = (None, 1, 0) if like is None else _sp_group_of(like)
        sync = n > 1 and torch.is_grad_enabled()
        if sync:
            if not torch.compiler.is_compiling():
                _hidden_tensors("apply_plan", "an input of the planned model", (args, kwargs))
            args, kwargs = pytree.tree_map_only(
                torch.Tensor,
                lambda t: _SumGradient.apply(t, group) if t.requires_grad else t,
                (args, kwargs),
            )
        outer.append((begin_run(), sync))
        if not torch.compiler.is_compiling():  # replays are eager only (see _leave_model)
            applied.runs.add(active_run())  # type: ignore[arg-type]
        enter_per_rank_terms()
        return (args, kwargs) if sync else None

    def finish(mod: torch.nn.Module, args: tuple, output: Any) -> Any:
        # Also runs when the forward pass raised (always_call, output None): then only restore
        # the outer run, so the original error is not masked by an unpaired-name error.
        previous, sync = outer.pop()
        run = active_run()
        exit_per_rank_terms()
        end_run(previous, check=output is not None)
        if output is None or not sync:
            return None
        if not torch.compiler.is_compiling():
            _hidden_tensors("apply_plan", "the planned model's output", output)
        like = _first_tensor(output)
        _, _, rank = (None, 1, 0) if like is None else _sp_group_of(like)
        return pytree.tree_map_only(
            torch.Tensor,
            lambda t: _leave_model(t, rank, run) if t.requires_grad else t,
            output,
        )

    return begin, finish


def _replay_hooks(applied: AppliedPlan) -> tuple[Any, Any]:
    """Hooks for every submodule: when one runs with no planned forward pass in progress but
    inside a backward pass, activation checkpointing is recomputing it; replay the forward pass
    that this backward pass belongs to, under the same convention."""
    started: list[bool] = []

    def pre(mod: torch.nn.Module, args: tuple) -> None:
        if active_run() is not None:
            started.append(False)
            return
        task = torch._C._current_graph_task_id()
        runs = [r for r in applied.runs if task != -1 and r.graph_task == task]
        if not runs:
            started.append(False)  # a plain call outside the model: planned hooks raise
            return
        if any(not r.same_state(runs[0]) for r in runs[1:]):
            raise PlanError(
                "apply_plan: activation checkpointing recomputes a planned submodule during a "
                "backward pass that covers several forward passes with different sequence "
                "lengths, so which one to replay is ambiguous; call backward() after each "
                "forward pass (or keep their lengths equal)."
            )
        begin_run(replay_of=runs[0])
        enter_per_rank_terms()
        started.append(True)

    def post(mod: torch.nn.Module, args: tuple, output: Any) -> None:
        if started.pop():
            exit_per_rank_terms()
            end_run(None, check=False)

    return pre, post


def apply_plan(model: torch.nn.Module, plan: SPPlan) -> AppliedPlan:
    """Shard and gather what ``plan`` names, on every forward pass of ``model``.

    Inputs are found by name in args or kwargs through each module's ``forward`` signature;
    gathered outputs may be a tensor or an element of a tuple. Each forward pass of ``model``
    checks that every name sharded was gathered. Gradients: after ``backward()``, call
    :func:`all_reduce_grads` (``sp_common.all_reduce_grads``) before the optimizer step; the
    gradients of the model's inputs are whole already (see the module docstring). Works under
    ``torch.compile(fullgraph=True)`` (apply the plan before compiling) and under activation
    checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)`` of planned modules: the
    recomputation replays the forward pass). Any error while registering removes the hooks
    already registered and raises :class:`PlanError`.
    """
    if not isinstance(plan, SPPlan):
        raise TypeError(f"apply_plan: plan must be an SPPlan, got {type(plan).__name__}.")
    if model in _APPLIED:
        raise PlanError(
            f"apply_plan: {type(model).__name__} already has an applied SPPlan; remove it first "
            "(handle.remove()) or merge the two plans into one."
        )
    applied = AppliedPlan(model)
    handles = applied._handles
    begin, finish = _boundary_hooks(applied)
    replay_pre, replay_post = _replay_hooks(applied)
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
        for module in model.modules():
            if module is not model:
                handles.append(module.register_forward_pre_hook(replay_pre, prepend=True))
                handles.append(module.register_forward_hook(replay_post, always_call=True))
        handles.append(model.register_forward_hook(finish, always_call=True))
    except Exception as e:
        applied.remove()
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"apply_plan: registering the plan failed: {e}") from e
    _APPLIED[model] = applied
    return applied


def all_reduce_grads(model: torch.nn.Module, group: Any = None) -> None:
    """Sum over the SP group, in place, the gradients of the parameters of every module in
    ``model`` (``model`` itself included) that has an applied plan.

    After ``backward()`` those gradients are each rank's term (see the module docstring); the sum
    is the single-device gradient for every parameter, wherever the plan shards and gathers.
    Parameters outside planned modules are left as they are (their gradients are whole). Call it
    after ``backward()`` and before the optimizer step, as DDP does over data-parallel ranks;
    it runs one collective for which gradients exist, then one per gradient dtype, whatever
    the parameter count. ``group`` as in ``sp_shard`` (default: the active ``sp_group``, else
    the default group).

    With gradient accumulation call it once, after the last ``backward()`` of the step: a
    second call with nothing new since is a no-op.

    Raises:
        PlanError: no module of ``model`` has an applied plan (without a plan, the ops' default
            gradient rules already give whole gradients); a planned module shares a parameter
            with a part of ``model`` outside it (its gradient would mix the two conventions);
            or a gradient this function already summed has changed since (another
            ``backward()`` accumulated into it, or it was zeroed in place: summing again would
            count the earlier part N times).
    """
    planned = [m for m in model.modules() if m in _APPLIED]
    if not planned:
        raise PlanError(
            f"all_reduce_grads: no module of {type(model).__name__} has an applied SPPlan, so "
            "there are no per-rank gradient terms to sum (sp_shard/sp_gather's default rules give "
            "whole gradients); apply a plan first, or sum custom terms with dist.all_reduce."
        )
    params: dict[int, torch.nn.Parameter] = {}
    for module in planned:
        for p in module.parameters():
            params.setdefault(id(p), p)
    inside = {id(sub) for m in planned for sub in m.modules()}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        if id(p) in params and id(owner) not in inside:
            raise PlanError(
                f"all_reduce_grads: parameter {name!r} is shared between a planned module and a "
                "part of the model outside it, so its gradient mixes whole and per-rank terms; "
                "apply the plan to a module that contains every use of the parameter."
            )
    ordered = list(params.values())
    if not ordered:
        return
    _, g, n = resolve("all_reduce_grads", ordered[0], group)
    if n == 1:
        return
    summed_before = [getattr(p.grad, _SUMMED_AT, None) for p in ordered]
    changed = [
        name
        for name, p, version in zip(
            _param_names(model, ordered), ordered, summed_before, strict=True
        )
        if version is not None and p.grad is not None and p.grad._version != version
    ]
    if changed:
        raise PlanError(
            f"all_reduce_grads: the gradients of {changed[:5]} were summed by an earlier "
            "all_reduce_grads and have changed since (another backward() accumulated per-rank "
            "terms into them, or they were zeroed in place), so summing again would count the "
            "earlier part N times. With gradient accumulation call all_reduce_grads once, after "
            "the last backward() before the optimizer step, and zero the gradients with "
            "zero_grad() (set_to_none=True, the default) after the step."
        )
    device = ordered[0].device
    # 1: a gradient to sum; 0: none (or already summed and unchanged: a repeated call is a no-op)
    todo = [p.grad is not None and v is None for p, v in zip(ordered, summed_before, strict=True)]
    present = torch.tensor(todo, dtype=torch.int32, device=device)
    dist.all_reduce(present, group=g)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, count in zip(ordered, present.tolist(), strict=True):
        if count:
            by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group_params in by_dtype.items():
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                for p in group_params
            ]
        )
        dist.all_reduce(flat, group=g)
        offset = 0
        for p in group_params:
            size = p.numel()
            summed = flat[offset : offset + size].view_as(p)
            offset += size
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            setattr(p.grad, _SUMMED_AT, p.grad._version)


# Set on a gradient tensor by all_reduce_grads: its version counter right after the sum.
_SUMMED_AT = "_sp_summed_at_version"


def _param_names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "?") for p in params]
