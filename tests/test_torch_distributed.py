"""torch-only behaviour on real gloo ranks: torch.compile, sub-groups, debug mode, the validator
across ranks, and errors raised identically on every rank."""

from __future__ import annotations

import numpy as np
import pytest

from sp_common.testing import data as ref

from . import torch_tasks

pytestmark = pytest.mark.timeout(300)


def test_torch_compile_fullgraph_traces_shard_padding_and_gather_with_no_graph_break(
    torch_ranks,
) -> None:
    x = ref.make_data((2, 10, 3), "float32", seed=5, specials=False)
    for result in torch_ranks(2).run(torch_tasks.compiled_graph_breaks, x, timeout_s=280):
        assert result["frames"] == 1
        assert result["forward_equal"]
        assert result["grad_equal"]


def test_a_compiled_function_follows_the_group_it_is_called_with(torch_ranks) -> None:
    x = ref.make_data((8,), "float32", seed=8)
    for rank, r in enumerate(torch_ranks(4).run(torch_tasks.compiled_group_switch, x)):
        half = np.split(x, 2)[rank % 2]
        world = np.split(x, 4)[rank]
        for key, expected in [
            ("arg_half", half),
            ("arg_world", world),
            ("block_half", half),
            ("block_world", world),
            ("no_block", world),
        ]:
            ref.assert_bitwise(r[key], expected, f"rank {rank} {key}")


def test_sub_groups_by_argument_and_by_block_shard_within_each_group(torch_ranks) -> None:
    x = ref.make_data((8, 3), "float32", seed=6)
    results = torch_ranks(4).run(torch_tasks.subgroups, x)
    halves = np.split(x, 2, axis=0)
    for rank, r in enumerate(results):
        ref.assert_bitwise(r["by_arg"], halves[rank % 2], f"rank {rank} group=")
        ref.assert_bitwise(r["by_block"], halves[rank % 2], f"rank {rank} sp_group")
        ref.assert_bitwise(r["gathered"], x, f"rank {rank} gather in sub-group")
        assert (r["size"], r["rank"], r["default_size"]) == (2, rank % 2, 4)


def test_debug_mode_turns_mismatched_lengths_into_a_value_error_on_every_rank(torch_ranks) -> None:
    messages = torch_ranks(2).run(torch_tasks.debug_mismatch, [5, 6])
    for message in messages:
        assert "sp_gather" in message
        assert "rank 0: shape (2, 5, 3)" in message and "rank 1: shape (2, 6, 3)" in message


def test_debug_mode_passes_when_ranks_agree(torch_ranks) -> None:
    assert torch_ranks(2).run(torch_tasks.debug_mismatch, [4, 4]) == ["no error", "no error"]


def test_validator_pads_on_shard_unpads_on_gather_and_reports_the_forgotten_name(
    torch_ranks,
) -> None:
    x = ref.make_data((2, 7, 3), "float32", seed=7)
    for r in torch_ranks(4).run(torch_tasks.validator_roundtrip, x):
        ref.assert_bitwise(r["out"], x, "validator round trip")
        assert r["shard_len"] == 2
        assert "'forgotten'" in r["message"] and "'hidden'" not in r["message"]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "expected"),
    [
        ("sp_shard", (np.zeros((2, 5, 3), np.float32), 1), {}, "ValueError: sp_shard: size 5"),
        ("sp_shard", (np.zeros((2, 5, 3), np.float32), 1, False), {}, "not divisible"),
        ("sp_shard", (np.zeros((2, 4), np.float32), 2), {}, "dim=2 is out of range"),
        ("sp_gather", (np.zeros((2, 4), np.float32), -3), {}, "dim=-3 is out of range"),
        ("sp_gather", (np.zeros((2, 4), np.float32), 1), {"pad_size": 9}, "pad_size=9"),
        ("sp_gather", (np.zeros((2, 4), np.float32), 1), {"grad_rule": "x"}, "grad_rule='x'"),
        ("sp_shard", (np.zeros((2, 4), np.float32), 1), {"group": "sp"}, "TypeError: sp_shard"),
        ("sp_shard_with_padding", (np.zeros(5, np.int32), 0, 1.5), {}, "pad_value=1.5"),
        ("sp_shard_with_padding", (np.zeros(5, np.uint8), 0, 300), {}, "pad_value=300"),
    ],
)
def test_bad_input_raises_the_same_clear_error_on_every_rank(
    fn, args, kwargs, expected, torch_ranks
) -> None:
    messages = torch_ranks(2).run(torch_tasks.expect_error, fn, *args, **kwargs)
    assert messages[0] == messages[1]
    assert expected in messages[0] and fn in messages[0]
