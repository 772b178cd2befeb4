"""``sp-compare`` output: timing statistics, the printed table, the JSON record and the plot.

Imports no framework; matplotlib is imported only by :func:`write_plot`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases import ATTENTION_OPS, Case, check_description, result_bytes

BACKEND_ORDER = ("torch", "jax")


@dataclass(frozen=True)
class Stats:
    """Median and quartiles of the repeats, in seconds."""

    median: float
    p25: float
    p75: float

    @property
    def iqr(self) -> float:
        return self.p75 - self.p25


@dataclass(frozen=True)
class Row:
    """One op at one shape on one backend: the check and the time of every repeat (torch: the
    slowest rank's time; JAX: the whole call, blocked on the result). No times: the op raised,
    and ``detail`` says what."""

    case: Case
    backend: str
    correct: bool
    detail: str
    times: tuple[float, ...]

    @property
    def stats(self) -> Stats | None:
        if not self.times:
            return None
        if len(self.times) == 1:
            return Stats(self.times[0], self.times[0], self.times[0])
        p25, _, p75 = statistics.quantiles(self.times, n=4, method="inclusive")
        return Stats(statistics.median(self.times), p25, p75)

    @property
    def status(self) -> str:
        return "yes" if self.correct else "NO" if self.times else "error"

    def gbps(self, stats: Stats) -> float:
        """Bytes of one rank's results per second of median time, in GB/s (1e9 bytes)."""
        return result_bytes(self.case) / stats.median / 1e9


def torch_over_jax(rows: Sequence[Row]) -> dict[tuple[str, int], float]:
    """Median torch time / median JAX time per ``(op, seq_len)`` where both ran."""
    medians = {
        (r.case.op, r.case.seq_len, r.backend): stats.median
        for r in rows
        if (stats := r.stats) is not None
    }
    return {
        (op, s): t / medians[(op, s, "jax")]
        for (op, s, b), t in medians.items()
        if b == "torch" and (op, s, "jax") in medians
    }


def format_time(seconds: float) -> str:
    """``"812.0 us"``, ``"3.41 ms"`` or ``"1.20 s"``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def table(rows: Sequence[Row]) -> str:
    """The comparison as a plain text table, one line per op, shape and backend."""
    ratios = torch_over_jax(rows)
    headers = ["op", "backend", "shape", "correct", "median", "IQR", "GB/s", "torch/jax"]
    lines = []
    for r in rows:
        ratio, stats = ratios.get((r.case.op, r.case.seq_len)), r.stats
        timing = ["-"] * 3
        if stats is not None:
            timing = [format_time(stats.median), format_time(stats.iqr), f"{r.gbps(stats):.2f}"]
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        lines.append([r.case.op, r.backend, r.case.label, r.status, *timing, ratio_text])
    from ..testing.tables import format_table

    return format_table(headers, lines)


def footnotes(rows: Sequence[Row]) -> list[str]:
    """What the columns mean, and every failed check or op."""
    attention = [op for op in ATTENTION_OPS if any(r.case.op == op for r in rows)]
    checks = dict.fromkeys(
        f"{'/'.join(attention) if r.case.op in ATTENTION_OPS else 'data movement'} "
        f"{check_description(r.case)}"
        for r in rows
    )
    notes = [
        "correct: on every rank, " + "; ".join(checks),
        "median, IQR (p75 - p25) over the repeats: torch, the slowest rank of each repeat, each "
        "started after a barrier; jax, the jitted shard_map call blocked on its result",
        "GB/s: bytes of one rank's results / median; torch/jax: ratio of the medians",
    ]
    notes += [
        f"{'FAILED' if r.times else 'RAISED'} {r.case.op} {r.backend} {r.case.label}: {r.detail}"
        for r in rows
        if not r.correct
    ]
    return notes


def record(
    rows: Sequence[Row], settings: dict[str, Any], environment: dict[str, Any]
) -> dict[str, Any]:
    """Everything the run measured, with the machine, versions and settings, for ``--json``.
    Timing fields are null for an op that raised."""
    ratios = torch_over_jax(rows)
    results = []
    for r in rows:
        stats = r.stats
        timing: dict[str, Any] = dict.fromkeys(
            ("median_s", "p25_s", "p75_s", "iqr_s", "min_s", "max_s", "gbps")
        )
        if stats is not None:
            timing = {
                "median_s": stats.median,
                "p25_s": stats.p25,
                "p75_s": stats.p75,
                "iqr_s": stats.iqr,
                "min_s": min(r.times),
                "max_s": max(r.times),
                "gbps": r.gbps(stats),
            }
        results.append(
            {
                "op": r.case.op,
                "backend": r.backend,
                "seq_len": r.case.seq_len,
                "shape": list(r.case.shape),
                "dim": r.case.dim,
                "dtype": r.case.dtype,
                "world_size": r.case.world_size,
                "correct": r.correct,
                "check": check_description(r.case),
                "detail": r.detail,
                **timing,
                "result_bytes_per_rank": result_bytes(r.case),
                "torch_over_jax": ratios.get((r.case.op, r.case.seq_len)),
                "warmup": r.case.warmup,
                "times_s": list(r.times),
            }
        )
    return {**environment, "settings": settings, "results": results}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_plot(path: Path, rows: Sequence[Row], title: str) -> None:
    """Median time against sequence length, one panel per op, one line per backend (the band is
    the IQR); log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ops = list(dict.fromkeys(r.case.op for r in rows))
    ncols = min(3, len(ops))
    nrows = -(-len(ops) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops, strict=False):
        for backend in BACKEND_ORDER:
            series = sorted(
                (
                    (r.case.seq_len, stats)
                    for r in rows
                    if r.case.op == op and r.backend == backend and (stats := r.stats) is not None
                ),
                key=lambda point: point[0],
            )
            if not series:
                continue
            xs = [x for x, _ in series]
            ax.plot(xs, [st.median * 1e3 for _, st in series], marker="o", label=backend)
            lo, hi = [st.p25 * 1e3 for _, st in series], [st.p75 * 1e3 for _, st in series]
            ax.fill_between(xs, lo, hi, alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lengths = sorted({r.case.seq_len for r in rows})
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(op)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    for ax in axes.flat[len(ops) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
