"""sp_attention against the float64 numpy reference: causal x grouped KV heads x padding x head
counts the world size does not divide x key masks x dtypes, forward and gradients, on torch
2 and 4 gloo ranks and JAX 2, 4 and 8 devices (an all-pairs sample of the product), torch and
JAX agreeing; the joint text+image case; world size 1; the head split; compile; debug mode."""

from __future__ import annotations

import functools
import itertools
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import sp_common as sp
from sp_common.attention.heads import head_layout
from sp_common.testing import reference_attention, reference_attention_grads
from sp_common.testing.mesh import mesh_of

from . import attention_tasks as tasks
from .attention_tasks import AttnCase, case_inputs

pytestmark = pytest.mark.timeout(600)

# |got - want| <= TOL * max(1, max |want|), per output and per gradient.
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}

# (query heads, {"mha" | "gqa" | "mqa": key/value heads}) per world size, divisible or not.
HEADS = {
    (2, True): (4, {"mha": 4, "gqa": 2, "mqa": 1}),
    (2, False): (3, {"mha": 3, "gqa": 1, "mqa": 1}),
    (4, True): (8, {"mha": 8, "gqa": 2, "mqa": 1}),  # gqa: 2 kv heads repeated twice
    (4, False): (6, {"mha": 6, "gqa": 2, "mqa": 1}),
    (8, True): (16, {"mha": 16, "gqa": 2, "mqa": 1}),
    (8, False): (6, {"mha": 6, "gqa": 2, "mqa": 1}),  # fewer heads than ranks
}
# Sequence lengths: divisible by N, not divisible, shorter than N.
LENGTHS = {"divides": lambda n: 2 * n, "pads": lambda n: 2 * n + 3, "short": lambda n: n - 1}

FACTORS = {
    "strategy": ("ulysses", "allgather_kv", "ring", "usp"),
    "layout": ("contiguous", "zigzag"),
    "causal": (False, True),
    "kv": ("mha", "gqa", "mqa"),
    "length": tuple(LENGTHS),
    "heads_divide": (True, False),
    "mask": tasks.MASKS,
    "dtype": ("float64", "float32", "bfloat16", "float16"),
}


def all_pairs(seed: int) -> list[dict[str, Any]]:
    """A small set of factor combinations that contains every pair of levels of every two
    factors (greedy, seeded)."""
    names = list(FACTORS)
    wanted = {
        (a, x, b, y)
        for a, b in itertools.combinations(names, 2)
        for x in FACTORS[a]
        for y in FACTORS[b]
    }
    candidates = [dict(zip(names, c, strict=True)) for c in itertools.product(*FACTORS.values())]
    random.Random(seed).shuffle(candidates)
    chosen = []
    while wanted:
        best = max(
            candidates,
            key=lambda c: sum(
                (a, c[a], b, c[b]) in wanted for a, b in itertools.combinations(names, 2)
            ),
        )
        wanted -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
        chosen.append(best)
    return chosen


# A seed per world size whose greedy sample has 17 cases (most seeds give 19-24; 16, strategy x
# dtype, is the least any sample can have): each case is one XLA compile of about a second.
SEEDS = {2: 7, 4: 21, 8: 24}


def cases_for(n: int) -> list[AttnCase]:
    out = []
    for i, c in enumerate(all_pairs(seed=SEEDS[n])):
        hq, kv = HEADS[(n, c["heads_divide"])]
        seq = LENGTHS[c["length"]](n)
        kv_heads = kv[c["kv"]]
        out.append(
            AttnCase(
                n,
                seq,
                hq,
                kv_heads,
                c["causal"],
                c["mask"],
                c["dtype"],
                seed=i,
                strategy=c["strategy"],
                layout=c["layout"],
            )
        )
    return out


def reference(case: AttnCase) -> tuple[np.ndarray, list[np.ndarray]]:
    data = case_inputs(case)
    q, k, v, mask = data["q"], data["k"], data["v"], data["key_mask"]
    out = reference_attention(q, k, v, causal=case.causal, key_mask=mask)
    grads = reference_attention_grads(q, k, v, data["grad_out"], causal=case.causal, key_mask=mask)
    return out, list(grads)


def assert_matches(case: AttnCase, out: np.ndarray, grads: list[np.ndarray], who: str) -> None:
    want, want_grads = reference(case)
    tol = TOL[case.dtype]
    for name, got, expected in zip(
        ("out", "dq", "dk", "dv"), [out, *grads], [want, *want_grads], strict=True
    ):
        assert got.shape == expected.shape, f"{who} {case.label} {name}: shape"
        err = float(np.max(np.abs(got - expected), initial=0.0))
        bound = tol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        assert err <= bound, f"{who} {case.label} {name}: max |diff| {err:.3g} > {bound:.3g}"


@functools.cache
def jax_attention(case: AttnCase) -> tuple[np.ndarray, list[np.ndarray]]:
    """The case under ``jit(shard_map)`` on ``case.n`` devices: shard with padding, attend,
    gather; the gradients of ``sum(out * grad_out)``. One compile gives the output and the
    gradients; cached (the agreement test reads the same cases)."""
    data = case_inputs(case)
    mask = None if data["key_mask"] is None else jnp.asarray(data["key_mask"])

    def body(q, k, v, mask):
        return tasks.sharded_attention(
            q,
            k,
            v,
            mask,
            strategy=case.strategy,
            causal=case.causal,
            seq_len=case.seq,
            layout=case.layout,
            group=group,
        )

    group, mesh = None, mesh_of(case.n)
    if case.strategy == "usp":
        group = tasks.USP_AXES
        mesh = mesh_of(case.n, group, shape=tasks.usp_shape(case.n))
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(),) * 4, out_specs=P())

    def loss(q, k, v):
        out = f(q, k, v, mask)
        return (out.astype(jnp.float64) * data["grad_out"]).sum(), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad(*(jnp.asarray(data[name]) for name in ("q", "k", "v")))
    return np.asarray(out).astype(np.float64), [np.asarray(g).astype(np.float64) for g in grads]


def test_the_pairwise_sample_covers_every_pair_of_levels() -> None:
    for n in (2, 4, 8):
        chosen = all_pairs(seed=SEEDS[n])
        for a, b in itertools.combinations(FACTORS, 2):
            assert {(c[a], c[b]) for c in chosen} == set(itertools.product(FACTORS[a], FACTORS[b]))
        assert len(chosen) == 17


@pytest.mark.parametrize("n", [2, 4])
def test_torch_attention_equals_full_attention_forward_and_gradients(n, torch_ranks) -> None:
    cases = cases_for(n)
    per_rank = torch_ranks(n).run(tasks.torch_attention, cases, timeout_s=280)
    for rank, results in enumerate(per_rank):
        for case, r in zip(cases, results, strict=True):
            assert_matches(case, r["out"], r["grads"], f"torch rank {rank}")


@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("n", [2, 4, 8])
def test_jax_attention_equals_full_attention_forward_and_gradients(n) -> None:
    for case in cases_for(n):
        assert_matches(case, *jax_attention(case), "jax")


@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("n", [2, 4])
def test_torch_and_jax_agree_on_every_case(n, torch_ranks) -> None:
    cases = [c for c in cases_for(n) if c.dtype in ("float64", "float32")]
    torch_results = torch_ranks(n).run(tasks.torch_attention, cases, timeout_s=280)[0]
    for case, t in zip(cases, torch_results, strict=True):
        out, grads = jax_attention(case)
        tol = 2 * TOL[case.dtype]
        for a, b in zip([t["out"], *t["grads"]], [out, *grads], strict=True):
            assert np.max(np.abs(a - b), initial=0.0) <= tol * max(1.0, np.abs(b).max()), case.label


@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("causal", [False, True])
def test_world_size_one_is_plain_attention_with_the_same_semantics(causal) -> None:
    case = AttnCase(1, 7, 6, 2, causal, "batch", "float64")
    data = case_inputs(case)
    want, _ = reference(case)
    tq, tk, tv = (torch.tensor(data[n], requires_grad=True) for n in ("q", "k", "v"))
    out = sp.sp_attention(tq, tk, tv, causal=causal, key_mask=torch.from_numpy(data["key_mask"]))
    (out * torch.from_numpy(data["grad_out"])).sum().backward()
    assert_matches(case, out.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)], "torch")

    mask = jnp.asarray(data["key_mask"])

    def f(q, k, v):
        return sp.sp_attention(q, k, v, causal=causal, key_mask=mask)

    args = [jnp.asarray(data[n]) for n in ("q", "k", "v")]
    grads = jax.grad(lambda *a: (f(*a) * data["grad_out"]).sum(), argnums=(0, 1, 2))(*args)
    assert_matches(case, np.asarray(jax.jit(f)(*args)), [np.asarray(g) for g in grads], "jax")
    np.testing.assert_allclose(np.asarray(f(*args)), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "hq_hkv", [(h, k) for h in range(1, 17) for k in range(1, h + 1) if h % k == 0]
)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_the_head_split_keeps_each_query_head_with_its_kv_head_and_repeats_least(hq_hkv, n) -> None:
    hq, hkv = hq_hkv
    layout = head_layout(hq, hkv, n)
    q_heads, kv_heads = hq + layout.pad, hkv * layout.repeat + layout.pad
    assert q_heads % n == 0 and kv_heads % n == 0
    # After the repeat, query head h reads key/value head h // (q_heads / kv_heads) (padded
    # heads read padded ones); each rank must hold the kv head of each of its query heads.
    group = q_heads // kv_heads
    for h in range(q_heads):
        assert h // (q_heads // n) == (h // group) // (kv_heads // n)
    if layout.pad == 0:
        g = hq // hkv
        smaller = [r for r in range(1, layout.repeat) if g % r == 0 and hkv * r % n == 0]
        assert smaller == [], f"repeat {layout.repeat} where {smaller[0]} suffices"
    else:
        assert hq % n and layout.pad == -hq % n


def joint_reference(text, image, masks):
    """Unsharded joint attention over [text, image] with their key masks."""
    q = np.concatenate([text[0], image[0]], axis=1)
    k = np.concatenate([text[1], image[1]], axis=1)
    v = np.concatenate([text[2], image[2]], axis=1)
    return reference_attention(q, k, v, key_mask=np.concatenate(masks, axis=1))


def joint_inputs(
    len_text: int, len_image: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(7)
    text = [rng.standard_normal((2, len_text, 4, 8)) for _ in range(3)]
    image = [rng.standard_normal((2, len_image, 4, 8)) for _ in range(3)]
    text_mask = rng.random((2, len_text)) < 0.7  # some text tokens are padding of the prompt
    text_mask[:, 0] = True
    return text, image, [text_mask, np.ones((2, len_image), bool)]


@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("n", [2, 4])
def test_joint_text_and_image_streams_each_sharded_and_padded_are_exact(n, torch_ranks) -> None:
    """Flux-style joint attention: each stream sharded and padded on its own, the two chunks
    concatenated per rank, the padding of both and the prompt mask passed as key_mask."""
    text, image, masks = joint_inputs(5, 2 * n + 1)
    want = joint_reference(text, image, masks)
    got_torch = torch_ranks(n).run(tasks.torch_joint, text, image, masks)
    for rank, got in enumerate(got_torch):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"torch rank {rank}")

    def body(*arrays):
        return tasks.joint_attention(list(arrays[:3]), list(arrays[3:6]), list(arrays[6:]))

    f = jax.jit(jax.shard_map(body, mesh=mesh_of(n), in_specs=(P(),) * 8, out_specs=P()))
    got = f(*map(jnp.asarray, [*text, *image, *masks]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_sp_ulysses_attention_is_sp_attention_with_the_strategy_fixed(torch_ranks) -> None:
    for r in torch_ranks(2).run(tasks.ulysses_is_attention):
        assert r == {"equal": True}


@pytest.mark.parametrize(
    ("seq", "strategy", "n", "compiler"),
    [
        # Inductor once, on the padded Ulysses block (its code for attention, forward and
        # backward); elsewhere AOT autograd, which traces the same forward and backward graph at
        # a fraction of the compile time (ring on inductor: ~30 s with a cold cache).
        (8, "ulysses", 2, "aot_eager"),
        (7, "ulysses", 2, "inductor"),
        (7, "ring", 2, "aot_eager"),
        # USP over a 2 x 2 DeviceMesh (inductor on 4 ranks takes ~2 minutes here)
        (11, "usp", 4, "aot_eager"),
    ],
    ids=["divides", "padded", "ring-padded", "usp-padded"],
)
def test_torch_compile_traces_causal_grouped_attention_in_one_graph(
    seq, strategy, n, compiler, torch_ranks
) -> None:
    for r in torch_ranks(n).run(tasks.attention_compiled, seq, strategy, compiler, timeout_s=280):
        assert r["frames"] == 1
        # compiled vs eager float32: the same math, fused and ordered differently
        assert r["max_out_diff"] <= 1e-6 and r["max_grad_diff"] <= TOL["float32"]


@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize(
    ("n", "strategy", "layout"),
    [
        (1, "ulysses", "contiguous"),
        (2, "ulysses", "contiguous"),
        (2, "ulysses", "zigzag"),
        (2, "allgather_kv", "contiguous"),
        (4, "allgather_kv", "zigzag"),
    ],
)
def test_the_jax_kernel_walks_the_keys_in_blocks_exactly(n, strategy, layout, monkeypatch) -> None:
    """Blocks of 4 keys over 11 (+1 padded) keys: the online softmax across blocks, a padded
    last block, causal masks that cut blocks, and a batch row with no key at all."""
    import backend_jax.attention

    monkeypatch.setattr(backend_jax.attention, "KEY_BLOCK", 4)
    case = AttnCase(n, 11, 6, 2, True, "batch", "float64", strategy=strategy, layout=layout)
    if n == 1:
        data = case_inputs(case)
        mask = jnp.asarray(data["key_mask"])

        def f(q, k, v):
            return sp.sp_attention(q, k, v, causal=True, key_mask=mask)

        args = [jnp.asarray(data[name]) for name in ("q", "k", "v")]
        grads = jax.grad(lambda *a: (f(*a) * data["grad_out"]).sum(), argnums=(0, 1, 2))(*args)
        assert_matches(case, np.asarray(jax.jit(f)(*args)), [np.asarray(g) for g in grads], "jax")
    else:  # not the cache: its entry may come from the default block size
        assert_matches(case, *jax_attention.__wrapped__(case), "jax")


def test_jax_attention_memory_grows_linearly_with_the_sequence_not_quadratically() -> None:
    """XLA's own accounting of the compiled kernel's temporaries (forward): one [S, block]
    tile of logits per head at a time, never [S, S]."""
    from backend_jax.attention import attention

    def temp_bytes(seq: int) -> int:
        q = jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)
        f = jax.jit(lambda q, k, v: attention(q, k, v, scale=0.2, causal=True, key_mask=None))
        return int(f.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes)

    small, large = temp_bytes(2048), temp_bytes(8192)
    assert large <= 4.5 * small  # 4x the length: linear is 4x, quadratic 16x
    assert large < 2 * 8192 * 8192 * 4 / 4  # far below the [2, S, S] float32 logits
