"""``sp-compare`` (also ``python -m sp_common``): the sp_common ops on torch and JAX, side by side.

For every op, sequence length and backend it checks the result against a numpy reference on every
rank, times it after warm-up, and prints one table::

    sp-compare --world-size 4 --shape 1,4096,256 --dim 1 --seq-lens 1024,2048,4096 \\
        --json out/compare.json --plot out/compare.png

torch runs on N spawned ranks: gloo on the CPU, or NCCL when N CUDA devices are present. JAX runs
``jit(shard_map(...))`` on N devices of its platform: on the CPU, N host devices made with
``--xla_force_host_platform_device_count``. Bad arguments, output paths included, get a one-line
error and exit status 2 before any work; a failed check exits 1.

Importing this module imports no framework: torch and JAX are imported when a run needs them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TextIO

from .cases import (
    ATTENTION_OPS,
    DEFAULT_OPS,
    DTYPES,
    FLOAT_DTYPES,
    OP_DESCRIPTIONS,
    OPS,
    Case,
    scatter_dim_for,
)
from .report import Row, footnotes, record, table, write_json, write_plot

BACKENDS = ("torch", "jax")
PROG = "sp-compare"


class CompareError(Exception):
    """A bad argument or an unusable machine: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CompareError(f"{message} (see {PROG} --help)")


@dataclass(frozen=True)
class Settings:
    """The validated command line. ``shape`` is the global shape whose size at ``dim`` each
    ``seq_lens`` value replaces."""

    backends: tuple[str, ...]
    world_size: int
    shape: tuple[int, ...]
    dim: int
    dtype: str
    ops: tuple[str, ...]
    ops_given: bool
    heads: int
    repeats: int
    warmup: int
    seq_lens: tuple[int, ...]
    device: str
    json: Path | None
    plot: Path | None


def _parser() -> argparse.ArgumentParser:
    ops = "\n".join(f"  {name:<13} {text}" for name, text in OP_DESCRIPTIONS.items())
    attention = ", ".join(ATTENTION_OPS)
    p = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the sp_common ops on N torch ranks and on an N-device JAX mesh, check "
        f"every rank's result against numpy (bitwise; the attention ops {attention}: allclose "
        "to float64 numpy attention), time them after warm-up and print one table.",
        epilog=f"ops:\n{ops}\n\n'padded' runs on S - 1 tokens when N divides S, so it always "
        f"pads. The attention ops ({attention}) need a float dtype and --dim 1 (any head "
        "count); a [B, S, hidden] --shape becomes [B, S, --heads, hidden / --heads]. "
        "sp_attention's strategy 'usp' is not offered: it needs a two-axis group, and "
        "sp-compare runs one axis of N; 'auto' runs one of allgather_kv, ring, ulysses. Exit "
        "status: 0 all correct, 1 a check failed or an op raised, 2 bad arguments (reported "
        "before any work, --json and --plot paths included).",
    )
    p.add_argument("--backends", default="torch,jax", help="comma-separated (default torch,jax)")
    p.add_argument(
        "--world-size",
        "-n",
        type=int,
        default=4,
        metavar="N",
        help="torch ranks, JAX devices (default 4)",
    )
    p.add_argument(
        "--shape", default="1,4096,256", metavar="B,S,H", help="global shape (default 1,4096,256)"
    )
    p.add_argument("--dim", type=int, default=1, help="the sequence dim of --shape (default 1)")
    p.add_argument(
        "--dtype",
        default="float32",
        help=f"one of {', '.join(DTYPES)} (attention ops: the float ones)",
    )
    p.add_argument(
        "--ops",
        help=f"comma-separated from {','.join(OPS)} (default: those of {','.join(DEFAULT_OPS)} "
        "that fit)",
    )
    p.add_argument("--heads", type=int, default=8, help="attention ops: H = heads x D (default 8)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per op (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument(
        "--seq-lens",
        metavar="S1,S2,...",
        help="sweep: run with each size at --dim (default: the size in --shape)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="auto (default): GPUs where a backend sees N of them, else the CPU",
    )
    p.add_argument("--json", metavar="FILE", help="write every figure, with settings")
    p.add_argument("--plot", metavar="FILE.png", help="time vs sequence length")
    return p


def _names(text: str, option: str, known: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in known:
            raise CompareError(f"{option}: unknown name {name!r}; choose from {', '.join(known)}")
    if not names:
        raise CompareError(f"{option}: empty; choose from {', '.join(known)}")
    return names


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise CompareError(
            f"{option} {text!r}: not a list of integers; write e.g. 1,4096,256"
        ) from None
    if any(v < 1 for v in values):
        raise CompareError(f"{option} {text!r}: every size must be at least 1")
    return values


def _at_least(value: int, low: int, option: str, why: str) -> None:
    if value < low:
        raise CompareError(f"{option} {value}: must be at least {low} ({why})")


def output_path(option: str, text: str | None, example: str) -> Path | None:
    """``text`` as the file ``option`` writes at the end of the run, checked up front.

    CompareError unless it names a file (not a folder) in an existing folder and this process
    can open it for writing (tried here; a file the try creates is removed again), so that a bad
    path costs a one-line error, not a finished sweep. ``example`` is a file name to suggest.
    """
    if text is None:
        return None
    path = Path(text)
    folder = path.parent
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise CompareError(
            f"{option} {text}: is a folder, not a file; name a file, e.g. {path / example}"
        )
    if not folder.exists():
        raise CompareError(
            f"{option} {text}: the folder {folder} does not exist; create it or name a file in "
            "an existing folder"
        )
    if not folder.is_dir():
        raise CompareError(
            f"{option} {text}: {folder} is a file, not a folder; name a file in an existing folder"
        )
    existed = path.exists()
    try:  # the one sure test (os.access is not, for root or /proc): open it as the run will
        path.open("ab").close()
    except OSError as e:
        raise CompareError(
            f"{option} {text}: cannot be written ({e.strerror}); name a file in a folder you can "
            "write to"
        ) from None
    if not existed:
        path.unlink()
    return path


def parse_args(argv: Sequence[str] | None) -> Settings:
    """The command line as :class:`Settings`; CompareError for anything malformed."""
    a = _parser().parse_args(argv)
    shape = _ints(a.shape, "--shape")
    if not -len(shape) <= a.dim < len(shape):
        raise CompareError(
            f"--dim {a.dim}: out of range for --shape {a.shape} ({len(shape)} dims); use a dim in "
            f"[{-len(shape)}, {len(shape) - 1}]"
        )
    dim = a.dim % len(shape)
    if a.dtype not in DTYPES:
        raise CompareError(f"--dtype: unknown dtype {a.dtype!r}; choose from {', '.join(DTYPES)}")
    _at_least(a.world_size, 2, "--world-size", "at 1 every op is the identity")
    _at_least(a.repeats, 1, "--repeats", "the median needs a timed call")
    _at_least(a.warmup, 0, "--warmup", "a count of calls")
    _at_least(a.heads, 1, "--heads", "a count of heads")
    json_path = output_path("--json", a.json, "compare.json")
    plot_path = output_path("--plot", a.plot, "compare.png")
    if (
        json_path is not None
        and plot_path is not None
        and json_path.resolve() == plot_path.resolve()
    ):
        raise CompareError(
            f"--json {a.json} and --plot {a.plot} name the same file; give each its own file"
        )
    _require_extra()
    return Settings(
        backends=_names(a.backends, "--backends", BACKENDS),
        world_size=a.world_size,
        shape=shape,
        dim=dim,
        dtype=a.dtype,
        ops=DEFAULT_OPS if a.ops is None else _names(a.ops, "--ops", OPS),
        ops_given=a.ops is not None,
        heads=a.heads,
        repeats=a.repeats,
        warmup=a.warmup,
        seq_lens=(shape[dim],) if a.seq_lens is None else _ints(a.seq_lens, "--seq-lens"),
        device=a.device,
        json=json_path,
        plot=plot_path,
    )


# ------------------------------------------------------------------------------------ planning


def _op_shape(op: str, s: Settings, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The global shape ``op`` runs on, for the sweep shape ``shape``."""
    n, size = s.world_size, shape[s.dim]
    if op == "padded" and size % n == 0 and size > 1:
        return (*shape[: s.dim], size - 1, *shape[s.dim + 1 :])
    if op in ATTENTION_OPS and len(shape) == 3:
        return (*shape[:2], s.heads, shape[2] // s.heads)
    return shape


def _unfit(op: str, s: Settings, shape: tuple[int, ...]) -> str | None:
    """Why ``op`` cannot run on ``shape`` whatever the sequence length, or None."""
    n = s.world_size
    if op == "all-to-all":
        if len(shape) < 2:
            return "all-to-all needs a second dim to scatter; pass a shape with 2 or more dims"
        scatter = scatter_dim_for(len(shape), s.dim)
        if shape[scatter] % n:
            return (
                f"all-to-all scatters dim {scatter} of size {shape[scatter]}, which world size "
                f"{n} does not divide; use a multiple of {n} there"
            )
    if op in ATTENTION_OPS:
        if s.dtype not in FLOAT_DTYPES:
            return f"{op} needs a float dtype, not {s.dtype}; pass --dtype float32"
        if s.dim != 1 or len(shape) not in (3, 4):
            return f"{op} needs --dim 1 and a [B, S, hidden] or [B, S, heads, D] shape"
        if len(shape) == 3 and shape[2] % s.heads:
            return f"{op}: --heads {s.heads} does not divide the hidden size {shape[2]}"
    return None


def plan(s: Settings) -> tuple[list[Case], list[str]]:
    """The cases to run (sweep-major) and notes about ops left out; CompareError when an op
    named with ``--ops`` cannot run, or N does not divide a sequence length."""
    cases, notes = [], []
    ops = list(s.ops)
    for seq_len in s.seq_lens:
        if seq_len % s.world_size and ops != ["padded"]:
            raise CompareError(
                f"sequence length {seq_len} (dim {s.dim}) is not divisible by world size "
                f"{s.world_size}, as every op but padded needs; use a multiple "
                f"of {s.world_size}, or --ops padded"
            )
    for op in list(ops):
        reason = _unfit(op, s, s.shape)
        if reason is None:
            continue
        if s.ops_given:
            raise CompareError(f"--ops {op}: {reason}")
        ops.remove(op)
        notes.append(f"left out {op}: {reason}")
    for seq_len in s.seq_lens:
        shape = (*s.shape[: s.dim], seq_len, *s.shape[s.dim + 1 :])
        for op in ops:
            cases.append(
                Case(
                    op=op,
                    shape=_op_shape(op, s, shape),
                    dim=s.dim,
                    dtype=s.dtype,
                    world_size=s.world_size,
                    seq_len=seq_len,
                    warmup=s.warmup,
                    repeats=s.repeats,
                )
            )
    return cases, notes


# ------------------------------------------------------------------------------------- devices


EXTRA = ("numpy", "ml_dtypes", "tqdm", "tabulate", "matplotlib")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, a broken install
        return False


def _require_extra() -> None:
    """CompareError naming what to install when the ``compare`` extra is missing (checked
    after the arguments, so ``--help`` and argument errors work without it)."""
    missing = [m for m in EXTRA if not _installed(m)]
    if missing:
        raise CompareError(
            f"{PROG} needs {', '.join(missing)} (not installed); pip install 'sp-sharding[compare]'"
        )


def _require(framework: str) -> None:
    if importlib.util.find_spec(framework) is None:
        raise CompareError(
            f"--backends {framework}: {framework} is not installed; pip install "
            f"'sp-sharding[{framework}]' or leave it out of --backends"
        )


def _smaller_or_cpu(gpus: int) -> str:
    return f"pass --world-size {gpus} or less, or --device cpu" if gpus > 1 else "pass --device cpu"


def torch_device(s: Settings) -> str:
    """``"cuda"`` or ``"cpu"`` for the torch ranks; CompareError when ``--device gpu`` asks for
    more GPUs than there are."""
    _require("torch")
    if s.device == "cpu":
        return "cpu"
    from ..testing.ranks import cuda_device_count

    gpus = cuda_device_count()
    if gpus >= s.world_size:
        return "cuda"
    if s.device == "gpu":
        raise CompareError(
            f"--world-size {s.world_size} is larger than the {gpus} CUDA device(s) torch sees; "
            + _smaller_or_cpu(gpus)
        )
    return "cpu"


def jax_devices(s: Settings) -> list[Any]:
    """The first N devices for the JAX mesh; CompareError when there are fewer."""
    _require("jax")
    if "jax" not in sys.modules:  # both are read when JAX starts its backends
        flag = f"--xla_force_host_platform_device_count={s.world_size}"  # N host devices
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        # JAX would take 75% of every GPU up front, starving the torch ranks on the same GPUs.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from .run_jax import devices

    if s.device != "cpu":
        gpus = devices("gpu")
        if len(gpus) >= s.world_size:
            return gpus[: s.world_size]
        if s.device == "gpu":
            raise CompareError(
                f"--world-size {s.world_size} is larger than the {len(gpus)} GPU device(s) JAX "
                "sees; " + _smaller_or_cpu(len(gpus))
            )
    cpus = devices("cpu")
    if len(cpus) < s.world_size:
        raise CompareError(
            f"--world-size {s.world_size} is larger than the {len(cpus)} CPU devices JAX was "
            "started with (it was imported before sp-compare could set "
            "--xla_force_host_platform_device_count); run sp-compare in a fresh process"
        )
    return cpus[: s.world_size]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(placement: dict[str, str]) -> dict[str, Any]:
    """The machine, the versions and where each backend ran, for the JSON record."""
    return {
        "tool": PROG,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            d: _version(d) for d in ("sp-sharding", "torch", "jax", "jaxlib", "numpy", "ml_dtypes")
        },
        "placement": placement,
    }


# ------------------------------------------------------------------------------------- running


class Progress:
    """A tqdm progress bar on ``stream``, drawn once the run has taken more than ``after_s``
    seconds; the step just finished is its postfix."""

    def __init__(self, total: int, after_s: float = 3.0, stream: TextIO = sys.stderr) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, delay=after_s, mininterval=0, file=stream, unit="case", leave=False
        )

    def step(self, backend: str, case: Case) -> None:
        self.bar.set_postfix_str(f"{backend} {case.op} {case.label}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Placement(NamedTuple):
    """Where one backend runs: ``target`` is the torch device (``"cpu"``/``"cuda"``) or the
    list of JAX devices; ``words`` says it for the header and the JSON record."""

    backend: str
    target: Any
    words: str


def placements(s: Settings) -> list[Placement]:
    """Where each backend of ``s`` runs; CompareError when the machine cannot give it N ranks or
    devices."""
    found = []
    if "torch" in s.backends:
        device = torch_device(s)
        kind = "NCCL on CUDA" if device == "cuda" else "gloo on the CPU"
        found.append(Placement("torch", device, f"{s.world_size} ranks, {kind}"))
    if "jax" in s.backends:
        mesh = jax_devices(s)
        found.append(Placement("jax", mesh, f"{s.world_size} {mesh[0].platform} devices"))
    return found


def run(s: Settings, cases: list[Case], jobs: list[Placement]) -> list[Row]:
    """Every case on every backend of ``jobs``: rows in table order (op, length, backend)."""
    found: dict[tuple[str, str, int], Row] = {}
    progress = Progress(len(cases) * len(jobs))
    try:
        for job in jobs:
            backend = job.backend
            if backend == "torch":
                from .run_torch import run_cases as run_torch

                results = run_torch(
                    cases, s.world_size, job.target, lambda c: progress.step("torch", c)
                )
            else:
                from .run_jax import run_cases as run_jax

                results = run_jax(cases, job.target, lambda c: progress.step("jax", c))
            for case, ok, detail, times in results:
                found[(case.op, backend, case.seq_len)] = Row(
                    case, backend, ok, detail, tuple(times)
                )
    finally:
        progress.close()
    return [
        found[(c.op, b, c.seq_len)]
        for c in sorted(cases, key=lambda c: (OPS.index(c.op), c.seq_len))
        for b in s.backends
    ]


def _settings_record(s: Settings) -> dict[str, Any]:
    record = asdict(s)
    record["json"], record["plot"] = (None if p is None else str(p) for p in (s.json, s.plot))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; 0 when every check passed, 1 when one failed (or a result file could
    not be written after the run), 2 for bad arguments, all reported before any work."""
    from ..testing.ranks import RankFailure

    try:
        s = parse_args(argv)
        cases, notes = plan(s)
        jobs = placements(s)
        for note in notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
        rows = run(s, cases, jobs)
    except CompareError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    placement = {job.backend: job.words for job in jobs}
    where = "; ".join(f"{b}: {p}" for b, p in placement.items())
    print(
        f"{PROG}: world size {s.world_size}, {s.dtype}, dim {s.dim}; {where}; median of "
        f"{s.repeats} repeats after {s.warmup} warm-up calls"
    )
    print(table(rows))
    for note in footnotes(rows):
        print(f"  {note}")
    try:
        if s.json is not None:
            write_json(s.json, record(rows, _settings_record(s), environment(placement)))
            print(f"wrote {s.json}")
        if s.plot is not None:
            title = f"sp_common, world size {s.world_size}, {s.dtype}; {where}"
            write_plot(s.plot, rows, title)
            print(f"wrote {s.plot}")
    except OSError as e:  # checked up front; this is a full disk or a folder removed meanwhile
        print(f"{PROG}: error: could not write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    return 0 if all(r.correct for r in rows) else 1
