"""The sp-compare tool: a small correct run on both backends, its JSON and plot, argument errors."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sp_common.compare import CompareError, Progress, parse_args, plan
from sp_common.compare_cases import OPS, Case

pytestmark = pytest.mark.timeout(180)

SUBPROCESS_TIMEOUT_S = 150


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


def test_a_small_run_on_two_torch_ranks_and_two_jax_devices_is_correct_and_recorded(
    tmp_path: Path,
) -> None:
    out_json, out_png = tmp_path / "compare.json", tmp_path / "compare.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--world-size", "2", "--shape", "1,8,4", "--heads", "2", "--seq-lens", "8,16"]
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
    if plot:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_and_bool_move_bitwise_and_ulysses_is_close_in_bfloat16() -> None:
    for dtype, ops in (("bfloat16", "gather,padded,all-to-all,ulysses"), ("bool", "shard,padded")):
        result = sp_compare(
            *["--world-size", "2", "--shape", "2,6,4", "--heads", "2", "--dtype", dtype],
            *["--ops", ops, "--repeats", "1", "--warmup", "0", "--device", "cpu"],
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert all(r[3] == "yes" for r in table_rows(result.stdout)), result.stdout


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
        (["--ops", "ulysses", "--dtype", "int32"], "ulysses needs a float dtype"),
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


def test_ops_that_do_not_fit_are_left_out_with_a_note_unless_named() -> None:
    cases, notes = plan(parse_args(["--dtype", "int32", "--world-size", "2"]))
    assert {c.op for c in cases} == set(OPS) - {"ulysses"}
    assert notes == [
        "left out ulysses: ulysses needs a float dtype, not int32; pass --dtype float32"
    ]
    with pytest.raises(CompareError, match="--ops ulysses: ulysses needs a float dtype"):
        plan(parse_args(["--dtype", "int32", "--ops", "ulysses"]))


def test_a_sweep_replaces_the_sequence_dim_and_only_padded_accepts_any_length() -> None:
    cases, _ = plan(parse_args(["--shape", "2,3,16", "--ops", "padded", "--seq-lens", "5,8"]))
    assert [c.shape for c in cases] == [(2, 5, 16), (2, 7, 16)]
    assert [c.seq_len for c in cases] == [5, 8]


def test_the_progress_bar_shows_only_after_a_few_seconds() -> None:
    case = Case("gather", (1, 8, 4), 1, "float32", 2, 8, 0, 1)
    quiet, slow = io.StringIO(), io.StringIO()
    Progress(2, after_s=60, stream=quiet).step("torch", case)
    Progress(2, after_s=0, stream=slow).step("jax", case)
    assert quiet.getvalue() == ""
    assert slow.getvalue().startswith("[" + "#" * 15 + "." * 15 + "] 1/2 jax gather 1x8x4")


def test_importing_the_tool_imports_no_framework() -> None:
    code = "import sp_common.compare, sys; print([m for m in ('torch', 'jax') if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
