"""What the model-library examples share: the relative difference of a sharded result from the
unsharded one, and the printed verdict with the exit status."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


def relative(got: Any, want: Any) -> float:
    """``max |got - want| / max(1, max |want|)`` (float64; infinite for a missing ``got``)."""
    if got is None:
        return float("inf")
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    return float(np.abs(got - want).max(initial=0.0) / scale)


def worst(runs: list[tuple[Mapping[str, Any], Mapping[str, Any]]], output: str) -> dict[str, float]:
    """The largest :func:`relative` over ``(sharded, unsharded)`` result maps: of the entry named
    ``output``, and of every other entry (the parameter gradients). A gradient only one side has
    counts as infinite."""
    found = {output: 0.0, "gradients": 0.0}
    for sharded, unsharded in runs:
        if sharded.keys() != unsharded.keys():
            found["gradients"] = float("inf")
        for key, want in unsharded.items():
            kind = output if key == output else "gradients"
            found[kind] = max(found[kind], relative(sharded.get(key), want))
    return found


def verdict(title: str, differences: Mapping[str, float], tol: float) -> int:
    """Print ``title`` and each max difference against ``tol``; 0 when all are within it, else
    1 (with the failed ones on stderr)."""
    print(title)
    for kind, diff in differences.items():
        print(f"  max |difference| of the {kind:9s} {diff:.3g} (tolerance {tol:g})")
    failed = [kind for kind, diff in differences.items() if not diff <= tol]
    if failed:
        print(f"FAILED: {', '.join(failed)} beyond the tolerance", file=sys.stderr)
        return 1
    print("OK")
    return 0
