"""Rank tasks of tests/test_integration_keras.py: Keras on the torch backend, one process per
gloo rank (``KERAS_BACKEND=torch`` is set before keras is first imported in the rank)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _keras() -> Any:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"Keras was imported with backend {keras.backend.backend()!r}")
    return keras


def errors_task() -> dict[str, str]:
    """What raises on torch, each message by name: sync_gradients with no SPShard in the
    forward pass (from backward), jax_forward, and SPGather with no SPShard before it."""
    import torch

    from examples import keras_model

    _keras()
    import sp_common.integrations.keras as sp_keras

    found: dict[str, str] = {}
    x, _ = keras_model.inputs(8)
    reference = keras_model.tiny_model(False, causal=True)
    sp_keras.sync_gradients(reference)  # a model that never shards: nothing to average
    try:
        reference(torch.from_numpy(x)).sum().backward()
    except Exception as e:
        found["sync_without_shard"] = f"{type(e).__name__}: {e}"
    try:
        sp_keras.jax_forward(reference, None)
    except TypeError as e:
        found["jax_forward"] = str(e)
    try:
        sp_keras.SPGather()(torch.zeros(2, 4, 16))
    except Exception as e:  # Keras wraps the layer error
        found["gather_without_shard"] = f"{type(e).__name__}: {e}"
    return found


def by_hand_task(seq: int) -> dict[str, np.ndarray]:
    """A sequence sharded by hand (``sp_shard_with_padding``) through ``SPMultiHeadAttention``
    with its real length per call, gathered by hand, and Keras's own layer on the whole
    sequence, the same weights: both outputs ``[B, S, 16]``."""
    import torch

    import sp_common as sp
    from examples import keras_model

    keras = _keras()
    import sp_common.integrations.keras as sp_keras

    x = torch.from_numpy(keras_model.inputs(seq)[0])
    ours = sp_keras.SPMultiHeadAttention(2, 8)
    theirs = keras.layers.MultiHeadAttention(2, 8)
    shard, pad = sp.sp_shard_with_padding(x, 1)
    ours(shard, shard, seq_len=seq, use_causal_mask=True)  # builds it
    theirs(x, x)
    ours.set_weights(theirs.get_weights())
    got = sp.sp_gather(ours(shard, shard, seq_len=seq, use_causal_mask=True), 1, pad_size=pad)
    want = theirs(x, x, use_causal_mask=True)
    return {"got": got.detach().numpy(), "want": want.detach().numpy()}


def replicated_check_task() -> dict[str, str]:
    """SPShard's check that every rank got the same input: the same input with a NaN passes;
    the batch in another order on rank 1 raises."""
    import torch
    import torch.distributed as dist

    _keras()
    import sp_common.integrations.keras as sp_keras

    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    x[0, 1, 2] = float("nan")
    found = {"nan": f"shape {tuple(sp_keras.SPShard()(x).shape)}"}
    swapped = x.flip(0) if dist.get_rank() == 1 else x
    try:
        sp_keras.SPShard()(swapped)
        found["swapped"] = "ran"
    except ValueError as e:
        found["swapped"] = str(e)
    return found
