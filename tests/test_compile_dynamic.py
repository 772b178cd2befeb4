"""torch.compile(fullgraph=True) with dynamic shapes: ``dynamic=True`` and
``torch._dynamo.mark_dynamic(x, 1)`` on the sequence dim trace shard, padding, gather,
all-to-all, reduce-scatter, Ulysses attention and a planned model with no graph break and give
the eager values (bitwise for data movement); a check that fails on a symbolic value raises the
library's error, not a tracing error about formatting it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sp_common import sp_gather, sp_shard_with_padding
from sp_common.testing import data as ref

from . import compile_tasks

pytestmark = pytest.mark.timeout(300)
LENGTHS = (9, 11)  # 2 ranks pad both by 1: one guard branch, so one graph serves both


def integer_valued(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 data with small integer values: every gradient sum is exact in any order."""
    return np.random.default_rng(seed).integers(-8, 8, size=shape).astype(np.float32)


def test_the_readme_quickstart_padding_compiles_with_dynamic_true_in_one_process() -> None:
    # World size 1: the default pad_value alone (a symbolic float under dynamic=True) broke it.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    def step(x: torch.Tensor) -> torch.Tensor:
        shard, pad_size = sp_shard_with_padding(x, dim=1)
        return sp_gather(shard * 2, dim=1, pad_size=pad_size)

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for length in (10, 12):
        x = torch.arange(2 * length * 3, dtype=torch.float32).reshape(2, length, 3)
        # Eager first: the first dispatch of a tensor type fills a cache that a compiled call
        # would otherwise see change (one recompile, unrelated to dynamic shapes).
        assert torch.equal(step(x), x * 2)
        assert torch.equal(compiled(x), x * 2)
    assert counter.frame_count == 1


# Inductor once (its code generation over symbolic sizes); AOT autograd elsewhere, which traces
# forward and backward with the same symbolic shapes at a fraction of the compile time.
@pytest.mark.parametrize(
    ("mode", "backend"), [("dynamic", "inductor"), ("mark_dynamic", "aot_eager")]
)
def test_data_movement_compiles_to_one_graph_for_every_length_and_equals_eager_bitwise(
    torch_ranks, mode: str, backend: str
) -> None:
    xs = [integer_valued((2, s, 4), seed=s) for s in LENGTHS]
    runs = torch_ranks(2).run(compile_tasks.data_movement, xs, mode, backend, timeout_s=280)
    for rank, r in enumerate(runs):
        assert r["graphs"] == 1, f"rank {rank}: a new length recompiled"
        for s, run in zip(LENGTHS, r["runs"], strict=True):
            for i, (got, expected) in enumerate(zip(run["got"], run["expected"], strict=True)):
                ref.assert_bitwise(got, expected, f"rank {rank} S={s} output {i}")
            ref.assert_bitwise(run["got_grad"], run["expected_grad"], f"rank {rank} S={s} grad")


def test_a_padded_ulysses_block_with_a_marked_dynamic_seq_len_compiles_and_equals_eager(
    torch_ranks,
) -> None:
    # dynamic=True reaches Ulysses through the planned model below (planned_seq_len).
    qkvs = [
        tuple(
            ref.make_data((1, s, 4, 2), "float32", seed=3 * s + i, specials=False) for i in range(3)
        )
        for s in (9, 11)
    ]
    runs = torch_ranks(2).run(compile_tasks.ulysses, qkvs, "mark_dynamic", "aot_eager")
    for rank, r in enumerate(runs):
        # One graph for both lengths: Ulysses' shape check used to specialize each length.
        assert r["first_graphs"] == 1 and r["graphs"] == 1, f"rank {rank}: {r['graphs']} graphs"
        for run in r["runs"]:
            names = ("out", "dq", "dk", "dv")
            for name, got, expected in zip(names, run["got"], run["expected"], strict=True):
                np.testing.assert_allclose(
                    got, expected, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} {name}"
                )


@pytest.mark.parametrize(
    ("mode", "whole_model_compile"), [("dynamic", False), ("mark_dynamic", True)]
)
def test_a_planned_model_compiles_with_dynamic_shapes_and_equals_its_eager_run(
    torch_ranks, mode: str, whole_model_compile: bool
) -> None:
    xs = [integer_valued((2, 9, 12), seed=9) / 8]
    runs = torch_ranks(2).run(
        compile_tasks.planned_dit, xs, mode, "aot_eager", whole_model_compile, timeout_s=280
    )
    for rank, r in enumerate(runs):
        if not whole_model_compile:  # the function traces the plan's hooks into its one graph
            assert r["first_graphs"] == 1, f"rank {rank}"
        (run,) = r["runs"]
        assert run["got"].keys() == run["expected"].keys()
        for key, expected in run["expected"].items():
            np.testing.assert_allclose(
                run["got"][key], expected, rtol=1e-4, atol=1e-5, err_msg=f"rank {rank} {key}"
            )


def test_a_check_that_fails_on_a_symbolic_value_raises_the_library_error(torch_ranks) -> None:
    for rank, messages in enumerate(torch_ranks(2).run(compile_tasks.symbolic_errors, 9)):
        for name, must in [
            ("sp_shard", "not divisible by the sequence-parallel world size 2"),
            ("sp_all_to_all", "not divisible by the sequence-parallel world size 2"),
            ("pad_value", "pad_value=1000000.0 cannot be held by dtype torch.float16"),
            ("pad_size", "sp_gather: pad_size="),
        ]:
            assert must in messages[name], f"rank {rank} {name}: {messages[name]}"
            assert "BUILD_STRING" not in messages[name], f"rank {rank} {name}"
