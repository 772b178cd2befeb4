"""A tiny Keras 3 transformer sharded on the sequence, on torch or JAX, against unsharded.

Run from the repository root (the backend is Keras's, from ``KERAS_BACKEND``; default jax)::

    KERAS_BACKEND=jax .venv/bin/python -m examples.keras_model     # 4 JAX CPU devices
    KERAS_BACKEND=torch .venv/bin/python -m examples.keras_model   # 2 gloo ranks, and model.fit

One functional Keras model (``Dense``, ``SPShard``, 2 blocks of ``LayerNormalization``,
``SPMultiHeadAttention`` (2 heads of 8) and an MLP, ``SPGather``, ``Dense``; seeded weights:
nothing is downloaded) runs sharded on a batch of 2 sequences of 10 tokens (4 devices do not
divide 10, so ``SPShard`` pads), causal and not. The same weights run unsharded with Keras's own
``MultiHeadAttention``. JAX runs it through ``jax_forward`` in ``shard_map``; torch runs it on
every rank with ``sync_gradients``, then trains both copies with ``model.fit`` (2 epochs of SGD)
and compares the trained weights. It prints the largest differences of the output, the weight
gradients and the trained weights, and exits 1 when one exceeds ``TOL`` (relative to
``max(1, max|unsharded|)``, float32) or when the ranks' trained weights differ at all.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from examples.verdict import relative, verdict, worst
from sp_common.attention.api import Strategy
from sp_common.layouts import Layout

WORLD = {"jax": 4, "torch": 2}
BATCH, SEQ, HIDDEN, HEADS, OUT = 2, 10, 16, 2, 4
SEED = 0
TOL = 1e-5
CALL_TIMEOUT_S = 240


def backend() -> str:
    """Keras's backend for this process: ``KERAS_BACKEND`` (set to ``"jax"`` when unset)."""
    return os.environ.setdefault("KERAS_BACKEND", "jax")


def tiny_model(
    sharded: bool,
    causal: bool,
    strategy: Strategy = "ulysses",
    layout: Layout = "contiguous",
    seed: int = SEED,
) -> Any:
    """``keras.Model``: ``x [B, S, 16] -> [B, S, 4]``: Dense 16, then per block (2)
    LayerNormalization, multi-head attention (2 heads of 8, causal or not), residual,
    LayerNormalization, Dense 32 (gelu), Dense 16, residual; then Dense 4. ``sharded``: the
    blocks run on ``SPShard``'s shard with ``SPMultiHeadAttention`` and ``SPGather`` after
    them; else Keras's own ``MultiHeadAttention`` on the whole sequence. Weights from
    ``keras.utils.set_random_seed(seed)`` (the same layers in the same order either way)."""
    backend()
    import keras  # type: ignore[import-untyped]

    import sp_common.integrations.keras as sp_keras

    keras.utils.set_random_seed(seed)
    x = keras.Input((None, HIDDEN))
    h = keras.layers.Dense(HIDDEN)(x)
    if sharded:
        h = sp_keras.SPShard(layout=layout)(h)
    for _ in range(2):
        a = keras.layers.LayerNormalization()(h)
        if sharded:
            a = sp_keras.SPMultiHeadAttention(HEADS, HIDDEN // HEADS, strategy=strategy)(
                a, a, use_causal_mask=causal
            )
        else:
            a = keras.layers.MultiHeadAttention(HEADS, HIDDEN // HEADS)(
                a, a, use_causal_mask=causal
            )
        h = h + a
        m = keras.layers.LayerNormalization()(h)
        m = keras.layers.Dense(2 * HIDDEN, activation="gelu")(m)
        h = h + keras.layers.Dense(HIDDEN)(m)
    if sharded:
        h = sp_keras.SPGather()(h)
    return keras.Model(x, keras.layers.Dense(OUT)(h))


def inputs(seq: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The input ``x [B, S, 16]`` and the output weights ``w [B, S, 4]`` of the loss
    ``sum(y * w)`` (every output element gets its own gradient; also ``model.fit``'s target),
    float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, seq, HIDDEN)).astype(np.float32)
    return x, rng.standard_normal((BATCH, seq, OUT)).astype(np.float32)


def models(
    causal: bool, strategy: Strategy = "ulysses", layout: Layout = "contiguous"
) -> tuple[Any, Any]:
    """``(sharded, unsharded)`` :func:`tiny_model` s with the same weights."""
    reference = tiny_model(False, causal)
    model = tiny_model(True, causal, strategy, layout)
    model.set_weights(reference.get_weights())
    return model, reference


def torch_on_rank(
    seq: int, causal: bool, strategy: Strategy, layout: Layout, fit: bool
) -> dict[str, Any]:
    """On every torch rank (``KERAS_BACKEND=torch``): both models' output and weight gradients
    of ``sum(y * w)``, and with ``fit`` their weights after ``model.fit`` (SGD, 2 epochs of
    batch 1, no shuffling: every rank sees the same batches)."""
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import torch

    import sp_common.integrations.keras as sp_keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"Keras was imported with backend {keras.backend.backend()!r}")
    x, w = inputs(seq)
    model, reference = models(causal, strategy, layout)
    sp_keras.sync_gradients(model)
    results: dict[str, Any] = {}
    for name, m in (("sharded", model), ("unsharded", reference)):
        y = m(torch.from_numpy(x))
        (y * torch.from_numpy(w)).sum().backward()
        result = {"output": y.detach().numpy()}
        for i, v in enumerate(m.trainable_variables):
            result[f"grad/{i}"] = v.value.grad.detach().numpy().copy()
            v.value.grad = None
        if fit:
            m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            m.fit(x, w, batch_size=1, epochs=2, shuffle=False, verbose=0)
            result["trained"] = [np.asarray(v) for v in m.get_weights()]
        results[name] = result
    return results


def torch_compare(
    pool: Any,
    seq: int = SEQ,
    causal: bool = True,
    strategy: Strategy = "ulysses",
    layout: Layout = "contiguous",
    fit: bool = True,
) -> dict[str, float]:
    """Run :func:`torch_on_rank` on ``pool``'s ranks: the largest relative differences of the
    output, of the gradients and (``fit``) of the trained weights, and ``"ranks differ"``: the
    largest difference between two ranks' trained weights (0 when they agree bitwise)."""
    runs = pool.run(torch_on_rank, seq, causal, strategy, layout, fit)
    trained = [(r["sharded"].pop("trained", []), r["unsharded"].pop("trained", [])) for r in runs]
    found = worst([(r["sharded"], r["unsharded"]) for r in runs], "output")
    if fit:
        pairs = [(a, b) for s, u in trained for a, b in zip(s, u, strict=True)]
        found["trained"] = max(relative(a, b) for a, b in pairs)
        first = trained[0][0]
        found["ranks differ"] = max(
            (
                float(np.abs(a - b).max())
                for s, _ in trained[1:]
                for a, b in zip(s, first, strict=True)
            ),
            default=0.0,
        )
    return found


def jax_compare(
    n: int,
    seq: int = SEQ,
    causal: bool = True,
    strategy: Strategy = "ulysses",
    layout: Layout = "contiguous",
) -> dict[str, float]:
    """JAX (``KERAS_BACKEND=jax``, ``n`` devices): the sharded model through ``jax_forward`` vs
    the unsharded one through ``stateless_call``, output and weight gradients of
    ``sum(y * w)``: the largest relative differences."""
    backend()
    import jax
    import jax.numpy as jnp

    import sp_common.integrations.keras as sp_keras
    from sp_common.testing.mesh import mesh_of

    x, w = (jnp.asarray(a) for a in inputs(seq))
    model, reference = models(causal, strategy, layout)
    trainable = [v.value for v in reference.trainable_variables]
    fixed = [v.value for v in reference.non_trainable_variables]
    mesh = mesh_of(n)
    forward = sp_keras.jax_forward(model, mesh)

    def loss(call: Any, trainable: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
        y = call(trainable)
        return (y * w).sum(), y

    def unsharded(trainable: list[jax.Array]) -> jax.Array:
        return reference.stateless_call(trainable, fixed, x)[0]

    def sharded(trainable: list[jax.Array]) -> jax.Array:
        return forward(trainable, fixed, x)

    def results(call: Any) -> dict[str, np.ndarray]:
        grad = jax.jit(jax.value_and_grad(lambda t: loss(call, t), has_aux=True))
        (_, y), grads = grad(trainable)
        out = {"output": np.asarray(y)}
        out.update({f"grad/{i}": np.asarray(g) for i, g in enumerate(grads)})
        return out

    want = results(unsharded)
    with jax.set_mesh(mesh):
        got = results(sharded)
    return worst([(got, want)], "output")


def main() -> int:
    name = backend()
    world = WORLD.get(name, 0)
    worst_found: dict[str, float] = {}
    runs: list[dict[str, float]] = []
    if name == "torch":
        from sp_common.testing import RankPool

        with RankPool(world, call_timeout_s=CALL_TIMEOUT_S) as pool:
            runs = [torch_compare(pool, causal=causal) for causal in (False, True)]
    else:
        runs = [jax_compare(world, causal=causal) for causal in (False, True)]
    for found in runs:
        for kind, diff in found.items():
            worst_found[kind] = max(worst_found.get(kind, 0.0), diff)
    exact = worst_found.pop("ranks differ", 0.0)
    title = (
        f"tiny Keras transformer on {name}, B={BATCH} S={SEQ}, {world} "
        f"{'ranks' if name == 'torch' else 'devices'}, causal and not, sharded vs unsharded:"
    )
    status = verdict(title, worst_found, TOL)
    if exact != 0.0:
        print(f"FAILED: the ranks' trained weights differ by {exact:.3g}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    if backend() == "jax":
        # Before JAX starts: the virtual CPU devices.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip()
    sys.exit(main())
