"""Keras 3 integration: a tiny functional Keras transformer (``SPShard``,
``SPMultiHeadAttention``, ``SPGather``; seeded weights) equals the same weights unsharded with
Keras's own ``MultiHeadAttention``, output and weight gradients, on JAX (2 and 4 devices, through
``jax_forward`` in ``shard_map``) and on torch (2 gloo ranks, with ``sync_gradients``), for lengths
that divide the world size and that do not; on torch ``model.fit`` trains the sharded copy to the
unsharded copy's weights, the same bitwise on every rank; what it cannot do raises.

Tolerance (float32): ``|sharded - unsharded| <= 1e-5 * max(1, max|unsharded|)`` for the output,
every gradient and every trained weight (measured: output 0 to 4e-7, gradients 3e-7 to 1e-6,
trained weights 1.2e-7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")  # on JAX (tests/conftest.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sp_common as sp  # noqa: E402
import sp_common.integrations.keras as sp_keras  # noqa: E402
from examples import keras_model  # noqa: E402
from sp_common.testing import RankPool  # noqa: E402
from sp_common.testing.mesh import mesh_of  # noqa: E402
from tests import keras_tasks as tasks  # noqa: E402
from tests.test_layout import run_python  # noqa: E402

pytestmark = pytest.mark.timeout(180)

TOL = 1e-5
Ranks = Callable[[int], RankPool]


def test_this_process_runs_keras_on_jax() -> None:
    assert keras.backend.backend() == "jax" == sp_keras.BACKEND


@pytest.mark.parametrize(
    "n, seq, causal, strategy, layout",
    [
        (2, 8, False, "ulysses", "contiguous"),
        (4, 7, True, "ring", "zigzag"),
    ],
)
def test_jax_output_and_gradients_equal_the_unsharded_model(
    n: int, seq: int, causal: bool, strategy: Any, layout: Any
) -> None:
    worst = keras_model.jax_compare(n, seq, causal, strategy, layout)
    assert worst["output"] <= TOL and worst["gradients"] <= TOL, worst


@pytest.mark.parametrize(
    "seq, causal, strategy, layout, fit",
    [(7, True, "ulysses", "contiguous", True), (8, False, "allgather_kv", "zigzag", False)],
)
def test_torch_output_gradients_and_fit_equal_the_unsharded_model(
    torch_ranks: Ranks, seq: int, causal: bool, strategy: Any, layout: Any, fit: bool
) -> None:
    worst = keras_model.torch_compare(torch_ranks(2), seq, causal, strategy, layout, fit)
    assert worst["output"] <= TOL and worst["gradients"] <= TOL, worst
    if fit:
        assert worst["trained"] <= TOL, worst
        assert worst["ranks differ"] == 0.0, worst  # sync_gradients: the weights never diverge


def test_torch_what_cannot_be_averaged_raises(torch_ranks: Ranks) -> None:
    for found in torch_ranks(2).run(tasks.errors_task):
        assert "sync_without_shard" in found, found
        assert "went through no SPShard or SPGather layer" in found["sync_without_shard"]
        assert "runs on the torch backend" in found["jax_forward"]
        assert "SPGather: no SPShard(sequence='sequence') ran" in found["gather_without_shard"]


def test_torch_real_length_per_call_of_a_sequence_sharded_by_hand(torch_ranks: Ranks) -> None:
    for run in torch_ranks(2).run(tasks.by_hand_task, 7):
        np.testing.assert_allclose(run["got"], run["want"], rtol=0, atol=TOL)


def test_jax_real_length_per_call_of_a_sequence_sharded_by_hand() -> None:
    x = jnp.asarray(keras_model.inputs(7)[0])
    theirs = keras.layers.MultiHeadAttention(2, 8)
    ours = sp_keras.SPMultiHeadAttention(2, 8)
    want = theirs(x, x, use_causal_mask=True)
    ours.build(x.shape, x.shape)
    ours.set_weights(theirs.get_weights())
    weights = [v.value for v in ours.trainable_variables]

    def body(weights: list[jax.Array], x: jax.Array) -> jax.Array:
        shard, pad = sp.sp_shard_with_padding(x, 1)
        out, _ = ours.stateless_call(weights, [], shard, shard, seq_len=7, use_causal_mask=True)
        return sp.sp_gather(out, 1, pad_size=pad)

    mesh = mesh_of(4)
    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P()))(weights, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)


def test_jax_keras_padding_mask_is_sharded_with_the_sequence() -> None:
    """Token ids with padding (id 0) in one row, ``Embedding(mask_zero=True)``: the Keras mask
    reaches the attention as its key mask through SPShard; the rows of real tokens equal
    Keras's own attention on the whole sequence (a masked query's row is not defined there)."""
    ids = np.array([[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 0, 0, 0]], np.int32)

    def build(sharded: bool) -> Any:
        keras.utils.set_random_seed(0)
        inp = keras.Input((None,), dtype="int32")
        h = keras.layers.Embedding(10, 16, mask_zero=True)(inp)
        if sharded:
            h = sp_keras.SPShard()(h)
            h = h + sp_keras.SPMultiHeadAttention(2, 8)(h, h)
            h = sp_keras.SPGather()(h)
        else:
            h = h + keras.layers.MultiHeadAttention(2, 8)(h, h)
        return keras.Model(inp, h)

    reference, model = build(False), build(True)
    model.set_weights(reference.get_weights())
    want = np.asarray(reference(ids))
    trainable = [v.value for v in model.trainable_variables]
    mesh = mesh_of(2)
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(sp_keras.jax_forward(model, mesh))(trainable, [], ids))
    real = ids != 0
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=TOL)


def test_jax_model_called_outside_shard_map_raises_instead_of_running_unsharded() -> None:
    x, w = keras_model.inputs(8)
    model = keras_model.tiny_model(True, causal=True)
    with pytest.raises(ValueError, match="jax_forward") as called:
        model(x)
    assert "no mesh axis is bound" in str(called.value)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"model\.fit, model\.predict and model"):
        model.fit(x, w, epochs=1, verbose=0)


def test_strict_false_runs_the_layers_at_world_size_one() -> None:
    x = keras_model.inputs(7)[0]
    reference = keras.layers.MultiHeadAttention(2, 8)
    ours = sp_keras.SPMultiHeadAttention(2, 8, strict=False)
    want = reference(x, x, use_causal_mask=True)
    inp = keras.Input((None, 16))
    h = sp_keras.SPShard(strict=False)(inp)
    model = keras.Model(inp, sp_keras.SPGather(strict=False)(ours(h, h, use_causal_mask=True)))
    ours.set_weights(reference.get_weights())
    got = model(jnp.asarray(x))  # outside shard_map: world size 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=TOL)


def test_a_record_lives_for_one_model_call() -> None:
    """SPShard called on its own records nothing a later call reads: SPGather on its own then
    raises instead of guessing the padding."""
    x = jnp.asarray(keras_model.inputs(7)[0])
    sp_keras.SPShard(strict=False)(x)
    with pytest.raises(sp.PlanError, match=r"no SPShard\(sequence='sequence'\) ran"):
        sp_keras.SPGather(strict=False)(x)


def test_what_sequence_parallel_attention_cannot_compute_raises() -> None:
    x = jnp.asarray(keras_model.inputs(8)[0])
    layer = sp_keras.SPMultiHeadAttention(2, 8, strict=False)
    with pytest.raises(ValueError, match="attention_mask of shape"):
        layer(x, x, attention_mask=jnp.ones((2, 8, 8), bool))
    with pytest.raises(ValueError, match="return_attention_scores=True"):
        layer(x, x, return_attention_scores=True)
    with pytest.raises(ValueError, match=r"dropout=0\.1"):
        sp_keras.SPMultiHeadAttention(2, 8, dropout=0.1)
    with pytest.raises(ValueError, match="attention_axes"):
        sp_keras.SPMultiHeadAttention(2, 8, attention_axes=(1, 2))
    with pytest.raises(ValueError, match="axis=2 for a 3-d input"):
        sp_keras.SPShard(axis=2, strict=False)(x)
    with pytest.raises(TypeError, match=r"jax\.grad through"):
        sp_keras.sync_gradients(keras_model.tiny_model(True, causal=False))


def test_the_layers_round_trip_through_their_config() -> None:
    layer = sp_keras.SPMultiHeadAttention(2, 8, strategy="ring", layout="zigzag", strict=False)
    again = sp_keras.SPMultiHeadAttention.from_config(layer.get_config())
    assert (again.strategy, again.layout, again.strict, again.num_heads) == (
        "ring",
        "zigzag",
        False,
        2,
    )
    shard = sp_keras.SPShard.from_config(sp_keras.SPShard(-2, layout="zigzag").get_config())
    assert (shard.axis, shard.layout, shard.strict) == (-2, "zigzag", True)
    gather = sp_keras.SPGather.from_config(sp_keras.SPGather(sequence="text").get_config())
    assert gather.sequence == "text"


def test_a_backend_other_than_torch_or_jax_names_the_ones_that_work() -> None:
    out = run_python(
        "import os\nos.environ['KERAS_BACKEND'] = 'numpy'\nimport sp_common.integrations.keras\n"
    )
    assert out.returncode != 0
    assert "set KERAS_BACKEND=torch or KERAS_BACKEND=jax" in out.stderr


def test_jax_forward_raises_where_the_model_updates_its_state() -> None:
    x = keras.Input((None, 4))
    h = sp_keras.SPShard()(keras.layers.BatchNormalization()(x))  # before the shard: whole
    model = keras.Model(x, sp_keras.SPGather()(h))
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]
    mesh = mesh_of(2)
    data = np.ones((2, 6, 4), np.float32)
    with jax.set_mesh(mesh):
        same = jax.jit(sp_keras.jax_forward(model, mesh))(trainable, fixed, data)
        assert same.shape == (2, 6, 4)  # inference: the running statistics are only read
        with pytest.raises(sp.PlanError, match="updated a non-trainable weight"):
            jax.jit(sp_keras.jax_forward(model, mesh, training=True))(trainable, fixed, data)


@pytest.mark.parametrize(
    "between, training, named",
    [
        (lambda h: keras.layers.MultiHeadAttention(2, 8)(h, h), False, "MultiHeadAttention"),
        (keras.layers.Conv1D(16, 3, padding="same"), False, "Conv1D"),
        (keras.layers.BatchNormalization(), True, "BatchNormalization"),
    ],
)
def test_a_layer_that_combines_tokens_on_the_shard_raises_naming_it(
    between: Any, training: bool, named: str
) -> None:
    inp = keras.Input((None, 16))
    model = keras.Model(inp, sp_keras.SPGather()(between(sp_keras.SPShard()(inp))))
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]
    mesh = mesh_of(2)
    x = jnp.asarray(keras_model.inputs(8)[0])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=f"\\({named}\\) between SPShard"):
        jax.jit(sp_keras.jax_forward(model, mesh, training=training))(trainable, fixed, x)


def test_torch_ranks_given_different_batches_raise_and_a_nan_is_no_difference(
    torch_ranks: Ranks,
) -> None:
    for found in torch_ranks(2).run(tasks.replicated_check_task):
        assert found["nan"] == "shape (2, 2, 3)", found
        assert "the SP ranks were given different inputs" in found["swapped"], found
