"""Rank tasks for ``test_valid_inputs.py``: inputs that are valid but unusual in memory (strides
torch calls contiguous, lazy conjugate and negative views) or in value (pad values at the edges
of a dtype). They run on every rank of a TorchRanks pool; arguments and results are numpy arrays
and plain Python values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sp_common import sp_all_to_all, sp_gather, sp_reduce_scatter, sp_shard, sp_shard_with_padding
from sp_common.testing.data import to_numpy, to_torch


def _odd_strides(a: np.ndarray) -> torch.Tensor:
    """``a`` (shape ``[B, s, 1]``) as the torch tensor ``t.reshape(B, 1, s).transpose(1, 2)``:
    the same values, contiguous for torch, with strides ``(s, 1, s)``."""
    b, s, one = a.shape
    assert one == 1
    t = to_torch(a.reshape(b, 1, s)).transpose(1, 2)
    assert t.is_contiguous() and t.contiguous().stride() == (s, 1, s), t.stride()
    return t


def move_odd_strides(chunks: np.ndarray) -> dict[str, Any]:
    """Rank r holds ``chunks[r]`` (``[B, s, 1]``) with odd strides: its gather along dims 0, 1
    and 2, the all-to-all from dim 0 to dim 1 and the reduce-scatter along dim 0."""
    t = _odd_strides(chunks[dist.get_rank()])
    out: dict[str, Any] = {f"gather{d}": to_numpy(sp_gather(t, d)) for d in range(3)}
    out["all_to_all"] = to_numpy(sp_all_to_all(t, 0, 1))
    out["reduce_scatter"] = to_numpy(sp_reduce_scatter(t, 0))
    return out


def shard_backward_after_transpose(x: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Model code that transposes after the shard: ``x`` is ``[B, S, 1]``; the gradient that
    reaches sp_shard's backward (a gather) is ``[B, s, 1]`` with strides ``(s, 1, s)``. Returns
    the sharded gradient and the single-device one."""
    t = to_torch(x).requires_grad_()
    y = sp_gather(sp_shard(t, 1).transpose(1, 2) * 3, 2)  # [B, 1, s] -> [B, 1, S]
    (y * to_torch(w)).sum().backward()
    ref = to_torch(x).requires_grad_()
    (ref.transpose(1, 2) * 3 * to_torch(w)).sum().backward()
    return {"grad": to_numpy(t.grad), "single_device": to_numpy(ref.grad)}


def move_lazy_conjugates(chunks: np.ndarray, tiny: np.ndarray) -> dict[str, Any]:
    """Rank r holds ``torch.from_numpy(chunks[r]).conj()`` (a lazy conjugate, ``[B, s, H]``)
    and the lazy negative view ``torch.from_numpy(tiny[r]).conj().imag`` (``[1, 1, 1]``, which
    torch calls contiguous; a larger one never is, and copying it resolves it): gathers along
    dims 0 and 1, the all-to-all from dim 2 to dim 1 and the reduce-scatter along dim 2 of the
    first, the gather of the second."""
    r = dist.get_rank()
    c = to_torch(chunks[r]).conj()
    neg = to_torch(tiny[r]).conj().imag
    assert c.is_conj() and neg.is_neg() and neg.is_contiguous()
    return {
        "gather0": to_numpy(sp_gather(c, 0)),
        "gather1": to_numpy(sp_gather(c, 1)),
        "all_to_all": to_numpy(sp_all_to_all(c, 2, 1)),
        "reduce_scatter": to_numpy(sp_reduce_scatter(c, 2)),
        "neg_gather": to_numpy(sp_gather(neg, 1)),
        "inputs_unchanged": bool(c.is_conj() and neg.is_neg()),
    }


def shard_backward_through_conj(x: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """RoPE-style model code that conjugates after the shard: the gradient that reaches
    sp_shard's backward (a gather) is a lazy conjugate. Returns the sharded gradient and the
    single-device one."""
    t = to_torch(x).requires_grad_()
    y = sp_gather(sp_shard(t, 1).conj() * 2, 1)
    (y * to_torch(w)).real.sum().backward()
    ref = to_torch(x).requires_grad_()
    (ref.conj() * 2 * to_torch(w)).real.sum().backward()
    assert ref.grad is not None and ref.grad.is_conj()  # the gradient of .conj() is lazy
    return {"grad": to_numpy(t.grad), "single_device": to_numpy(ref.grad.resolve_conj())}


def pad_element_bytes(cases: list[tuple[str, Any]]) -> list[bytes]:
    """For each ``(dtype, pad_value)``: pad a 1-element tensor of that dtype on N ranks and
    return the raw bytes of this rank's shard (the last rank holds only the pad element)."""
    out = []
    for dtype, pad_value in cases:
        shard, _ = sp_shard_with_padding(torch.ones(1, dtype=getattr(torch, dtype)), 0, pad_value)
        out.append(shard.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def compiled_nan_padding(x: np.ndarray) -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` over a padded shard and gather with a signed NaN pad
    value (the pad-value check runs while Dynamo traces): one graph, and the same bits as
    eager."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def step(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard, _ = sp_shard_with_padding(t, 1, float("-nan"))
        return shard, sp_gather(shard, 1)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    t = to_torch(x)
    got = [to_numpy(o) for o in compiled(t)]
    return {"frames": counter.frame_count, "compiled": got, "eager": [to_numpy(o) for o in step(t)]}
