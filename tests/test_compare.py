"""The sp-compare tool: a small correct run of every op on both backends, its JSON and plot,
argument errors."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sp_common.compare.cases import ATTENTION_OPS, DEFAULT_OPS, DTYPES, FLOAT_DTYPES, OPS, Case
from sp_common.compare.cli import CompareError, Progress, parse_args, plan

pytestmark = pytest.mark.timeout(180)

SUBPROCESS_TIMEOUT_S = 150
# A sweep that takes seconds: what a bad argument must stop before it starts.
SMALL = ["--world-size", "2", "--shape", "2,6,4", "--heads", "2", "--repeats", "1", "--warmup", "0"]
SMALL += ["--device", "cpu"]


def sp_compare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sp_common", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op ")) + 2
    rows = []
    for line in lines[start:]:
        if not line or line.startswith(" "):
            break
        rows.append(line.split())
    return rows


def test_a_small_run_of_every_op_on_two_torch_ranks_and_two_jax_devices_is_correct_and_recorded(
    tmp_path: Path,
) -> None:
    out_json, out_png = tmp_path / "compare.json", tmp_path / "compare.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--world-size", "2", "--shape", "1,8,4", "--heads", "2", "--seq-lens", "8,16"]
    args += ["--ops", ",".join(OPS)]
    args += ["--repeats", "3", "--warmup", "1", "--device", "cpu", "--json", str(out_json)]
    result = sp_compare(*args, *(["--plot", str(out_png)] if plot else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr

    rows = table_rows(result.stdout)
    assert len(rows) == len(OPS) * 2 * 2  # ops x sequence lengths x backends
    assert {(r[0], r[1]) for r in rows} == {(op, b) for op in OPS for b in ("torch", "jax")}
    assert all(r[3] == "yes" for r in rows), result.stdout

    data = json.loads(out_json.read_text())
    assert {"machine", "versions", "settings", "placement", "results"} <= set(data)
    assert data["machine"]["cpu_count"] >= 1
    assert data["versions"]["torch"] and data["versions"]["jax"]
    assert data["settings"]["world_size"] == 2 and data["settings"]["seq_lens"] == [8, 16]
    assert len(data["results"]) == len(rows)
    for r in data["results"]:
        assert r["correct"] is True
        assert len(r["times_s"]) == 3 and r["p25_s"] <= r["median_s"] <= r["p75_s"]
        assert r["gbps"] > 0 and r["torch_over_jax"] > 0
    padded = {tuple(r["shape"]) for r in data["results"] if r["op"] == "padded"}
    assert padded == {(1, 7, 4), (1, 15, 4)}  # N divides S, so it runs on S - 1 and pads
    for op in ATTENTION_OPS:  # [B, S, heads, D], checked against numpy attention
        attention = [r for r in data["results"] if r["op"] == op]
        assert {tuple(r["shape"]) for r in attention} == {(1, 8, 2, 2), (1, 16, 2, 2)}
        assert all(r["check"].startswith("allclose to float64 numpy attention") for r in attention)
    if plot:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def in_process_sp_compare(
    torch_ranks, monkeypatch
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``sp_compare``'s ``main`` in this process: the torch side on the session's rank pool of
    its world size (not a pool of its own), JAX on this process's CPU devices; JAX's 64-bit
    switch, which a 64-bit run turns on, restored afterwards. ``(exit status, stdout, stderr)``.
    (The test above runs the tool as its own process.)"""
    import contextlib

    import jax

    from sp_common.compare import cli, run_torch

    monkeypatch.setattr(
        run_torch, "RankPool", lambda n, device: contextlib.nullcontext(torch_ranks(n))
    )
    before = jax.config.jax_enable_x64

    def call(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    try:
        yield call
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_runs_every_op_it_offers_correctly_and_notes_what_it_leaves_out(
    dtype: str, in_process_sp_compare
) -> None:
    status, stdout, stderr = in_process_sp_compare(*SMALL, "--dtype", dtype)
    assert status == 0, stdout + stderr
    rows = table_rows(stdout)
    assert all(r[3] == "yes" for r in rows), stdout
    ran = {r[0] for r in rows}
    if dtype in FLOAT_DTYPES:
        assert ran == set(DEFAULT_OPS)
    else:
        assert ran == set(DEFAULT_OPS) - {"ulysses"}
        assert "sp-compare: note: left out ulysses: ulysses " in stderr, stderr
        assert f"not {dtype}" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ops", "shard,scatter"], "--ops: unknown name 'scatter'"),
        (["--world-size", "4", "--shape", "1,10,8"], "sequence length 10 (dim 1) is not divisible"),
        (["--world-size", "4", "--seq-lens", "16,18"], "sequence length 18"),
        (["--world-size", "1024", "--device", "gpu", "--backends", "torch"], "--world-size 1024"),
        (["--world-size", "1024", "--device", "gpu", "--backends", "jax"], "--world-size 1024"),
        (["--world-size", "1"], "--world-size 1: must be at least 2"),
        (["--dim", "3"], "--dim 3: out of range"),
        (["--dtype", "float8"], "--dtype: unknown dtype 'float8'"),
        (["--ops", "ulysses", "--dtype", "int32"], "--ops ulysses: ulysses needs a float dtype"),
        (["--ops", "ring", "--dtype", "int8"], "--ops ring: ring needs a float dtype, not int8"),
        (["--ops", "allgather_kv", "--dim", "2"], "--ops allgather_kv: allgather_kv needs --dim 1"),
        (["--ops", "ring", "--heads", "3"], "--ops ring: ring: --heads 3 does not divide"),
        (["--shape", "1,x,8"], "--shape '1,x,8': not a list of integers"),
        (["--world-size", "two"], "argument --world-size/-n: invalid int value"),
        (["--json", "/no/such/folder/c.json"], "--json /no/such/folder/c.json"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(args: list[str], message: str) -> None:
    result = sp_compare(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sp-compare: error: ") and message in lines[0]


def unwritable_paths(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Output paths no one can write, root included (chmod does not stop root): ``kind ->
    (path, what the error says)``."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    paths = {
        "a folder": (str(tmp_path), "is a folder, not a file"),
        "a folder name ending in /": (f"{tmp_path}/new/", "is a folder, not a file"),
        "in a missing folder": (str(tmp_path / "missing" / "out"), "does not exist"),
        "in a file": (str(a_file / "out"), f"{a_file} is a file, not a folder"),
    }
    if Path("/proc/self").is_dir():  # Linux: no one creates files in /proc
        paths["in /proc"] = ("/proc/sp-compare-out", "cannot be written")
    return paths


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize(
    "kind",
    ["a folder", "a folder name ending in /", "in a missing folder", "in a file", "in /proc"],
)
def test_an_output_path_that_cannot_be_written_exits_2_before_any_work(
    option: str, kind: str, tmp_path: Path
) -> None:
    paths = unwritable_paths(tmp_path)
    if kind not in paths:
        pytest.skip(f"{kind}: no /proc on this system")
    path, message = paths[kind]
    result = sp_compare(*SMALL, option, path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # no table: the sweep never started
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sp-compare: error: {option} {path}: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the check leaves no file


def test_json_and_plot_naming_one_file_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = sp_compare(*SMALL, "--json", str(out), "--plot", f"{tmp_path}/../{tmp_path.name}/out")
    assert result.returncode == 2 and result.stdout == ""
    assert "name the same file; give each its own file" in result.stderr
    assert not out.exists()


def test_ops_that_do_not_fit_are_left_out_with_a_note_unless_named() -> None:
    cases, notes = plan(parse_args(["--dtype", "int32", "--world-size", "2"]))
    assert {c.op for c in cases} == set(DEFAULT_OPS) - {"ulysses"}
    assert notes == [
        "left out ulysses: ulysses needs a float dtype, not int32; pass --dtype float32"
    ]
    for op in ATTENTION_OPS:
        with pytest.raises(CompareError, match=f"--ops {op}: {op} needs a float dtype"):
            plan(parse_args(["--dtype", "int32", "--ops", op]))


def test_the_default_ops_leave_out_allgather_kv_and_ring_which_run_when_named() -> None:
    cases, _ = plan(parse_args(["--world-size", "2"]))
    assert [c.op for c in cases] == list(DEFAULT_OPS)
    cases, _ = plan(parse_args(["--world-size", "2", "--ops", "ring,allgather_kv"]))
    assert [(c.op, c.shape) for c in cases] == [
        ("ring", (1, 4096, 8, 32)),
        ("allgather_kv", (1, 4096, 8, 32)),
    ]


def test_a_sweep_replaces_the_sequence_dim_and_only_padded_accepts_any_length() -> None:
    cases, _ = plan(parse_args(["--shape", "2,3,16", "--ops", "padded", "--seq-lens", "5,8"]))
    assert [c.shape for c in cases] == [(2, 5, 16), (2, 7, 16)]
    assert [c.seq_len for c in cases] == [5, 8]


def test_the_progress_bar_shows_only_after_a_few_seconds() -> None:
    case = Case("gather", (1, 8, 4), 1, "float32", 2, 8, 0, 1)
    quiet, slow = io.StringIO(), io.StringIO()
    later, now = Progress(2, after_s=60, stream=quiet), Progress(2, after_s=0, stream=slow)
    later.step("torch", case)
    now.step("jax", case)
    assert quiet.getvalue() == ""
    assert "1/2" in slow.getvalue() and "jax gather 1x8x4" in slow.getvalue()
    later.close()
    now.close()


def test_importing_the_tool_imports_no_framework() -> None:
    code = "import sp_common.compare, sys; print([m for m in ('torch', 'jax') if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
