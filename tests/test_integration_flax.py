"""flax nnx integration: a tiny 2-layer nnx transformer (``nnx.MultiHeadAttention`` with
``attention_fn=sp_attention_fn(...)``, seeded ``nnx.Rngs``) under ``apply_nnx_plan`` on 2 and 4
JAX devices equals the same weights unsharded with nnx's own attention (``nnx.make_causal_mask``
for causal), output and parameter gradients, for lengths that divide the device count and that
do not; what it cannot do raises.

Tolerance (float32): ``|sharded - unsharded| <= 1e-5 * max(1, max|unsharded|)`` for the output
and every parameter gradient (measured: output 2e-7 to 3e-7, gradients 8e-7 to 1.6e-6)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from examples import flax_nnx
from tests.test_layout import BLOCKER, run_python

pytest.importorskip("flax")

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import sp_common as sp
import sp_common.integrations.flax as sp_flax
from sp_common.testing.mesh import mesh_of

pytestmark = pytest.mark.timeout(120)

TOL = 1e-5


@pytest.mark.parametrize(
    "n, seq, causal, strategy, layout",
    [
        # Two lengths, each on 2 and 4 devices (one unsharded reference per length).
        (2, 8, False, "ulysses", "contiguous"),
        (4, 8, False, "allgather_kv", "contiguous"),
        (2, 7, True, "ulysses", "contiguous"),
        (4, 7, True, "ring", "zigzag"),
    ],
)
def test_sharded_output_and_parameter_gradients_equal_the_unsharded_model(
    n: int, seq: int, causal: bool, strategy: Any, layout: Any
) -> None:
    worst = flax_nnx.compare(n, seq, causal, strategy=strategy, layout=layout)
    assert worst["output"] <= TOL and worst["gradients"] <= TOL, worst


def _attention(attention_fn: Any = nnx.dot_product_attention) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(
        2, 16, attention_fn=attention_fn, decode=False, keep_rngs=False, rngs=nnx.Rngs(0)
    )


def _by_hand(call: Any, x: jax.Array, mask: jax.Array | None, n: int = 2) -> np.ndarray:
    """``call(attn, x_shard, mask_shard)`` of ``sp_attention_fn()``'s module in shard_map over
    n devices, the sequence sharded by hand (``sp_shard``, S divisible by n), gathered."""
    graphdef, state = nnx.split(_attention(sp_flax.sp_attention_fn()))

    def body(state: Any, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x_s = sp.sp_shard(x, 1)
        mask_s = None if mask is None else sp.sp_shard(mask, 1)
        return sp.sp_gather(call(nnx.merge(graphdef, state), x_s, mask_s), 1)

    mapped = jax.shard_map(body, mesh=mesh_of(n), in_specs=(P(), P(), P()), out_specs=P())
    return np.asarray(jax.jit(mapped)(state, x, mask))


def _close(got: np.ndarray, want: Any) -> None:
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(1.0, np.abs(want).max()))


def test_is_causal_from_the_module_call_is_global_causal_attention() -> None:
    x = jnp.asarray(flax_nnx.inputs(8)[0])
    got = _by_hand(lambda attn, x, _: attn(x, is_causal=True), x, None)
    _close(got, _attention()(x, mask=nnx.make_causal_mask(x[..., 0])))


def test_a_key_padding_mask_broadcast_over_the_queries_is_honoured() -> None:
    x = jnp.asarray(flax_nnx.inputs(8)[0])
    valid = jnp.ones((2, 8), bool).at[1, 5:].set(False).at[0, 2].set(False)
    got = _by_hand(lambda attn, x, m: attn(x, mask=m[:, None, None, :]), x, valid)
    _close(got, _attention()(x, mask=nnx.make_attention_mask(jnp.ones((2, 8), bool), valid)))


@pytest.mark.parametrize(
    "what, message",
    [
        ("causal_mask", "mask of shape (2, 1, 4, 4)"),
        ("bias", "bias of shape (2, 2, 4, 4)"),
        ("dropout", "dropout_rate=0.1 with deterministic=False"),
        ("sow_weights", "sow_weights=True"),
        ("precision", "precision='highest'"),
        ("extra_batch_dims", "expected 4-d"),
    ],
)
def test_what_sequence_parallel_attention_lacks_raises_naming_it(what: str, message: str) -> None:
    fn = sp_flax.sp_attention_fn(causal=True)
    x = jnp.ones((2, 4, 16))
    q = jnp.ones((2, 4, 2, 8))
    with pytest.raises(ValueError, match="sp_attention_fn") as raised:
        if what == "causal_mask":
            _attention(fn)(x, mask=nnx.make_causal_mask(x[..., 0]))
        elif what == "bias":
            fn(q, q, q, bias=jnp.zeros((2, 2, 4, 4)))
        elif what == "dropout":
            attn = nnx.MultiHeadAttention(
                2, 16, attention_fn=fn, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0)
            )
            attn(x, deterministic=False)
        elif what == "sow_weights":
            _attention(fn)(x, sow_weights=True)
        elif what == "precision":
            fn(q, q, q, precision="highest")
        else:
            fn(q[None], q[None], q[None])
    assert message in str(raised.value), raised.value


def test_a_model_that_changes_its_state_in_the_planned_forward_raises() -> None:
    model = nnx.Sequential(
        nnx.Linear(16, 16, rngs=nnx.Rngs(0)), nnx.BatchNorm(16, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)
    forward = sp_flax.apply_nnx_plan(mesh_of(2))
    with pytest.raises(sp.PlanError, match="changed its state"):
        forward(graphdef, state, jnp.ones((2, 8, 16)))


def test_without_flax_the_integration_names_the_extra_to_install() -> None:
    out = run_python(BLOCKER.format(blocked=("flax",)) + "import sp_common.integrations.flax\n")
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "pip install 'sp-sharding[jax,integrations-flax]'" in out.stderr
