"""diffusers integration: tiny ``FluxTransformer2DModel`` and ``DiTTransformer2DModel`` (seeded
random weights, no downloads) under ``apply_flux_plan`` / ``apply_dit_plan`` on 2 gloo ranks equal
the same weights unsharded with diffusers' own processors, output and parameter gradients, for
token counts that divide 2 and that do not (Flux: each stream padded on its own, both paddings
masked); Flux equals diffusers' own context-parallel Ulysses; what it cannot do raises.

Tolerance (float32): ``|sharded - unsharded| <= 1e-5 * max(1, max|unsharded|)`` for the output
and every parameter gradient (measured: outputs 0 to 3e-7, gradients 3e-7 to 6e-7)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from examples import diffusers_flux
from sp_common.attention.api import Strategy
from sp_common.testing import RankPool
from tests import diffusers_tasks as tasks
from tests.test_layout import BLOCKER, run_python

pytest.importorskip("diffusers")
pytestmark = pytest.mark.timeout(180)

TOL = 1e-5
Ranks = Callable[[int], RankPool]


@pytest.mark.parametrize(
    "model, tokens, strategy",
    [
        ("flux", (8, 4), "ulysses"),  # image, text tokens: both divide 2
        ("flux", (9, 5), "ulysses"),  # neither divides: each stream padded on its own
        ("flux", (7, 4), "ring"),
        ("flux", (9, 4), "allgather_kv"),
        ("dit", (8,), "ulysses"),  # an 8x8 latent: 16 patch tokens
        ("dit", (6,), "ulysses"),  # 6x6: 9 patch tokens, padded
        ("dit", (6,), "ring"),
    ],
)
def test_sharded_output_and_gradients_equal_the_unsharded_model(
    torch_ranks: Ranks, model: str, tokens: tuple[int, ...], strategy: Strategy
) -> None:
    worst = diffusers_flux.compare(torch_ranks(2), model, tokens, strategy)
    assert worst["output"] <= TOL and worst["gradients"] <= TOL, worst


def test_flux_equals_diffusers_own_context_parallel_ulysses(torch_ranks: Ranks) -> None:
    for got, want in torch_ranks(2).run(tasks.against_diffusers_ulysses_task):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize(
    "what, message",
    [
        ("attention_mask", "an attention_mask is given"),
        ("outside_plan", "apply_flux_plan(model)"),
        ("other_processor", "FluxIPAdapterAttnProcessor, which has no sequence-parallel version"),
        ("wrong_model", "expected a FluxTransformer2DModel"),
        ("3d_ids", "the plan expects a 2-d tensor"),
    ],
)
def test_what_sequence_parallel_attention_lacks_raises_naming_it(
    torch_ranks: Ranks, what: str, message: str
) -> None:
    for error in torch_ranks(2).run(tasks.refused_task, what):
        assert error.startswith(("ValueError", "PlanError", "TypeError")), error
        assert message in error, error


def test_removing_the_plan_restores_the_model_s_own_processors(torch_ranks: Ranks) -> None:
    for result in torch_ranks(2).run(tasks.removed_plan_task):
        assert result["before"] == result["after"] == ["FluxAttnProcessor"]
        assert result["during"] == ["SPFluxAttnProcessor"]
        assert result["equal"]


def test_without_diffusers_the_integration_names_the_extra_to_install() -> None:
    out = run_python(
        BLOCKER.format(blocked=("diffusers",)) + "import sp_common.integrations.diffusers\n"
    )
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "pip install 'sp-sharding[torch,integrations-diffusers]'" in out.stderr
