"""torch rank tasks for ``test_ring_review.py``: adversarial ring and USP calls on gloo ranks
(seeded numpy inputs rebuilt on every rank, results returned as float64 numpy)."""

from __future__ import annotations

from typing import Any

from .attention_review_tasks import Case, case_data, run_case
from .attention_tasks import sharded_attention


def _leaves(case: Case) -> tuple[Any, ...]:
    import torch

    data = case_data(case)
    q, k, v, go = (torch.from_numpy(data[n]) for n in ("q", "k", "v", "grad_out"))
    mask = None if data["key_mask"] is None else torch.from_numpy(data["key_mask"])
    return q, k, v, go, mask


def _block(case: Case, q: Any, k: Any, v: Any, mask: Any, strategy: str | None = None) -> Any:
    if strategy == "plain":
        return plain_attention(q, k, v, case)
    return sharded_attention(
        q,
        k,
        v,
        mask,
        strategy=strategy or case.strategy,
        causal=case.causal,
        seq_len=case.seq,
        layout=case.layout,
        scale=case.scale,
    )


def plain_attention(q: Any, k: Any, v: Any, case: Case) -> Any:
    """Full attention on unsharded torch tensors, written out (softmax of the logits), so that
    torch differentiates it to any order: ``[B, S, Hq, D] -> [B, S, Hq, Dv]``."""
    import torch

    g = q.shape[2] // k.shape[2]
    kr, vr = (t.repeat_interleave(g, 2) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if case.scale is None else case.scale
    logits = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if case.causal:
        s = q.shape[1]
        logits = logits.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhqk,bkhe->bqhe", torch.softmax(logits, -1), vr)


def hvp_k_only(case: Case, strategy: str) -> dict[str, Any]:
    """A Hessian-vector product in k alone (q and v constants: a frozen query projection),
    two ways: ``torch.autograd.grad(create_graph=True)`` with an extra term ``sum(k**3)`` in
    the loss (so the first gradient requires grad whatever attention does), and
    ``torch.func.grad`` of ``torch.func.grad`` over k. Each entry is the HVP, or the error's
    message."""
    import torch

    q, k, v, go, mask = _leaves(case)
    vec = torch.sin(torch.arange(k.numel(), dtype=k.dtype)).reshape(k.shape)
    result: dict[str, Any] = {}
    try:
        kk = k.clone().requires_grad_()
        loss = (_block(case, q, kk, v, mask, strategy) * go).sum() + (kk**3).sum()
        (g,) = torch.autograd.grad(loss, kk, create_graph=True)
        (h,) = torch.autograd.grad((g * vec).sum(), kk)
        result["autograd"] = h.numpy()
    except Exception as e:
        result["autograd"] = f"{type(e).__name__}: {e}"
    try:

        def first(kk: Any) -> Any:
            g = torch.func.grad(lambda x: (_block(case, q, x, v, mask, strategy) * go).sum())(kk)
            return (g * vec).sum()

        result["func"] = torch.func.grad(first)(k).numpy()
    except Exception as e:
        result["func"] = f"{type(e).__name__}: {e}"
    return result


def repeated(cases: list[Case]) -> list[dict[str, Any]]:
    """Each case run twice (forward and backward): the two results, to compare bitwise."""
    return [{"first": run_case(c), "second": run_case(c)} for c in cases]


def two_calls(case: Case) -> dict[str, Any]:
    """Two ring calls in one forward (a second layer attends the first's output), one
    backward through both; and the same with strategy='allgather_kv'."""

    q, k, v, go, mask = _leaves(case)
    out = {}
    for strategy in (case.strategy, "allgather_kv"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        a = _block(case, *leaves, mask, strategy)
        b = _block(case, a, leaves[1], a[..., : leaves[2].shape[2], :], mask, strategy)
        (b * go).sum().backward()
        out[strategy] = [b.detach().numpy()] + [t.grad.numpy() for t in leaves]
    return out


def vmapped(case: Case) -> str:
    """torch.func.vmap of the sharded block over a leading axis: its error, or 'ran'."""
    import torch

    q, k, v, _, mask = _leaves(case)
    try:
        torch.func.vmap(lambda a, b, c: _block(case, a, b, c, mask))(
            q[None].expand(2, *q.shape), k[None].expand(2, *k.shape), v[None].expand(2, *v.shape)
        )
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ran"


def usp_meshes(shape: tuple[int, int], cases: list[Case]) -> list[dict[str, Any]]:
    """USP over init_device_mesh('cpu', shape): each case's output and q/k/v gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    results = []
    for case in cases:
        q, k, v, go, mask = _leaves(case)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sharded_attention(
            *leaves,
            mask,
            strategy="usp",
            causal=case.causal,
            seq_len=case.seq,
            layout=case.layout,
            scale=case.scale,
            group=mesh,
        )
        (out * go).sum().backward()
        results.append({"out": out.detach().numpy(), "grads": [t.grad.numpy() for t in leaves]})
    return results


def ring_on_mesh(shape: tuple[int, int], case: Case) -> dict[str, Any]:
    """strategy='ring' over a whole 2-D DeviceMesh (one group of R x U ranks)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("a", "b"))
    q, k, v, go, mask = _leaves(case)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sharded_attention(
        *leaves,
        mask,
        strategy="ring",
        causal=case.causal,
        seq_len=case.seq,
        layout=case.layout,
        group=mesh,
    )
    (out * go).sum().backward()
    return {"out": out.detach().numpy(), "grads": [t.grad.numpy() for t in leaves]}


def in_subgroups_ring(cases_by_dp: list[Case], sp_size: int) -> list[dict[str, Any]]:
    """A DP x SP layout (SP groups of ``sp_size`` consecutive ranks), replica i running
    ``cases_by_dp[i]`` inside ``sp_group(its group)``, in debug mode."""
    from .attention_review_tasks import in_subgroups

    return in_subgroups(cases_by_dp, sp_size, True)
