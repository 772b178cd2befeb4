"""Rank tasks of tests/test_keras_review.py: adversarial uses of the Keras 3 integration on the
torch backend, one process per gloo rank (``KERAS_BACKEND=torch`` is set before keras is first
imported in the rank). Each task returns plain numbers or messages that the test compares with
the same weights run unsharded through Keras's own ``MultiHeadAttention``."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

F, HEADS = 16, 2


def _keras() -> Any:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"Keras was imported with backend {keras.backend.backend()!r}")
    return keras


def _fresh() -> Any:
    """The integration module, with no record left from an earlier task on this rank."""
    _keras()
    import sp_common.integrations.keras as sp_keras

    sp_keras._STATE.sharded.clear()
    return sp_keras


def _diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0.0) / max(1.0, float(np.abs(b).max(initial=0.0))))


def _data(seq: int, seed: int = 1, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, F)).astype(np.float32)
    return x, rng.standard_normal((batch, seq, 4)).astype(np.float32)


def _block(sharded: bool, shared: bool = False, norm: str | None = None) -> Any:
    """``x [B, S, 16] -> [B, S, 4]``: Dense, (SPShard), causal attention + residual, an optional
    normalization, (SPGather), Dense 4. ``shared``: the first Dense is applied again after the
    gather (one weight on both sides of the shard)."""
    keras = _keras()
    import sp_common.integrations.keras as sp_keras

    keras.utils.set_random_seed(0)
    x = keras.Input((None, F))
    first = keras.layers.Dense(F)
    h = first(x)
    if sharded:
        h = sp_keras.SPShard()(h)
    mha = sp_keras.SPMultiHeadAttention if sharded else keras.layers.MultiHeadAttention
    h = h + mha(HEADS, F // HEADS)(h, h, use_causal_mask=True)
    if norm == "batch":
        h = keras.layers.BatchNormalization()(h)
    if sharded:
        h = sp_keras.SPGather()(h)
    if shared:
        h = first(h)
    return keras.Model(x, keras.layers.Dense(4)(h))


def _pair(**kwargs: Any) -> tuple[Any, Any]:
    reference = _block(False, **kwargs)
    model = _block(True, **kwargs)
    model.set_weights(reference.get_weights())
    return model, reference


def _grads(model: Any, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    import torch

    y = model(torch.from_numpy(x))
    (y * torch.from_numpy(w)).sum().backward()
    grads = []
    for v in model.trainable_variables:
        grads.append(v.value.grad.detach().numpy().copy())
        v.value.grad = None
    return y.detach().float().numpy(), grads


def shared_weight_task(seq: int) -> dict[str, float]:
    """One Dense used before SPShard and again after SPGather (its gradient has a replicated
    and a sharded term): output and gradients against the unsharded model."""
    sp_keras = _fresh()
    model, reference = _pair(shared=True)
    sp_keras.sync_gradients(model)
    x, w = _data(seq)
    y, g = _grads(model, x, w)
    y0, g0 = _grads(reference, x, w)
    return {
        "output": _diff(y, y0),
        "gradients": max(_diff(a, b) for a, b in zip(g, g0, strict=True)),
    }


def sync_twice_task(seq: int) -> dict[str, float]:
    """sync_gradients called twice on one model: the gradients are still the unsharded ones."""
    sp_keras = _fresh()
    model, reference = _pair()
    sp_keras.sync_gradients(model)
    sp_keras.sync_gradients(model)
    x, w = _data(seq)
    _, g = _grads(model, x, w)
    _, g0 = _grads(reference, x, w)
    return {"gradients": max(_diff(a, b) for a, b in zip(g, g0, strict=True))}


def no_grad_inference_task(seq: int) -> dict[str, float]:
    """torch.no_grad, model.predict and model.evaluate equal the unsharded model's."""
    import torch

    _fresh()
    model, reference = _pair()
    x, w = _data(seq)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
        want = reference(torch.from_numpy(x)).numpy()
    found = {"no_grad": _diff(got, want)}
    found["predict"] = _diff(
        model.predict(x, batch_size=1, verbose=0), reference.predict(x, batch_size=1, verbose=0)
    )
    for m in (model, reference):
        m.compile(optimizer="sgd", loss="mse")
    found["evaluate"] = _diff(
        model.evaluate(x, w, batch_size=1, verbose=0),
        reference.evaluate(x, w, batch_size=1, verbose=0),
    )
    return found


def fit_task(seq: int, optimizer: str, accumulate: int, validate: bool, shuffle: bool) -> Any:
    """model.fit of the sharded and the unsharded copy (Adam or SGD, optionally with
    gradient_accumulation_steps, validation_data, and shuffle=True after the same seed on every
    rank): the largest difference of the trained weights and the losses, and this rank's
    trained weights (the test checks the ranks agree bitwise)."""
    keras = _keras()
    sp_keras = _fresh()
    model, reference = _pair()
    sp_keras.sync_gradients(model)
    x, w = _data(seq, batch=4)
    histories, trained = [], []
    for m in (model, reference):
        kwargs: dict[str, Any] = {"gradient_accumulation_steps": accumulate} if accumulate else {}
        opt = (
            keras.optimizers.Adam(1e-2, **kwargs)
            if optimizer == "adam"
            else keras.optimizers.SGD(0.05, **kwargs)
        )
        m.compile(optimizer=opt, loss="mse")
        keras.utils.set_random_seed(5)  # the same shuffles for both copies, on every rank
        h = m.fit(
            x,
            w,
            batch_size=1,
            epochs=2,
            shuffle=shuffle,
            verbose=0,
            validation_data=(x[:2], w[:2]) if validate else None,
        )
        histories.append(h.history)
        trained.append([np.asarray(v) for v in m.get_weights()])
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a constant added to
    # every key's score), so Adam turns both copies' rounding noise into lr-sized steps: the
    # weights compared are all the others.
    names = [v.path for v in model.weights]
    pairs = [(a, b) for n, a, b in zip(names, *trained, strict=True) if not n.endswith("key/bias")]
    found = {"trained": max(_diff(a, b) for a, b in pairs)}
    for key in histories[1]:
        found[f"history/{key}"] = _diff(histories[0][key], histories[1][key])
    return found, trained[0]


def unseeded_shuffle_task(seq: int) -> str:
    """model.fit with shuffle=True where the ranks' seeds differ (Keras's torch data loader
    shuffles with torch's generator, so each rank sees other batches): the integration must not
    train silently on a mix of different batches."""
    import torch
    import torch.distributed as dist

    keras = _keras()
    sp_keras = _fresh()
    model, reference = _pair()
    sp_keras.sync_gradients(model)
    x, w = _data(seq, batch=4)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    np.random.seed(100 + dist.get_rank())
    torch.manual_seed(100 + dist.get_rank())
    try:
        model.fit(x, w, batch_size=1, epochs=1, shuffle=True, verbose=0)
    except Exception as e:
        return f"raised {type(e).__name__}: {e}"
    reference.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    np.random.seed(100)
    reference.fit(x, w, batch_size=1, epochs=1, shuffle=True, verbose=0)
    d = max(_diff(a, b) for a, b in zip(model.get_weights(), reference.get_weights(), strict=True))
    return f"trained silently, {d:.3g} from rank 0's unsharded training"


def save_load_task(seq: int) -> dict[str, float]:
    """model.save / keras.models.load_model of the sharded model: the loaded copy's output and
    (after sync_gradients on it) gradients equal the unsharded model's."""
    import torch.distributed as dist

    keras = _keras()
    sp_keras = _fresh()
    model, reference = _pair()
    x, w = _data(seq)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"model{dist.get_rank()}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    kinds = sorted(type(layer).__name__ for layer in loaded.layers if "SP" in type(layer).__name__)
    sp_keras.sync_gradients(loaded)
    y, g = _grads(loaded, x, w)
    y0, g0 = _grads(reference, x, w)
    found = {
        "output": _diff(y, y0),
        "gradients": max(_diff(a, b) for a, b in zip(g, g0, strict=True)),
    }
    found["sp_layers"] = float(kinds == ["SPGather", "SPMultiHeadAttention", "SPShard"])
    return found


def stale_record_task() -> dict[str, float]:
    """A forward pass that raised between SPShard and SPGather (S=7: padded, 4 tokens per rank),
    then SPMultiHeadAttention on a sequence of 8 sharded by hand (4 tokens per rank, nothing
    padded) without seq_len: it must not read the 7 of the aborted pass."""
    import torch

    import sp_common as sp

    keras = _keras()
    sp_keras = _fresh()
    x7 = torch.from_numpy(_data(7)[0])
    try:
        h = sp_keras.SPShard()(x7)
        raise RuntimeError("the rest of the forward pass failed")
    except RuntimeError:
        pass
    x8 = torch.from_numpy(_data(8)[0])
    theirs = keras.layers.MultiHeadAttention(HEADS, F // HEADS)
    ours = sp_keras.SPMultiHeadAttention(HEADS, F // HEADS)
    want = theirs(x8, x8)
    ours.build(x8.shape, x8.shape)
    ours.set_weights(theirs.get_weights())
    h = sp.sp_shard(x8, 1)
    got = sp.sp_gather(ours(h, h), 1)
    return {"output": _diff(got.detach().numpy(), want.detach().numpy())}


def two_backwards_task(seq: int) -> str:
    """One forward pass, two losses, each with its own backward (retain_graph): the gradients
    accumulate linearly, so they are exact; the integration must either give them or raise."""
    import torch

    sp_keras = _fresh()
    model, reference = _pair()
    sp_keras.sync_gradients(model)
    x, w = _data(seq)
    grads = []
    for m in (model, reference):
        y = m(torch.from_numpy(x))
        try:
            (y * torch.from_numpy(w)).sum().backward(retain_graph=True)
            (y**2).sum().backward()
        except Exception as e:
            for v in m.trainable_variables:
                v.value.grad = None
            return f"raised {type(e).__name__}: {str(e)[:200]}"
        grads.append([v.value.grad.detach().numpy().copy() for v in m.trainable_variables])
        for v in m.trainable_variables:
            v.value.grad = None
    return f"gradients {max(_diff(a, b) for a, b in zip(*grads, strict=True)):.3g} from unsharded"


def batch_norm_task(seq: int) -> str:
    """BatchNormalization between SPShard and SPGather in training (its batch statistics are
    over this rank's tokens, padding included): exact, or a raise, never a silent mismatch."""
    import torch

    sp_keras = _fresh()
    model, reference = _pair(norm="batch")
    sp_keras.sync_gradients(model)
    x, _ = _data(seq)
    try:
        got = model(torch.from_numpy(x), training=True).detach().numpy()
    except Exception as e:
        return f"raised {type(e).__name__}: {str(e)[:200]}"
    want = reference(torch.from_numpy(x), training=True).detach().numpy()
    return f"ran, output {_diff(got, want):.3g} from unsharded"


def mixed_precision_task(policy: str, seq: int) -> dict[str, float]:
    """Under a mixed-precision dtype policy: the sharded output's difference from the float32
    unsharded model, next to Keras's own unsharded model's at the same policy."""
    keras = _keras()
    sp_keras = _fresh()
    reference32 = _pair()[1]
    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model, reference = _pair()
        x, w = _data(seq)
        sp_keras.sync_gradients(model)
        y, g = _grads(model, x, w)
        y0, g0 = _grads(reference, x, w)
    finally:
        keras.mixed_precision.set_dtype_policy(before)
    y32, g32 = _grads(reference32, x, w)
    return {
        "sharded output": _diff(y, y32),
        "keras output": _diff(y0, y32),
        "sharded gradients": max(_diff(a, b) for a, b in zip(g, g32, strict=True)),
        "keras gradients": max(_diff(a, b) for a, b in zip(g0, g32, strict=True)),
        "dtype match": float(y.dtype == y0.dtype),
    }
