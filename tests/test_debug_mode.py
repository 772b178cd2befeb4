"""Debug mode (torch, gloo ranks): ranks that disagree on a call raise ValueError on every rank,
promptly, also when the disagreement fails a local check on some ranks only; ranks that agree
run as without debug mode; without debug mode no extra collective runs.

Every call below runs under a deadline shorter than gloo's own collective timeout
(``conftest.COLLECTIVE_TIMEOUT_S``), so a rank left waiting in a collective fails the test
instead of slowing it down.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from . import debug_tasks
from .bad_input_tasks import Tensor as T
from .conftest import COLLECTIVE_TIMEOUT_S

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 10  # far below COLLECTIVE_TIMEOUT_S: a hang is a failure, not a slow pass
assert DEADLINE_S < COLLECTIVE_TIMEOUT_S


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Rank r calls ``call(*args[r], **kwargs[r])``; every rank must raise the same ValueError
    that lists every rank and contains each string of ``says``."""

    label: str
    call: str
    args: tuple[tuple[Any, ...], ...]
    says: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...] = ({}, {})

    @property
    def world_size(self) -> int:
        return len(self.args)


X = T((2, 4, 3))
Y = T((2, 4, 2))  # dims 0, 1 and 2 all divisible by 2
Q = T((1, 4, 2, 3))  # Ulysses [B, s, H, D]
F64 = T((2, 4, 3), "float64")
ONLY_RANK_1 = "rank(s) [1] failed the local checks"

MISMATCHES = [
    # sp_shard
    Mismatch(
        "rank 1's length is not divisible",
        "sp_shard",
        ((X, 1), (T((2, 5, 3)), 1)),
        ("rank 0: shape (2, 4, 3)", "rank 1: shape (2, 5, 3)", "size 5 of dim 1", ONLY_RANK_1),
    ),
    Mismatch(
        "rank 1's dim is out of range",
        "sp_shard",
        ((X, 1), (X, 5)),
        ("dim=5 is out of range", ONLY_RANK_1),
    ),
    Mismatch("ranks pass different dims", "sp_shard", ((Y, 0), (Y, 1)), ("dim=0", "dim=1")),
    Mismatch("ranks pass different dtypes", "sp_shard", ((X, 1), (F64, 1)), ("torch.float64",)),
    Mismatch(
        "ranks pass different grad_rules",
        "sp_shard",
        ((X, 1), (X, 1)),
        ("grad_rule='gather'", "grad_rule='local'"),
        ({"grad_rule": "gather"}, {"grad_rule": "local"}),
    ),
    Mismatch(
        "rank 1's grad_rule is unknown",
        "sp_shard",
        ((X, 1), (X, 1)),
        ("grad_rule='sum'", ONLY_RANK_1),
        ({}, {"grad_rule": "sum"}),
    ),
    Mismatch(
        "rank 1's validate is not a bool",
        "sp_shard",
        ((X, 1), (X, 1)),
        ("TypeError: sp_shard: validate must be a bool", "'no'", ONLY_RANK_1),
        ({"validate": True}, {"validate": "no"}),
    ),
    # sp_gather
    Mismatch(
        "ranks gather different lengths",
        "sp_gather",
        ((T((2, 5, 3)), 1), (T((2, 6, 3)), 1)),
        ("rank 0: shape (2, 5, 3)", "rank 1: shape (2, 6, 3)"),
    ),
    Mismatch(
        "rank 1's pad_size is out of range",
        "sp_gather",
        ((X, 1), (X, 1)),
        ("pad_size=1", "pad_size=99 is outside [0, 8]", ONLY_RANK_1),
        ({"pad_size": 1}, {"pad_size": 99}),
    ),
    Mismatch(
        "ranks pass different pad_sizes",
        "sp_gather",
        ((X, 1), (X, 1)),
        ("pad_size=0", "pad_size=1"),
        ({"pad_size": 0}, {"pad_size": 1}),
    ),
    Mismatch(
        "rank 1's dim is out of range",
        "sp_gather",
        ((X, 1), (X, -4)),
        ("dim=-4 is out of range", ONLY_RANK_1),
    ),
    Mismatch("ranks pass different dims", "sp_gather", ((Y, 0), (Y, 2)), ("dim=0", "dim=2")),
    Mismatch(
        "ranks pass different grad_rules",
        "sp_gather",
        ((X, 1), (X, 1)),
        ("grad_rule='slice'", "grad_rule='reduce_scatter'"),
        ({}, {"grad_rule": "reduce_scatter"}),
    ),
    # sp_shard_with_padding
    Mismatch(
        "ranks pad different lengths",
        "sp_shard_with_padding",
        ((T((2, 5)), 1), (T((2, 6)), 1)),
        ("shape (2, 5)", "shape (2, 6)"),
    ),
    Mismatch(
        "rank 1's pad_value does not fit the dtype",
        "sp_shard_with_padding",
        ((T((5,), "uint8"), 0, 0), (T((5,), "uint8"), 0, 300)),
        ("pad_value=300 cannot be held by dtype torch.uint8", ONLY_RANK_1),
    ),
    Mismatch(
        "ranks pad with different values",
        "sp_shard_with_padding",
        ((T((2, 5)), 1, 0.0), (T((2, 5)), 1, -1.0)),
        ("pad_value=0.0", "pad_value=-1.0"),
    ),
    Mismatch(
        "ranks pass different dims",
        "sp_shard_with_padding",
        ((T((3, 3)), 0), (T((3, 3)), 1)),
        ("dim=0", "dim=1"),
    ),
    # sp_all_to_all
    Mismatch(
        "ranks pass different scatter dims",
        "sp_all_to_all",
        ((T((4, 4, 4)), 0, 2), (T((4, 4, 4)), 1, 2)),
        ("scatter_dim=0", "scatter_dim=1"),
    ),
    Mismatch(
        "ranks pass different gather dims",
        "sp_all_to_all",
        ((T((4, 4, 4)), 0, 1), (T((4, 4, 4)), 0, 2)),
        ("gather_dim=1", "gather_dim=2"),
    ),
    Mismatch(
        "rank 1's scatter dim is not divisible",
        "sp_all_to_all",
        ((T((4, 3)), 0, 1), (T((5, 3)), 0, 1)),
        ("size 5 of dim 0", ONLY_RANK_1),
    ),
    Mismatch(
        "rank 1's gather dim is out of range",
        "sp_all_to_all",
        ((X, 0, 1), (X, 0, 7)),
        ("dim=7 is out of range", ONLY_RANK_1),
    ),
    Mismatch(
        "ranks exchange different shapes",
        "sp_all_to_all",
        ((T((4, 3)), 0, 1), (T((4, 5)), 0, 1)),
        ("shape (4, 3)", "shape (4, 5)"),
    ),
    # sp_reduce_scatter
    Mismatch(
        "ranks sum different lengths",
        "sp_reduce_scatter",
        ((T((4, 3)), 0), (T((6, 3)), 0)),
        ("shape (4, 3)", "shape (6, 3)"),
    ),
    Mismatch(
        "rank 1's length is not divisible",
        "sp_reduce_scatter",
        ((T((4, 3)), 0), (T((5, 3)), 0)),
        ("size 5 of dim 0", ONLY_RANK_1),
    ),
    Mismatch(
        "ranks pass different dims", "sp_reduce_scatter", ((Y, 0), (Y, 1)), ("dim=0", "dim=1")
    ),
    Mismatch(
        "rank 1 sums a bool tensor",
        "sp_reduce_scatter",
        ((T((4,)), 0), (T((4,), "bool"), 0)),
        ("TypeError: sp_reduce_scatter: tensor has dtype bool", ONLY_RANK_1),
    ),
    # sp_ulysses_attention
    Mismatch(
        "ranks hold different local lengths",
        "sp_ulysses_attention",
        ((Q, Q, Q), (T((1, 2, 2, 3)),) * 3),
        ("q shape (1, 4, 2, 3)", "q shape (1, 2, 2, 3)"),
    ),
    Mismatch(
        "rank 1's v has another head size",
        "sp_ulysses_attention",
        ((Q, Q, Q), (Q, Q, T((1, 4, 2, 5)))),
        ("v shape (1, 4, 2, 3)", "v shape (1, 4, 2, 5)"),
    ),
    Mismatch(
        "ranks pass different dtypes",
        "sp_ulysses_attention",
        ((Q, Q, Q), (T((1, 4, 2, 3), "float64"),) * 3),
        ("torch.float32", "torch.float64"),
    ),
    Mismatch(
        "ranks pass different seq_lens",
        "sp_ulysses_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("seq_len=7", "seq_len=8"),
        ({"seq_len": 7}, {"seq_len": 8}),
    ),
    Mismatch(
        "ranks pass different scales",
        "sp_ulysses_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("scale=0.5", "scale=0.57735"),
        ({"scale": 0.5}, {}),
    ),
    Mismatch(
        "rank 1's q heads are not a multiple of its kv heads",
        "sp_ulysses_attention",
        ((Q, Q, Q), (T((1, 4, 3, 3)), Q, Q)),
        ("grouped-query", ONLY_RANK_1),
    ),
    Mismatch(
        "ranks pass different layouts",
        "sp_shard",
        ((T((2, 8)), 1), (T((2, 8)), 1)),
        ("layout='zigzag'", "layout='contiguous'"),
        ({"layout": "zigzag"}, {}),
    ),
    # sp_attention
    Mismatch(
        "ranks pass different causal flags",
        "sp_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("causal=True", "causal=False"),
        ({"causal": True}, {}),
    ),
    Mismatch(
        "only rank 1 passes a key mask",
        "sp_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("key_mask",),
        ({}, {"key_mask": T((1, 4), "bool")}),
    ),
    Mismatch(
        "rank 1 names an unknown strategy",
        "sp_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("strategy='rings'", ONLY_RANK_1),
        ({}, {"strategy": "rings"}),
    ),
    Mismatch(
        "rank 1's seq_len is out of range",
        "sp_ulysses_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("seq_len=99 must be in [1, 8]", ONLY_RANK_1),
        ({"seq_len": 8}, {"seq_len": 99}),
    ),
    Mismatch(
        "rank 1's scale is not a number",
        "sp_ulysses_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ("scale='x' is not a real number", ONLY_RANK_1),
        ({}, {"scale": "x"}),
    ),
]


def run_in_debug_mode(torch_ranks, case: Mismatch, debug: bool = True) -> list[tuple[str, str]]:
    return torch_ranks(case.world_size).run(
        debug_tasks.call_in_debug_mode,
        case.call,
        list(case.args),
        list(case.kwargs),
        debug,
        timeout_s=DEADLINE_S,
    )


@pytest.mark.parametrize("case", MISMATCHES, ids=lambda c: f"{c.call}-{c.label}")
def test_ranks_that_disagree_raise_the_same_value_error_on_every_rank_at_once(
    torch_ranks, case: Mismatch
) -> None:
    outcomes = run_in_debug_mode(torch_ranks, case)
    assert len(set(outcomes)) == 1, f"ranks raised different errors: {outcomes}"
    kind, message = outcomes[0]
    assert kind == "ValueError", message
    assert message.startswith(f"{case.call}: "), message
    for rank in range(case.world_size):
        assert f"rank {rank}: " in message, message
    for part in case.says:
        assert part in message, f"{part!r} not in {message!r}"


def test_one_rank_of_three_that_differs_is_named_with_every_rank_listed(torch_ranks) -> None:
    case = Mismatch(
        "rank 2's length is not divisible",
        "sp_shard",
        ((T((2, 6, 3)), 1), (T((2, 6, 3)), 1), (T((2, 7, 3)), 1)),
        ("rank 2: shape (2, 7, 3)", "size 7 of dim 1", "rank(s) [2] failed the local checks"),
        ({}, {}, {}),
    )
    outcomes = run_in_debug_mode(torch_ranks, case)
    assert len(set(outcomes)) == 1 and outcomes[0][0] == "ValueError", outcomes
    message = outcomes[0][1]
    assert "rank 0: shape (2, 6, 3)" in message and "rank 1: shape (2, 6, 3)" in message
    for part in case.says:
        assert part in message, f"{part!r} not in {message!r}"


AGREEMENTS = [
    # the same call spelled differently on each rank is no disagreement
    ("sp_shard", ((X, -2), (X, 1)), ({}, {"grad_rule": "gather"})),
    ("sp_gather", ((X, 1), (X, -2)), ({"pad_size": 1}, {"pad_size": 1, "grad_rule": "slice"})),
    ("sp_shard_with_padding", ((T((2, 5)), 1), (T((2, 5)), -1)), ({}, {})),
    ("sp_all_to_all", ((T((4, 4, 4)), 0, 2), (T((4, 4, 4)), -3, -1)), ({}, {})),
    ("sp_reduce_scatter", ((T((4, 3)), 0), (T((4, 3)), -2)), ({}, {})),
    (
        "sp_ulysses_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ({"seq_len": 8, "scale": 0.5}, {"scale": 0.5}),
    ),
    (
        "sp_attention",
        ((Q, Q, Q), (Q, Q, Q)),
        ({"seq_len": 8, "scale": 1 / math.sqrt(3), "causal": False}, {"strategy": "ulysses"}),
    ),
    ("sp_padding_mask", ((X, 5), (X, 5)), ({}, {"local": True})),
]


@pytest.mark.parametrize(("call", "args", "kwargs"), AGREEMENTS, ids=[a[0] for a in AGREEMENTS])
def test_ranks_that_agree_run_in_debug_mode(torch_ranks, call, args, kwargs) -> None:
    outcomes = run_in_debug_mode(torch_ranks, Mismatch("agree", call, args, (), kwargs))
    assert outcomes == [("no error", "")] * 2


@pytest.mark.parametrize(
    ("call", "args", "kind", "says"),
    [
        ("sp_shard", (T((2, 5, 3)), 1), "ValueError", "size 5 of dim 1"),
        ("sp_gather", (X, 1.0), "TypeError", "dim must be an int"),
        ("sp_ulysses_attention", (T((1, 4, 3, 3)), Q, Q), "ValueError", "grouped-query"),
    ],
    ids=["sp_shard", "sp_gather", "sp_ulysses_attention"],
)
def test_a_local_check_that_fails_alike_on_every_rank_keeps_its_own_error(
    torch_ranks, call, args, kind, says
) -> None:
    case = Mismatch("alike", call, (args, args), ())
    with_debug = run_in_debug_mode(torch_ranks, case)
    without = run_in_debug_mode(torch_ranks, case, debug=False)
    assert with_debug == without
    assert with_debug[0][0] == kind and says in with_debug[0][1]
    assert "disagree" not in with_debug[0][1]


@pytest.mark.parametrize(
    ("call", "args", "without_debug", "with_debug"),
    [
        ("sp_shard", (X, 1), {}, {"all_gather_single": 1}),
        ("sp_shard", (X, 1, False), {}, {}),  # validate=False: no check
        # [1, s, 3]: the gather itself is one all_gather_single too
        ("sp_gather", (T((1, 4, 3)), 1), {"all_gather_single": 1}, {"all_gather_single": 2}),
        ("sp_gather", (X, 1), {"all_gather": 1}, {"all_gather": 1, "all_gather_single": 1}),
        ("sp_shard_with_padding", (T((2, 5)), 1), {}, {"all_gather_single": 1}),
        (
            "sp_all_to_all",
            (T((4, 4)), 0, 1),
            {"all_to_all_single": 1},
            {"all_to_all_single": 1, "all_gather_single": 1},
        ),
        (
            "sp_reduce_scatter",
            (T((4, 3)), 0),
            {"reduce_scatter_single": 1},
            {"reduce_scatter_single": 1, "all_gather_single": 1},
        ),
        (
            "sp_ulysses_attention",
            (Q, Q, Q),
            {"all_to_all_single": 4},
            {"all_to_all_single": 4, "all_gather_single": 1},
        ),
        ("sp_padding_mask", (X, 5), {}, {}),
    ],
    ids=[
        "sp_shard",
        "sp_shard validate=False",
        "sp_gather [1, s, 3]",
        "sp_gather [2, s, 3]",
        "sp_shard_with_padding",
        "sp_all_to_all",
        "sp_reduce_scatter",
        "sp_ulysses_attention",
        "sp_padding_mask",
    ],
)
def test_debug_mode_adds_one_small_all_gather_and_without_it_no_collective_is_added(
    torch_ranks, call, args, without_debug, with_debug
) -> None:
    for debug, expected in ((False, without_debug), (True, with_debug)):
        counts = torch_ranks(2).run(
            debug_tasks.collectives_per_call, call, args, debug, timeout_s=DEADLINE_S
        )
        for per_rank in counts:
            assert {k: v for k, v in per_rank.items() if v} == expected, (debug, per_rank)


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("ShardingValidator.shard (in track)", ((X, "h", 1), (T((2, 5, 3)), "h", 1))),
        ("ShardingValidator.shard (in track)", ((X, "h", 1), (X, "h", 7))),
        ("ShardingValidator.gather (in track, after shard)", ((X, "h", 1, 1), (X, "h", 1, 0))),
    ],
    ids=[
        "validator shard: rank 1 not divisible",
        "validator shard: rank 1 dim",
        "validator gather: rank 1 dim",
    ],
)
def test_a_validator_check_that_fails_on_one_rank_does_not_leave_the_others_waiting(
    torch_ranks, call, args
) -> None:
    """The validator checks before calling sp_shard/sp_gather; a rank that failed there used to
    skip the debug collective its peers were waiting in."""
    outcomes = torch_ranks(2).run(
        debug_tasks.call_in_debug_mode, call, list(args), [{}, {}], timeout_s=DEADLINE_S
    )
    assert [kind for kind, _ in outcomes] == ["ValueError", "ValueError"], outcomes
    assert all("rank(s) [1] failed the local checks" in message for _, message in outcomes)


def test_a_plan_check_that_fails_on_one_rank_does_not_leave_the_others_waiting(
    torch_ranks,
) -> None:
    outcomes = torch_ranks(2).run(debug_tasks.plan_check_fails_on_one_rank, timeout_s=DEADLINE_S)
    assert [kind for kind, _ in outcomes] == ["ValueError", "ValueError"], outcomes
    assert all("rank(s) [1] failed the local checks" in message for _, message in outcomes)
