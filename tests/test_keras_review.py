"""Review of the Keras 3 integration: uses that the main tests do not reach (key != value,
cross-attention between two named sequences, output_shape / use_bias=False / use_gate, zigzag
with padding, fewer tokens than ranks, a (data, sp) mesh, mixed precision, a weight on both
sides of the shard, sync_gradients twice, no_grad / predict / evaluate, save and load, model.fit
with Adam, gradient accumulation, validation data and a seeded shuffle) equal the same weights
unsharded with Keras's own ``MultiHeadAttention``, or raise saying what to do.

Tolerance (float32): ``|sharded - unsharded| <= 1e-5 * max(1, max|unsharded|)``. Under a
mixed-precision policy the sharded model's distance from the float32 model is at most twice
Keras's own unsharded model's plus 1e-3."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"  # this process's Keras; the torch ranks set their own
keras = pytest.importorskip("keras")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sp_common.integrations.keras as sp_keras  # noqa: E402
from examples import keras_model  # noqa: E402
from sp_common.testing import RankPool  # noqa: E402
from sp_common.testing.mesh import mesh_of  # noqa: E402
from tests import keras_review_tasks as tasks  # noqa: E402

pytestmark = pytest.mark.timeout(180)

TOL = 1e-5
Ranks = Callable[[int], RankPool]


def relative(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max(initial=0.0) / max(1.0, float(np.abs(want).max())))


def attention_model(
    sharded: bool,
    mha: dict[str, Any] | None = None,
    *,
    causal: bool = False,
    key_value: bool = False,
    context: str | None = None,
    layout: Any = "contiguous",
    strategy: Any = "ulysses",
) -> Any:
    """``[x [B, S, 16], c [B, Sc, 16]] -> [B, S, F']``: (SPShard) attention (SPGather).
    ``key_value``: value and key are two Dense projections of the shard (key != value).
    ``context``: cross-attention to ``c``, sharded under that record name and read by the
    attention through ``sequence=context``; else self-attention and ``c`` unused."""
    keras.utils.set_random_seed(0)
    x, c = keras.Input((None, 16)), keras.Input((None, 16))
    h = sp_keras.SPShard(layout=layout)(x) if sharded else x
    value = key = None
    if key_value:
        value, key = keras.layers.Dense(16)(h), keras.layers.Dense(16)(h)
    elif context is not None:
        value = sp_keras.SPShard(layout=layout, sequence=context)(c) if sharded else c
    options = dict(num_heads=2, key_dim=8) | (mha or {})
    if sharded:
        layer = sp_keras.SPMultiHeadAttention(
            strategy=strategy, sequence=context or sp_keras.SEQUENCE, **options
        )
    else:
        layer = keras.layers.MultiHeadAttention(**options)
    a = layer(h, h if value is None else value, key=key, use_causal_mask=causal)
    return keras.Model([x, c], sp_keras.SPGather()(a) if sharded else a)


def jax_differences(n: int, seq: int, ctx: int, mesh: Any = None, **kwargs: Any) -> list[float]:
    """``[output, gradients]``: the largest relative differences of :func:`attention_model`
    sharded on ``n`` devices (``jax_forward``) from unsharded, loss ``sum(y * y)``."""
    reference, model = attention_model(False, **kwargs), attention_model(True, **kwargs)
    model.set_weights(reference.get_weights())
    rng = np.random.default_rng(1)
    data = [jnp.asarray(rng.standard_normal((2, s, 16)).astype(np.float32)) for s in (seq, ctx)]
    trainable = [v.value for v in reference.trainable_variables]
    mesh = mesh or mesh_of(n)
    forward = sp_keras.jax_forward(model, mesh)

    def unsharded(t: list[jax.Array]) -> jax.Array:
        return reference.stateless_call(t, [], data)[0]

    def sharded(t: list[jax.Array]) -> jax.Array:
        return forward(t, [], data)

    found = []
    for call in (unsharded, sharded):
        with jax.set_mesh(mesh):
            out = jax.jit(call)(trainable)
            grads = jax.jit(jax.grad(lambda t, call=call: (call(t) ** 2).sum()))(trainable)
        found.append((out, grads))
    (want, want_g), (got, got_g) = found
    return [relative(got, want), max(relative(a, b) for a, b in zip(got_g, want_g, strict=True))]


@pytest.mark.parametrize(
    "n, seq, ctx, kwargs",
    [
        (2, 7, 7, {"key_value": True, "causal": True}),
        (2, 7, 7, {"mha": {"num_heads": 3, "key_dim": 4, "output_shape": (6,), "use_bias": False}}),
        (2, 7, 7, {"mha": {"use_gate": True}, "causal": True, "strategy": "allgather_kv"}),
        (4, 5, 5, {"causal": True, "layout": "zigzag", "strategy": "ring"}),
        (4, 1, 1, {"causal": True, "strategy": "auto"}),
        (2, 8, 7, {"context": "ctx"}),
    ],
    ids=["key-not-value", "output-shape-no-bias", "gate", "zigzag-padded-ring", "S<N", "cross"],
)
def test_jax_attention_variants_equal_keras_own_layer(
    n: int, seq: int, ctx: int, kwargs: dict[str, Any]
) -> None:
    diffs = jax_differences(n, seq, ctx, **kwargs)
    assert max(diffs) <= TOL, diffs


def test_jax_a_data_by_sp_mesh_gives_the_unsharded_output_and_gradients() -> None:
    mesh = mesh_of(4, axis=("data", "sp"), shape=(2, 2))
    diffs = jax_differences(2, 7, 7, mesh=mesh, causal=True)
    assert max(diffs) <= TOL, diffs


def test_jax_cross_attention_of_different_shard_lengths_raises() -> None:
    with pytest.raises(ValueError, match=r"got q \(2, 4, 2, 8\), k \(2, 2, 2, 8\)"):
        jax_differences(2, 8, 4, context="ctx")


def test_jax_predict_raises_naming_jax_forward() -> None:
    model = keras_model.tiny_model(True, causal=True)
    with pytest.raises(ValueError, match="jax_forward"):
        model.predict(keras_model.inputs(8)[0], verbose=0)


def test_jax_mixed_bfloat16_is_as_close_to_float32_as_keras_own_layer() -> None:
    x = jnp.asarray(keras_model.inputs(7)[0])
    full = keras_model.tiny_model(False, causal=True)
    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model, reference = keras_model.models(causal=True)
    finally:
        keras.mixed_precision.set_dtype_policy(before)
    trainable = [v.value for v in full.trainable_variables]
    mesh = mesh_of(2)
    with jax.set_mesh(mesh):
        got = jax.jit(sp_keras.jax_forward(model, mesh))(trainable, [], x)
    want = reference.stateless_call(trainable, [], x)[0]
    exact = full.stateless_call(trainable, [], x)[0]
    assert got.dtype == want.dtype == jnp.bfloat16
    assert relative(got, exact) <= 2 * relative(want, exact) + 1e-3


def test_torch_a_weight_used_before_the_shard_and_after_the_gather(torch_ranks: Ranks) -> None:
    for found in torch_ranks(2).run(tasks.shared_weight_task, 7):
        assert max(found.values()) <= TOL, found


def test_torch_sync_gradients_twice_still_gives_the_unsharded_gradients(
    torch_ranks: Ranks,
) -> None:
    for found in torch_ranks(2).run(tasks.sync_twice_task, 7):
        assert found["gradients"] <= TOL, found


def test_torch_no_grad_predict_and_evaluate_equal_the_unsharded_model(
    torch_ranks: Ranks,
) -> None:
    for found in torch_ranks(2).run(tasks.no_grad_inference_task, 7):
        assert max(found.values()) <= TOL, found


def test_torch_a_saved_and_loaded_model_keeps_its_sp_layers_and_answers(
    torch_ranks: Ranks,
) -> None:
    for found in torch_ranks(2).run(tasks.save_load_task, 7):
        assert found["sp_layers"] == 1.0, found
        assert found["output"] <= TOL and found["gradients"] <= TOL, found


@pytest.mark.parametrize(
    "optimizer, accumulate, validate, shuffle",
    [("sgd", 2, True, True), ("adam", 2, False, True)],
)
def test_torch_fit_with_accumulation_validation_and_a_seeded_shuffle(
    torch_ranks: Ranks, optimizer: str, accumulate: int, validate: bool, shuffle: bool
) -> None:
    runs = torch_ranks(2).run(tasks.fit_task, 7, optimizer, accumulate, validate, shuffle)
    for found, _ in runs:
        assert max(found.values()) <= TOL, found
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_array_equal(a, b)  # sync_gradients: the ranks never diverge


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_torch_mixed_precision_is_as_close_to_float32_as_keras_own_layer(
    torch_ranks: Ranks, policy: str
) -> None:
    for found in torch_ranks(2).run(tasks.mixed_precision_task, policy, 7):
        assert found["dtype match"] == 1.0, found
        assert found["sharded output"] <= 2 * found["keras output"] + 1e-3, found
        assert found["sharded gradients"] <= 2 * found["keras gradients"] + 1e-3, found
