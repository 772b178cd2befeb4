"""transformers integration: tiny Llama- and Qwen3-style causal LMs (seeded random weights, no
downloads) with ``attn_implementation="sp_attention"`` under ``apply_causal_lm_plan`` on 2 gloo
ranks equal the same weights unsharded with transformers' own ``sdpa`` attention, logits and
parameter gradients, for lengths that divide 2 and that do not; what it cannot do raises.

Tolerance (float32): ``|sharded - unsharded| <= 1e-5 * max(1, max|unsharded|)`` for the logits
and every parameter gradient (measured: logits 0 to 9e-8, gradients 3e-8 to 9e-8)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from examples import transformers_lm
from sp_common.testing import RankPool
from tests import transformers_tasks as tasks
from tests.test_layout import BLOCKER, run_python

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(180)

TOL = 1e-5
Ranks = Callable[[int], RankPool]


@pytest.mark.parametrize(
    "family, seq, padded_row, layout, strategy",
    [
        ("llama", 8, False, "contiguous", "ulysses"),
        ("llama", 7, True, "contiguous", "ulysses"),
        ("llama", 9, True, "zigzag", "ulysses"),
        ("llama", 7, True, "zigzag", "ring"),
        ("qwen3", 8, True, "contiguous", "allgather_kv"),
        ("qwen3", 7, False, "contiguous", "ulysses"),
        ("qwen3", 9, False, "contiguous", "ring"),
    ],
)
def test_sharded_logits_and_gradients_equal_the_unsharded_model(
    torch_ranks: Ranks, family: str, seq: int, padded_row: bool, layout: str, strategy: str
) -> None:
    worst = transformers_lm.compare(
        torch_ranks(2), family, seq=seq, padded_row=padded_row, layout=layout, strategy=strategy
    )
    assert worst["logits"] <= TOL and worst["gradients"] <= TOL, worst


@pytest.mark.parametrize("how", ["by_hand", "tokens_only_plan"])
def test_a_sharded_sequence_without_position_ids_raises_on_every_rank(
    torch_ranks: Ranks, how: str
) -> None:
    errors = torch_ranks(2).run(tasks.positions_missing_task, how)
    for error in errors:
        assert "position_ids on ranks [1] are 0..3" in error
        assert "apply_causal_lm_plan(model)" in error


def test_tokens_and_positions_sharded_by_hand_equal_the_unsharded_model(
    torch_ranks: Ranks,
) -> None:
    for got, want in torch_ranks(2).run(tasks.sharded_by_hand_task):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize(
    "what, message",
    [
        ("sliding_window", "not the plain causal mask"),
        ("4d_mask", "attention_mask has shape (2, 1, 8, 8)"),
        ("use_cache", "use_cache=True"),
        ("packed_positions", "packed sequences"),
        ("dropout", "dropout=0.1"),
    ],
)
def test_what_sequence_parallel_attention_lacks_raises_naming_it(
    torch_ranks: Ranks, what: str, message: str
) -> None:
    for error in torch_ranks(2).run(tasks.refused_task, what):
        assert error.startswith(("ValueError", "PlanError")) and message in error, error


def test_the_plan_needs_the_sp_attention_implementation(torch_ranks: Ranks) -> None:
    for error in torch_ranks(2).run(tasks.unregistered_implementation_task):
        assert "attn_implementation='sdpa'" in error and "sp_attention" in error


def test_import_sp_common_integrations_imports_no_framework_or_model_library() -> None:
    heavy = ("torch", "jax", "numpy", "transformers", "diffusers", "flax", "keras")
    out = run_python(
        "import sys, sp_common.integrations\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_transformers_the_integration_names_the_extra_to_install() -> None:
    out = run_python(
        BLOCKER.format(blocked=("transformers",)) + "import sp_common.integrations.transformers\n"
    )
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "pip install 'sp-sharding[torch,integrations-transformers]'" in out.stderr
