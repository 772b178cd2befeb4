"""The gradient rules of shard and gather, and which ones apply by default.

Two conventions exist for the gradient of a tensor that is the same on every rank (replicated):

- *replicated loss* (the default): every rank computes the same loss, so every rank's gradient of
  a replicated tensor is the whole gradient. ``sp_shard``'s backward is then the gather of the
  gradient chunks (``"gather"``) and ``sp_gather``'s the slice (``"slice"``).
- *per-rank terms*: each rank computes its own term of one loss (the loss is their sum), so a
  rank's gradient of a replicated tensor is its own term, and the sum over ranks is the whole
  gradient. ``sp_shard``'s backward keeps this rank's chunk in place with zeros elsewhere
  (``"local"``) and ``sp_gather``'s sums over ranks, then slices (``"reduce_scatter"``).

A torch module with an applied ``SPPlan`` runs its forward pass under the per-rank convention
(see ``backend_torch.plan``), so there the defaults switch to ``"local"`` and
``"reduce_scatter"``, and an explicit replicated-loss rule is an error. Pure Python: no
framework is imported here.
"""

from __future__ import annotations

import threading
from typing import Literal

ShardGradRule = Literal["gather", "local"]
GatherGradRule = Literal["slice", "reduce_scatter"]
SHARD_GRAD_RULES: tuple[ShardGradRule, ...] = ("gather", "local")
GATHER_GRAD_RULES: tuple[GatherGradRule, ...] = ("slice", "reduce_scatter")


# Per thread: how many torch plan forward passes are running (they nest with replays). A plain
# thread-local read with getattr (not a threading.local subclass with class defaults), so that
# torch.compile traces its reads and writes.
_CONVENTION = threading.local()
_CONVENTION.per_rank_terms = 0  # set here for the main thread: compiled code guards on one state


def _depth() -> int:
    return getattr(_CONVENTION, "per_rank_terms", 0)  # type: ignore[no-any-return]


def enter_per_rank_terms() -> None:
    """A torch plan's forward pass (or a replay of one) starts."""
    _CONVENTION.per_rank_terms = _depth() + 1


def exit_per_rank_terms() -> None:
    _CONVENTION.per_rank_terms = _depth() - 1


def per_rank_terms(framework: str) -> bool:
    """Whether ``framework``'s ops run under a torch plan's per-rank convention now."""
    return framework == "torch" and _depth() > 0


_IN_PLAN = (
    "inside the forward pass of a torch module with an applied SPPlan, where every rank's "
    "gradient is its own term of the loss (the plan and sp_common.all_reduce_grads sum "
    "them); leave grad_rule out there"
)


def shard_rule(func: str, rule: object, framework: str) -> ShardGradRule:
    """The rule for ``func``'s backward: ``rule``, or the default of the convention in force."""
    in_plan = per_rank_terms(framework)
    if rule is None:
        return "local" if in_plan else "gather"
    if rule not in SHARD_GRAD_RULES:
        raise ValueError(
            f"{func}: grad_rule={rule!r} is not one of {SHARD_GRAD_RULES}; use 'gather' when "
            "every rank computes the same loss (the gradient of the replicated input is then the "
            "gather of the chunks' gradients), 'local' when each rank computes its own term of "
            "the loss (each rank's gradient is then its own chunk's, zeros elsewhere)."
        )
    if in_plan and rule == "gather":
        raise ValueError(
            f"{func}: grad_rule='gather' is the replicated-loss rule, used {_IN_PLAN}."
        )
    return rule  # type: ignore[return-value]


def gather_rule(func: str, rule: object, framework: str) -> GatherGradRule:
    """As :func:`shard_rule`, for ``sp_gather``."""
    in_plan = per_rank_terms(framework)
    if rule is None:
        return "reduce_scatter" if in_plan else "slice"
    if rule not in GATHER_GRAD_RULES:
        raise ValueError(
            f"{func}: grad_rule={rule!r} is not one of {GATHER_GRAD_RULES}; use 'slice' when "
            "every rank computes the same loss after the gather, 'reduce_scatter' when ranks "
            "compute different terms of one loss."
        )
    if in_plan and rule == "slice":
        raise ValueError(f"{func}: grad_rule='slice' is the replicated-loss rule, used {_IN_PLAN}.")
    return rule  # type: ignore[return-value]
