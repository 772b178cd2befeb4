"""Sequence-parallel plans: which inputs to shard and which outputs to gather, as plain data.

A plan is applied from outside the model (torch: ``backend_torch.plan.apply_plan`` with module
hooks; JAX: ``backend_jax.plan.apply_plan``, a ``shard_map`` transform). Nothing in a plan is
ever skipped: a tensor whose ndim differs from the plan, a planned input that is missing, or a
shard never gathered raises :class:`PlanError` naming the module path, the argument and the
shapes. Shards and gathers pair by ``name``; padding added by a shard is removed by the gather of
the same name.
"""

from __future__ import annotations

import dataclasses
import numbers
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .api import sp_gather, sp_shard, sp_shard_with_padding
from .backend import backend_for, plan_backend
from .layouts import Layout, check_layout


class PlanError(ValueError):
    """A plan does not match the model or the tensors it sees."""


def _check_fields(spec: Any, types: Mapping[str, tuple[type, ...]]) -> None:
    """Check that each field of the frozen ``spec`` holds one of its ``types``; TypeError naming
    the spec, the field and the value otherwise. An integer of another type (``numpy.int64``)
    where ``int`` is expected is stored as an ``int``, as ``sp_shard`` takes it."""
    cls = type(spec).__name__
    for field, allowed in types.items():
        value = getattr(spec, field)
        # bool is an int in Python; it is never a dim, index or position here.
        if isinstance(value, bool) and bool not in allowed:
            pass
        elif int in allowed and isinstance(value, numbers.Integral):
            object.__setattr__(spec, field, int(value))
            continue
        elif isinstance(value, allowed):
            continue
        names = " or ".join(
            {type(None): "None", numbers.Number: "a number"}.get(t, t.__name__) for t in allowed
        )
        raise TypeError(
            f"{cls}: {field} must be {names}, got {value!r} of type {type(value).__name__}; "
            f"pass {names}."
        )


@dataclasses.dataclass(frozen=True)
class ShardInput:
    """Shard input ``arg`` (a parameter name, or a position) on ``dim`` before the module runs.

    Shapes: ``[.., S, ..] -> [.., S/N, ..]`` (``pad=True``: ``[.., ceil(S/N), ..]``, the padding
    removed by the :class:`GatherOutput` with the same ``name``). ``ndim``, when given, is the
    input's expected number of dims.

    ``layout``: ``"contiguous"`` or ``"zigzag"`` (see ``sp_common.layouts``); the
    :class:`GatherOutput` of the same name gathers in the same layout, and ``sp_attention``
    inside the forward pass must be called with it.

    ``gather=False`` marks an input that is consumed and never gathered (token ids,
    ``position_ids``, the text stream of a joint-attention model): its name must have no
    :class:`GatherOutput`. A name is sharded at most once per forward pass while it is open
    (sharded and not yet gathered); a ``gather=False`` name at most once per forward pass.
    """

    arg: str | int
    dim: int
    ndim: int | None = None
    pad: bool = False
    pad_value: float = 0.0
    name: str = "sequence"
    gather: bool = True
    layout: str = "contiguous"

    def __post_init__(self) -> None:
        check_layout("ShardInput", self.layout)
        _check_fields(
            self,
            {
                "arg": (str, int),
                "dim": (int,),
                "ndim": (int, type(None)),
                "pad": (bool,),
                # a bool pads a bool tensor; the dtype's limits are checked when it pads
                "pad_value": (numbers.Number, bool),
                "name": (str,),
                "gather": (bool,),
                "layout": (str,),
            },
        )


@dataclasses.dataclass(frozen=True)
class GatherOutput:
    """Gather the module's output (or element ``index`` of a tuple output) on ``dim``.

    Shapes: ``[.., s, ..] -> [.., N*s - pad, ..]`` where ``pad`` is what the shard of the same
    ``name`` added. ``ndim``, when given, is the output's expected number of dims.
    """

    dim: int
    index: int | None = None
    ndim: int | None = None
    name: str = "sequence"

    def __post_init__(self) -> None:
        _check_fields(
            self,
            {
                "dim": (int,),
                "index": (int, type(None)),
                "ndim": (int, type(None)),
                "name": (str,),
            },
        )


Spec = ShardInput | GatherOutput


@dataclasses.dataclass(frozen=True)
class SPPlan:
    """Module path -> the shards and gathers applied there.

    ``""`` is the model itself; ``"blocks.*"`` is every child of ``blocks`` (a list of blocks);
    a single spec may stand for a one-element tuple::

        SPPlan({
            "patch_embed": ShardInput("x", dim=1, pad=True),
            "proj_out": GatherOutput(dim=1),
        })
    """

    entries: Mapping[str, Spec | Sequence[Spec]]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, Mapping):
            raise TypeError(
                f"SPPlan: entries must be a mapping of module path to specs, got "
                f"{self.entries!r}; pass e.g. {{'blocks.*': ShardInput('x', dim=1)}}."
            )
        normalized: dict[str, tuple[Spec, ...]] = {}
        for path, specs in self.entries.items():
            if not isinstance(path, str):
                raise TypeError(f"SPPlan: module path {path!r} must be a str such as 'blocks.*'.")
            if isinstance(specs, (ShardInput, GatherOutput)):
                group: tuple[Any, ...] = (specs,)
            elif isinstance(specs, (list, tuple)):
                group = tuple(specs)
            else:
                group = (specs,)
            for spec in group:
                if not isinstance(spec, (ShardInput, GatherOutput)):
                    raise TypeError(
                        f"SPPlan: entry {path!r} holds {spec!r}; use ShardInput(...) or "
                        "GatherOutput(...)."
                    )
            normalized[path] = group
        object.__setattr__(self, "entries", normalized)
        shards = [s for specs in normalized.values() for s in specs if isinstance(s, ShardInput)]
        sharded = {s.name for s in shards if s.gather}
        consumed = {s.name for s in shards if not s.gather}
        gathered = {
            s.name for specs in normalized.values() for s in specs if isinstance(s, GatherOutput)
        }
        if consumed & (sharded | gathered):
            raise PlanError(
                f"SPPlan: names {sorted(consumed & (sharded | gathered))} are sharded with "
                "gather=False (consumed, never gathered) but also gathered or sharded to be "
                "gathered; give the consumed input a name of its own."
            )
        if sharded != gathered:
            raise PlanError(
                f"SPPlan: names sharded but never gathered: {sorted(sharded - gathered)}; "
                f"gathered but never sharded: {sorted(gathered - sharded)}; give every "
                "ShardInput a GatherOutput with the same name, or mark an input that is consumed "
                "and never gathered with ShardInput(..., gather=False)."
            )

    def specs(self) -> Mapping[str, tuple[Spec, ...]]:
        return self.entries  # type: ignore[return-value]


class PlanRun:
    """One forward pass under a plan: pads and lengths by name, and which names are open.

    ``replay_of``: a run that re-executes part of an earlier forward pass (activation
    checkpointing recomputes a planned submodule during backward): it starts from that pass's
    pads and lengths and checks no pairing (the original pass did).
    """

    def __init__(self, replay_of: PlanRun | None = None) -> None:
        self.pads: dict[str, int] = {} if replay_of is None else dict(replay_of.pads)
        self.lengths: dict[str, int] = {} if replay_of is None else dict(replay_of.lengths)
        self.layouts: dict[str, Layout] = {} if replay_of is None else dict(replay_of.layouts)
        self.open: dict[str, str] = {}  # name -> where it was sharded
        self.consumed: dict[str, str] = {}  # gather=False name -> where it was sharded
        self.replay = replay_of is not None
        self.graph_task: int | None = None  # torch: the backward pass that last reached it

    def shard(self, path: str, spec: ShardInput, value: Any, **rule: Any) -> Any:
        """Shard ``value`` (the input ``spec.arg`` of module ``path``) as the plan says.
        ``rule``: an explicit ``grad_rule=`` for the shard (the torch plan's per-rank rule)."""
        where = f"{path or '<model>'} input {spec.arg!r}"
        try:
            shape = _checked_shape(where, value, spec.ndim)
            earlier = self.open.get(spec.name) or self.consumed.get(spec.name)
            if earlier is not None and not self.replay:
                raise PlanError(
                    f"{where}: shards {spec.name!r}, which {earlier} already sharded in this "
                    "forward pass and which is not gathered yet; its padding and length would be "
                    "overwritten. Give each sharded input a name of its own "
                    "(ShardInput(..., name=...))."
                )
        except PlanError as e:
            _announce("SP plan shard", value, spec.dim, e)
            raise
        layout = check_layout("ShardInput", spec.layout)
        if spec.pad:
            out, pad = sp_shard_with_padding(value, spec.dim, spec.pad_value, layout=layout, **rule)
        else:
            out, pad = sp_shard(value, spec.dim, layout=layout, **rule), 0
        self.pads[spec.name] = pad
        self.lengths[spec.name] = shape[spec.dim]
        self.layouts[spec.name] = layout
        (self.open if spec.gather else self.consumed)[spec.name] = where
        return out

    def gather(self, path: str, spec: GatherOutput, value: Any, **rule: Any) -> Any:
        """Gather ``value`` (an output of module ``path``), removing the padding of its name."""
        where = f"{path or '<model>'} output" + ("" if spec.index is None else f"[{spec.index}]")
        # Closed first: if the checks below raise, the end of the forward pass must not report
        # the same name again as "never gathered".
        self.open.pop(spec.name, None)
        try:
            _checked_shape(where, value, spec.ndim)
            if spec.name not in self.pads:
                raise PlanError(
                    f"{where}: gathers {spec.name!r}, which no ShardInput has sharded in this "
                    "forward pass; check the order of the modules in the plan."
                )
        except PlanError as e:
            _announce("SP plan gather", value, spec.dim, e)
            raise
        layout = self.layouts.get(spec.name, "contiguous")
        return sp_gather(value, spec.dim, pad_size=self.pads[spec.name], layout=layout, **rule)

    def abandon(self) -> None:
        """Forget the open names: the forward pass is failing with an error of its own."""
        self.open.clear()

    def finish(self) -> None:
        """Raise if a name sharded in this forward pass was not gathered."""
        if self.open and not self.replay:
            listing = ", ".join(f"{name!r} (sharded at {w})" for name, w in self.open.items())
            raise PlanError(
                f"SP plan: sharded but never gathered in this forward pass: {listing}; the "
                "module that gathers it did not run (an input that is consumed and never "
                "gathered takes ShardInput(..., gather=False))."
            )

    def same_state(self, other: PlanRun) -> bool:
        mine, theirs = (
            (self.pads, self.lengths, self.layouts),
            (other.pads, other.lengths, other.layouts),
        )
        return mine == theirs


_NO_DEFAULT: Any = object()


def planned_seq_len(name: str = "sequence", *, default: Any = _NO_DEFAULT) -> Any:
    """The length, before sharding and padding, of the sequence a plan sharded under ``name``
    in the forward pass running now: what ``sp_ulysses_attention`` needs as ``seq_len`` when the
    plan pads (``ShardInput(..., pad=True)``). Model code that also runs unplanned passes
    ``default`` (e.g. ``None``), returned when no planned forward pass is running::

        out = sp_ulysses_attention(q, k, v, seq_len=planned_seq_len(default=None))

    Raises:
        PlanError: no planned forward pass is running here (and no ``default``), or none of its
            inputs was sharded under ``name`` (the message lists the names that were).
    """
    if not isinstance(name, str):
        raise TypeError(
            f"planned_seq_len: name must be a str (the ShardInput's name), got {name!r} of type "
            f"{type(name).__name__}."
        )
    run = active_run()
    if run is None:
        if default is not _NO_DEFAULT:
            return default
        raise PlanError(
            f"planned_seq_len: no SP plan forward pass is running, so there is no planned "
            f"sequence {name!r}; call it inside the forward pass of a model with an applied "
            "SPPlan, or pass the real length yourself."
        )
    if name not in run.lengths:
        raise PlanError(
            f"planned_seq_len: this forward pass has sharded no input named {name!r} (yet); "
            f"sharded so far: {sorted(run.lengths)}. Check ShardInput(..., name=...) and that "
            "the shard happens before this call."
        )
    return run.lengths[name]


# The plan run of the forward pass in progress on this thread: a plain thread-local (not a
# ContextVar, nor a threading.local subclass with class defaults) so that torch.compile traces
# its reads and writes.
_ACTIVE = threading.local()
_ACTIVE.run = None  # set here for the main thread: a compiled model then guards on one state


def begin_run(replay_of: PlanRun | None = None) -> PlanRun | None:
    """Start a plan run (a replay of ``replay_of``, when given); return the outer one (restore
    it with :func:`end_run`)."""
    outer = active_run()
    _ACTIVE.run = PlanRun(replay_of)
    return outer


def active_run() -> PlanRun | None:
    return getattr(_ACTIVE, "run", None)


def end_run(outer: PlanRun | None, check: bool = True) -> None:
    """Finish the active run (raising if a name is still open when ``check``) and restore
    ``outer``."""
    run = active_run()
    _ACTIVE.run = outer
    if check and run is not None:
        run.finish()


def _announce(func: str, value: Any, dim: int, failure: Exception) -> None:
    """Debug mode: a rank whose plan check failed still joins the cross-rank check its peers
    run in the shard or gather (so they raise too, instead of waiting for it)."""
    try:
        backend = backend_for(func, value)
    except TypeError:
        return  # not a tensor: no group to announce to
    group = backend.resolve_group(func, None)
    if backend.world_size(group) > 1:
        backend.check_consistent(func, group, {"tensor": value}, {"dim": dim}, failure)


def _checked_shape(where: str, value: Any, ndim: int | None) -> tuple[int, ...]:
    if value is None:
        raise PlanError(f"{where}: the plan shards or gathers it, but it is None (missing).")
    try:
        shape = backend_for("SP plan", value).shape(value)
    except TypeError as e:
        raise PlanError(
            f"{where}: expected a tensor, got {type(value).__name__}; fix the plan's argument "
            "name or index."
        ) from e
    if ndim is not None and len(shape) != ndim:
        raise PlanError(
            f"{where}: the plan expects a {ndim}-d tensor, got shape {shape}; fix the plan or "
            "the input."
        )
    return shape


def all_reduce_grads(model: Any, group: Any = None) -> None:
    """torch: sum the per-rank gradient terms of a planned model's parameters over the SP group
    (see ``backend_torch.plan.all_reduce_grads``): call it after ``backward()`` and before the
    optimizer step. JAX needs no such call (``shard_map`` sums the gradients of replicated
    parameters itself).

    Raises:
        TypeError: ``model`` is not a torch ``nn.Module``.
    """
    try:
        backend = plan_backend("all_reduce_grads", model, None)
    except TypeError:
        backend = None
    if backend is None or backend.framework != "torch":
        raise TypeError(
            f"all_reduce_grads: model must be a torch.nn.Module with an applied SPPlan, got "
            f"{type(model).__name__}; JAX plans need no gradient sum (shard_map does it)."
        )
    backend.all_reduce_grads(model, group)


def apply_plan(target: Any, plan: SPPlan, *, mesh: Any = None, **options: Any) -> Any:
    """Apply ``plan`` to a torch ``nn.Module`` (module hooks; returns a handle whose
    ``remove()`` undoes it) or, with ``mesh``, to a JAX function (returns the planned function).

    See ``backend_torch.plan.apply_plan`` and ``backend_jax.plan.apply_plan``.
    """
    if not isinstance(plan, SPPlan):
        raise TypeError(
            f"apply_plan: plan must be an SPPlan, got {type(plan).__name__}; wrap the mapping: "
            "SPPlan({...})."
        )
    return plan_backend("apply_plan", target, mesh).apply_plan(target, plan, mesh, options)
