"""Rank tasks for the gradient conformance table: first and second order gradients of one
program on every rank of a TorchRanks pool, through autograd and through torch.func."""

from __future__ import annotations

import numpy as np
import torch

from sp_common.testing.data import to_numpy, to_torch

from .conformance_programs import ROWS


def gradients(name: str, x: np.ndarray, w: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """``grad``: d loss / dx; ``hvp``: d(sum(grad * v)) / dx (the Hessian times ``v``), built
    with ``create_graph=True``; ``func_grad``: ``torch.func.grad`` of the same program. For a
    per-rank program each rank differentiates its own term (the collectives in the backward pass
    combine the terms)."""
    program = ROWS[name].program
    t = to_torch(x).requires_grad_()
    (g,) = torch.autograd.grad(program(t, to_torch(w)), t, create_graph=True)
    func_grad = torch.func.grad(lambda a: program(a, to_torch(w)))(to_torch(x))
    out = {"grad": to_numpy(g), "func_grad": to_numpy(func_grad)}
    try:
        (hv,) = torch.autograd.grad((g * to_torch(v)).sum(), t)
    except RuntimeError as e:  # a row without a second derivative must say so
        return {**out, "hvp_error": str(e)}
    return {**out, "hvp": to_numpy(hv)}


def vmapped_ops(x: np.ndarray) -> dict[str, np.ndarray]:
    """``torch.vmap`` over shard, gather, all-to-all and reduce-scatter (dim 0 is vmapped)."""
    from sp_common import sp_all_to_all, sp_gather, sp_reduce_scatter, sp_shard

    t = to_torch(x)  # [V, B, S, H]
    return {
        "shard": to_numpy(torch.vmap(lambda a: sp_shard(a, 1))(t)),
        "gather": to_numpy(torch.vmap(lambda a: sp_gather(sp_shard(a, 1), 1))(t)),
        "all_to_all": to_numpy(torch.vmap(lambda a: sp_all_to_all(sp_shard(a, 1), 2, 1))(t)),
        "reduce_scatter": to_numpy(torch.vmap(lambda a: sp_reduce_scatter(a, 1))(t)),
        "vmap_of_grad": to_numpy(
            torch.vmap(torch.func.grad(lambda a: (sp_gather(sp_shard(a, 1), 1) ** 2).sum()))(t)
        ),
    }
