"""An adversarial review of ring and USP attention (``strategy="ring" | "usp" | "auto"``):
world sizes, lengths, layouts, masks, dtypes, groups and transforms the main tests do not
reach, each against the float64 numpy reference (or plain attention written out in the same
framework, for second derivatives).

Passing tests pin behaviour that is right: odd world sizes (3, 5) and 8; S < N and S = 1;
odd local lengths under causal (uneven halves); zigzag with padding and key masks; D != Dv;
grouped and multi-query heads; fully masked batch rows; fused (strided) and broadcast K/V
views through ring_shift; strided masks; scale 0 and negative; float16/bfloat16 with large
logits; DP x SP torch subgroups; two ring calls in one forward; bitwise determinism; ring
over a whole 2-D DeviceMesh; USP on 1xU, Rx1 and RxU torch meshes with heads U does not
divide; JAX ring on 3 and 8 devices, USP with the tuple in the other order than the mesh's
axes, and second order (grad of grad) with a fully masked row.

Two defects it found are fixed (each docstring says "DEFECT (fixed)."): a torch second
derivative in k (or v) alone, with q not differentiated, came out silently wrong instead of
raising "differentiable once"; torch.func.vmap over ring raised torch's own message about
``_Ring``, which named neither sp_attention nor what to do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sp_common.testing import reference_attention, reference_attention_grads
from sp_common.testing.mesh import mesh_of

from . import ring_review_tasks as tasks
from .attention_review_tasks import Case, case_data, run_cases
from .attention_tasks import sharded_attention

pytestmark = pytest.mark.timeout(300)

# |got - want| <= TOL * max(1, max |want|): README.md's tolerances for every output and grad.
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}


def assert_close(case: Case, out: np.ndarray, grads: list[np.ndarray], who: str) -> None:
    data = case_data(case)
    q, k, v, mask = data["q"], data["k"], data["v"], data["key_mask"]
    opts = {"causal": case.causal, "key_mask": mask, "scale": case.scale}
    want = reference_attention(q, k, v, **opts)
    want_grads = list(reference_attention_grads(q, k, v, data["grad_out"], **opts))
    if case.inputs == "expanded":  # head 0 of the leaves is every KV head
        for i in (1, 2):
            summed = np.zeros_like(want_grads[i])
            summed[:, :, 0] = want_grads[i].sum(axis=2)
            want_grads[i] = summed
    tol = TOL[case.dtype]
    for name, got, expected in zip(
        ("out", "dq", "dk", "dv"), [out, *grads], [want, *want_grads], strict=True
    ):
        got = np.asarray(got, np.float64)
        assert got.shape == expected.shape, f"{who} {case} {name}: shape"
        assert not np.isnan(got).any(), f"{who} {case} {name}: NaN"
        err = float(np.max(np.abs(got - expected), initial=0.0))
        bound = tol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        assert err <= bound, f"{who} {case} {name}: max |diff| {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------------------ torch, on ranks

R = "ring"
TORCH_RING_CASES = {
    3: [
        Case(7, 4, 2, True, "batch", strategy=R),  # local 3: uneven causal halves (2, 1)
        Case(10, 4, 2, True, "batch", strategy=R, layout="zigzag", dv=5),  # zigzag padded 12
        Case(2, 2, 1, True, "nofirst", strategy=R),  # S < N: a rank of padding only
        Case(1, 2, 2, False, "none", strategy=R, batch=1),  # S = 1
        Case(9, 3, 3, True, "shared", strategy=R, inputs="fused", mask_layout="strided"),
        Case(9, 4, 1, True, "batch", strategy=R, inputs="expanded", scale=-1.3),
        Case(8, 4, 2, True, "batch", strategy=R, dtype="float16", scale=6.0),  # large logits
        Case(8, 4, 2, False, "shared", strategy=R, dtype="bfloat16", scale=0.0),
        Case(11, 3, 3, True, "batch", strategy="auto", layout="zigzag"),
    ],
    4: [
        Case(13, 2, 2, True, "batch", strategy=R, layout="zigzag", inputs="fused", d=4, dv=4),
        Case(5, 2, 2, True, "batch", strategy=R, d=4, dv=6),  # local 2: halves of 1
        Case(3, 4, 1, True, "nofirst", strategy=R, layout="zigzag", batch=1),  # zigzag, S < N
    ],
}


@pytest.mark.parametrize("n", [3, 4])
def test_torch_ring_equals_full_attention_on_odd_and_even_world_sizes(n, torch_ranks) -> None:
    cases = TORCH_RING_CASES[n]
    per_rank = torch_ranks(n).run(run_cases, cases, timeout_s=200)
    for rank, results in enumerate(per_rank):
        for case, r in zip(cases, results, strict=True):
            assert_close(case, r["out"], r["grads"], f"torch ring rank {rank}")


def test_torch_ring_is_deterministic_and_two_calls_in_one_forward_are_exact(torch_ranks) -> None:
    """The same inputs twice give bitwise the same output and gradients; two ring calls in one
    forward (the second attends the first's output) and one backward through both equal
    allgather_kv (the isend/irecv of the two calls and of the backward's K/V gradients pair
    up in order on gloo)."""
    case = Case(9, 4, 2, True, "batch", strategy=R, layout="zigzag", dtype="float32")
    pool = torch_ranks(3)
    for r in pool.run(tasks.repeated, [case]):
        a, b = r[0]["first"], r[0]["second"]
        for x, y in zip([a["out"], *a["grads"]], [b["out"], *b["grads"]], strict=True):
            assert np.array_equal(x, y)
    twice = dataclasses.replace(case, seq=7, layout="contiguous", dtype="float64")
    for r in pool.run(tasks.two_calls, twice):
        for x, y in zip(r["ring"], r["allgather_kv"], strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-10)


def test_torch_ring_in_dp_x_sp_subgroups_and_over_a_whole_2d_mesh(torch_ranks) -> None:
    pool = torch_ranks(4)
    cases = [
        Case(7, 6, 3, True, "batch", strategy=R),
        Case(8, 6, 3, True, "shared", strategy=R, layout="zigzag", seed=1),
    ]
    for rank, results in enumerate(pool.run(tasks.in_subgroups_ring, cases, 2)):
        assert_close(cases[rank // 2], results[0]["out"], results[0]["grads"], f"rank {rank}")
    case = Case(10, 4, 2, True, "batch")
    for rank, r in enumerate(pool.run(tasks.ring_on_mesh, (2, 2), case)):
        assert_close(case, r["out"], r["grads"], f"ring over a 2x2 mesh, rank {rank}")


USP_CASES = [
    Case(9, 3, 1, True, "batch"),  # U = 2 divides neither head count
    Case(8, 6, 3, True, "batch", layout="zigzag", dv=5),
    Case(3, 4, 2, True, "nofirst"),  # S < N
    Case(11, 4, 4, False, "shared", inputs="plain", scale=-0.7),
]


@pytest.mark.parametrize("shape", [(2, 2), (1, 4), (4, 1)])
def test_torch_usp_on_rxu_1xu_and_rx1_device_meshes(shape, torch_ranks) -> None:
    per_rank = torch_ranks(4).run(tasks.usp_meshes, shape, USP_CASES, timeout_s=200)
    for rank, results in enumerate(per_rank):
        for case, r in zip(USP_CASES, results, strict=True):
            assert_close(case, r["out"], r["grads"], f"usp {shape} rank {rank}")


def test_torch_ring_second_derivative_in_k_alone_raises_or_is_exact(torch_ranks) -> None:
    """DEFECT (fixed: ``_Once`` now takes q, k and v). A Hessian-vector product in k alone
    (q and v constants, e.g. a frozen query projection) was silently wrong under
    strategy='ring' instead of raising "differentiable once". ``backend_torch/ring.py:40``
    wrapped the gradients in ``_Once.apply(q, dq, dk, dv)``,
    which joins the graph only through q: when q does not require grad (or, under
    ``torch.func.grad`` over k, q is not a tracked input of that level), the ring's dk enters
    the second derivative as a constant. On 2 ranks, causal S=6, Hq=Hkv=2: loss
    ``sum(out * go) + sum(k**3)``, ``autograd.grad(create_graph=True)`` then the HVP: ring's
    differs from plain attention's by 0.52 (max |diff|; only the ``6 k vec`` term is left);
    ``torch.func.grad(torch.func.grad(...))`` over k gives all zeros (plain: sum |h| = 19.7).
    Expected: the 'differentiable once' RuntimeError, as when q requires grad."""
    case = Case(6, 2, 2, True, "none", strategy=R)
    pool = torch_ranks(2)
    ring = pool.run(tasks.hvp_k_only, case, "ring")[0]
    plain = pool.run(tasks.hvp_k_only, case, "plain")[0]
    for way in ("autograd", "func"):
        got = ring[way]
        if isinstance(got, str):
            assert "differentiable once" in got, got
        else:
            err = float(np.max(np.abs(got - plain[way])))
            assert err <= 1e-10, f"{way}: ring's HVP in k differs from plain attention by {err:.3g}"


def test_torch_func_vmap_over_ring_raises_naming_sp_attention(torch_ranks) -> None:
    """DEFECT (fixed: ``_Ring.vmap`` raises naming sp_attention and the strategies that vmap).
    ``torch.func.vmap`` over strategy='ring' raised torch's own "You tried to vmap
    over _Ring, but it does not have vmap support. Please override and implement the vmap
    staticmethod or set generate_vmap_rule=True" (``backend_torch/ring.py:14``, ``_Ring`` has no
    vmap rule): it names neither sp_attention nor what the user can do (ulysses and
    allgather_kv run under torch.vmap, test_attention_review.py). Expected: an error naming
    sp_attention(strategy='ring') and pointing to a strategy that vmaps (or ring working)."""
    message = torch_ranks(2).run(tasks.vmapped, Case(6, 2, 2, True, "batch", strategy=R))[0]
    # It must raise: "ran" would be unchecked numbers (make this compare outputs if ring
    # ever gets a vmap rule).
    assert message.startswith("RuntimeError: sp_attention(strategy='ring'): torch.func.vmap")
    assert "strategy='ulysses'" in message, message


# ------------------------------------------------------------------------ JAX, on devices


def _jax_case(case: Case, n: int, strategy: str, group=None, shape=None, axes="sp"):
    """Output and q/k/v gradients of ``sum(out * grad_out)`` of the case on an n-device mesh."""
    data = case_data(case)
    mask = None if data["key_mask"] is None else jnp.asarray(data["key_mask"])
    mesh = mesh_of(n, axes, shape=shape)

    def body(q, k, v, m):
        return sharded_attention(
            q,
            k,
            v,
            m,
            strategy=strategy,
            causal=case.causal,
            seq_len=case.seq,
            layout=case.layout,
            scale=case.scale,
            group=group,
        )

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(),) * 4, out_specs=P())

    def loss(q, k, v):
        out = f(q, k, v, mask)
        return (out * data["grad_out"]).sum(), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad(*(jnp.asarray(data[x]) for x in ("q", "k", "v")))
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.usefixtures("jax_x64")
def test_jax_ring_on_3_and_8_devices_odd_halves_zigzag_padding_and_masks() -> None:
    for n, case in [
        (3, Case(7, 4, 2, True, "batch", dv=5)),  # local 3: causal halves 2 and 1
        (8, Case(19, 2, 1, True, "batch", layout="zigzag", d=4, dv=4)),  # padded to 32
    ]:
        assert_close(case, *_jax_case(case, n, "ring"), f"jax ring n={n}")


@pytest.mark.usefixtures("jax_x64")
def test_jax_usp_with_the_tuple_in_the_other_order_than_the_mesh() -> None:
    case = Case(13, 3, 1, True, "batch", layout="zigzag", d=4, dv=3)
    # The tuple names the mesh's axes in the other order: ring over "u" (4), Ulysses over "r".
    out, grads = _jax_case(case, 8, "usp", group=("u", "r"), shape=(2, 4), axes=("r", "u"))
    assert_close(case, out, grads, "jax usp group=('u', 'r')")


@pytest.mark.usefixtures("jax_x64")
def test_jax_ring_grad_of_grad_with_a_fully_masked_row_equals_allgather_kv() -> None:
    """An HVP through the ring (JAX differentiates its explicit backward) with batch row 1
    fully masked and causal: no NaN, equal to allgather_kv's."""
    case = Case(6, 2, 1, True, "batch", d=4, dv=4)
    data = case_data(case)
    mask = jnp.asarray(data["key_mask"])
    qkv = [jnp.asarray(data[x]) for x in ("q", "k", "v")]
    vec = [jnp.sin(jnp.arange(t.size, dtype=t.dtype)).reshape(t.shape) for t in qkv]

    def hvp(strategy):
        def body(q, k, v, m):
            return sharded_attention(q, k, v, m, strategy=strategy, causal=True, seq_len=6)

        f = jax.shard_map(body, mesh=mesh_of(2), in_specs=(P(),) * 4, out_specs=P())
        g = jax.grad(lambda q, k, v: (f(q, k, v, mask) * data["grad_out"]).sum(), (0, 1, 2))

        def inner(q, k, v):
            return sum((a * b).sum() for a, b in zip(g(q, k, v), vec, strict=True))

        return jax.jit(jax.grad(inner, (0, 1, 2)))(*qkv)

    for got, want in zip(hvp("ring"), hvp("allgather_kv"), strict=True):
        assert not np.isnan(np.asarray(got)).any()
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-10)
