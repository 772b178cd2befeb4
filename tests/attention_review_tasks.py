"""Rank tasks for ``test_attention_review.py``: adversarial sp_attention calls on torch ranks
(seeded numpy inputs rebuilt on every rank, results returned as float64 numpy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .attention_tasks import sharded_attention


@dataclass(frozen=True)
class Case:
    """One call: full (unsharded) sizes. ``mask``: "none", "batch" ([B, S], row 1 all False
    when B > 1), "shared" ([S]), "nofirst" ([B, S] with key 0 masked: under causal, query 0 has
    no key at all). ``inputs``: "plain" (contiguous shards), "fused" (q, k, v are strided
    views of one fused projection, as ``qkv.unbind``), "expanded" (k, v broadcast views of
    one KV head). ``mask_layout``: "plain" or "strided" (a non-contiguous view)."""

    seq: int
    hq: int
    hkv: int
    causal: bool = False
    mask: str = "none"
    dtype: str = "float64"
    batch: int = 2
    d: int = 8
    dv: int = 8
    scale: float | None = None
    inputs: str = "plain"
    mask_layout: str = "plain"
    strategy: str = "ulysses"
    layout: str = "contiguous"
    seed: int = 0


def case_data(case: Case) -> dict[str, Any]:
    rng = np.random.default_rng(case.seed)
    b, s = case.batch, case.seq
    data = {
        "q": rng.standard_normal((b, s, case.hq, case.d)),
        "k": rng.standard_normal((b, s, case.hkv, case.d)),
        "v": rng.standard_normal((b, s, case.hkv, case.dv)),
        "grad_out": rng.standard_normal((b, s, case.hq, case.dv)),
    }
    if case.inputs == "expanded":  # every KV head the same: a broadcast view is the same data
        data["k"][:] = data["k"][:, :, :1]
        data["v"][:] = data["v"][:, :, :1]
    mask = None
    if case.mask in ("batch", "nofirst"):
        mask = rng.random((b, s)) < 0.6
        mask[:, 0] = True
        if case.mask == "nofirst":
            mask[:, 0] = False
            mask[:, 1:] = True
        elif b > 1:
            mask[1] = False
    elif case.mask == "shared":
        mask = rng.random(s) < 0.6
        mask[0] = True
    data["key_mask"] = mask
    # The inputs in the case's dtype, then read back in float64: the reference sees what
    # the kernel sees.
    for name in ("q", "k", "v"):
        data[name] = _round(data[name], case.dtype)
    return data


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return x.astype(dt).astype(np.float64)


def run_case(case: Case) -> dict[str, Any]:
    """The case on this rank: q, k, v (and the key mask) sharded with padding, sp_attention,
    the output gathered; the loss ``sum(out * grad_out)`` (the same on every rank) gives the
    whole gradients. For "fused"/"expanded" inputs the sharded chunks are re-laid out as
    strided views before the call."""
    import torch

    import sp_common as sp

    dtype = getattr(torch, case.dtype)
    data = case_data(case)
    leaves = [torch.from_numpy(data[n]).to(dtype).requires_grad_() for n in ("q", "k", "v")]
    lay = {"layout": case.layout}
    (qs, pad), (ks, _), (vs, _) = (sp.sp_shard_with_padding(t, 1, **lay) for t in leaves)
    if case.inputs == "fused":
        # A fused projection of this rank's chunk: q, k, v strided views of one tensor.
        fused = torch.stack([qs, ks, vs], dim=3)  # [B, s, H, 3, D]
        qs, ks, vs = fused.unbind(3)
    elif case.inputs == "expanded":
        ks = ks[:, :, :1].expand(-1, -1, case.hkv, -1)
        vs = vs[:, :, :1].expand(-1, -1, case.hkv, -1)
    local_mask = None
    mask = data["key_mask"]
    if mask is not None:
        tm = torch.from_numpy(mask)
        local_mask, _ = sp.sp_shard_with_padding(tm, tm.ndim - 1, pad_value=False, **lay)
        if case.mask_layout == "strided":
            local_mask = _strided(local_mask)
    out = sp.sp_attention(
        qs,
        ks,
        vs,
        strategy=case.strategy,
        causal=case.causal,
        seq_len=case.seq,
        key_mask=local_mask,
        scale=case.scale,
        **lay,
    )
    full = sp.sp_gather(out, 1, pad_size=pad, **lay)
    (full.double() * torch.from_numpy(data["grad_out"])).sum().backward()
    grads = [t.grad.double().numpy() for t in leaves]
    return {"out": full.detach().double().numpy(), "grads": grads}


def _strided(t: Any) -> Any:
    """The same values as ``t``, as a non-contiguous view (a transposed layout for 2-d,
    every other element of a doubled buffer for 1-d)."""
    import torch

    strided = t.t().contiguous().t() if t.ndim == 2 else torch.stack([t, t], 1)[:, 0]
    assert not strided.is_contiguous() and torch.equal(strided, t)
    return strided


def run_cases(cases: list[Case]) -> list[dict[str, Any]]:
    return [run_case(c) for c in cases]


def reference(case: Case) -> tuple[np.ndarray, list[np.ndarray]]:
    from sp_common.testing import reference_attention, reference_attention_grads

    data = case_data(case)
    q, k, v, mask = data["q"], data["k"], data["v"], data["key_mask"]
    opts = {"causal": case.causal, "key_mask": mask, "scale": case.scale}
    out = reference_attention(q, k, v, **opts)
    grads = list(reference_attention_grads(q, k, v, data["grad_out"], **opts))
    if case.inputs == "expanded":  # the leaves' head 0 is every KV head: its gradient is the sum
        for i in (1, 2):
            summed = np.zeros_like(grads[i])
            summed[:, :, 0] = grads[i].sum(axis=2)
            grads[i] = summed
    return out, grads


def func_transforms(case: Case, ensemble: int) -> dict[str, Any]:
    """``torch.func.grad`` of ``sum(out * grad_out)`` with respect to q, k, v, and
    ``torch.vmap`` of the whole sharded block over a leading ensemble axis (each member its own
    q, k, v and key mask: member e is the case with seed ``case.seed + e``)."""
    import dataclasses

    import torch

    def block(q: Any, k: Any, v: Any, mask: Any) -> Any:
        return sharded_attention(
            q,
            k,
            v,
            mask,
            strategy=case.strategy,
            causal=case.causal,
            seq_len=case.seq,
            scale=case.scale,
        )

    data = case_data(case)
    q, k, v, go = (torch.from_numpy(data[n]) for n in ("q", "k", "v", "grad_out"))
    mask = None if data["key_mask"] is None else torch.from_numpy(data["key_mask"])
    grads = torch.func.grad(lambda a, b, c: (block(a, b, c, mask) * go).sum(), argnums=(0, 1, 2))(
        q, k, v
    )
    members = [case_data(dataclasses.replace(case, seed=case.seed + e)) for e in range(ensemble)]
    stacked = {n: torch.from_numpy(np.stack([m[n] for m in members])) for n in ("q", "k", "v")}
    if case.mask == "none":
        vmapped = torch.vmap(lambda a, b, c: block(a, b, c, None))(
            stacked["q"], stacked["k"], stacked["v"]
        )
    else:
        masks = torch.from_numpy(np.stack([m["key_mask"] for m in members]))
        vmapped = torch.vmap(block)(stacked["q"], stacked["k"], stacked["v"], masks)
    return {"grads": [g.numpy() for g in grads], "vmapped": vmapped.numpy()}


WIDTH, HQ, HKV, HEAD = 12, 6, 3, 2  # 6 query heads, 3 KV heads of size 2: padded on 4 ranks


def attention_model(seed: int, strategy: str = "ulysses") -> Any:
    """A small torch model with parameters before the plan's shard point (``pre``), between
    shard and gather (``block``: q/k/v projections, causal grouped-KV attention with a key mask,
    output projection) and after the gather (``post``). ``forward(x [B, S, WIDTH], mask [B, S]
    bool) -> [B, S, WIDTH]``."""
    import torch
    from torch import nn

    import sp_common as sp

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(WIDTH, HQ * HEAD, dtype=torch.float64)
            self.kv = nn.Linear(WIDTH, 2 * HKV * HEAD, dtype=torch.float64)
            self.out = nn.Linear(HQ * HEAD, WIDTH, dtype=torch.float64)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q = self.q(x).reshape(b, s, HQ, HEAD)
            k, v = self.kv(x).reshape(b, s, 2, HKV, HEAD).unbind(2)
            seq_len = sp.planned_seq_len(default=None)
            a = sp.sp_attention(
                q, k, v, strategy=strategy, causal=True, key_mask=mask, seq_len=seq_len
            )
            return x + self.out(a.reshape(b, s, HQ * HEAD))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
            self.block = Block()
            self.post = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.post(torch.tanh(self.block(torch.tanh(self.pre(x)), mask)))

    return Model()


def attention_plan() -> Any:
    """Shard the block's ``x`` (padded) and its key mask (padded with False, never gathered),
    gather the block's output."""
    from sp_common.plan import GatherOutput, ShardInput, SPPlan

    mask = ShardInput("mask", dim=1, pad=True, pad_value=False, name="mask", gather=False)
    return SPPlan({"block": (ShardInput("x", dim=1, pad=True), mask, GatherOutput(dim=1))})


def model_run(
    model: Any, x: np.ndarray, mask: np.ndarray, w: np.ndarray, all_reduce: bool = False
) -> dict[str, Any]:
    """Output, input gradient and parameter gradients of ``sum(model(x, mask) * w)`` (after
    ``all_reduce_grads`` when ``all_reduce``)."""
    import torch

    import sp_common as sp

    xt = torch.from_numpy(x).requires_grad_()
    model.zero_grad()
    out = model(xt, torch.from_numpy(mask))
    (out * torch.from_numpy(w)).sum().backward()
    if all_reduce:
        sp.all_reduce_grads(model)
    return {
        "out": out.detach().numpy(),
        "grad x": xt.grad.numpy(),
        **{n: p.grad.numpy().copy() for n, p in model.named_parameters()},
    }


def planned_attention_model(
    x: np.ndarray, mask: np.ndarray, w: np.ndarray, strategy: str
) -> dict[str, Any]:
    """The model with the plan applied on this rank: output, input gradient and the
    parameter gradients after ``all_reduce_grads``."""
    import sp_common as sp

    model = attention_model(0, strategy)
    applied = sp.apply_plan(model, attention_plan())
    try:
        return model_run(model, x, mask, w, all_reduce=True)
    finally:
        applied.remove()


def compiled_dynamic(cases: list[Case], mode: str, backend: str) -> list[dict[str, Any]]:
    """One ``torch.compile(fullgraph=True)`` function (``mode``: "dynamic" for
    ``dynamic=True``, "mark_dynamic" for the sequence dims marked) over a causal, grouped,
    key-masked, padded block, called on every case in turn (lengths differ): output and q, k,
    v gradients of each call, for comparison with the reference."""
    import torch
    import torch._dynamo

    import sp_common as sp

    torch._dynamo.reset()

    def block(q: Any, k: Any, v: Any, mask: Any, case: Case) -> Any:
        lay = {"layout": case.layout}
        (qs, pad), (ks, _), (vs, _) = (sp.sp_shard_with_padding(t, 1, **lay) for t in (q, k, v))
        local, _ = sp.sp_shard_with_padding(mask, mask.ndim - 1, pad_value=False, **lay)
        out = sp.sp_attention(
            qs,
            ks,
            vs,
            strategy=case.strategy,
            causal=case.causal,
            seq_len=case.seq,
            key_mask=local,
            **lay,
        )
        return sp.sp_gather(out, 1, pad_size=pad, **lay)

    compiled = torch.compile(
        block, backend=backend, fullgraph=True, dynamic=True if mode == "dynamic" else None
    )
    results = []
    for case in cases:
        data = case_data(case)
        leaves = [torch.from_numpy(data[n]).clone().requires_grad_() for n in ("q", "k", "v")]
        mask = torch.from_numpy(data["key_mask"]).clone()
        if mode == "mark_dynamic":
            for t in leaves:
                torch._dynamo.mark_dynamic(t, 1)
            torch._dynamo.mark_dynamic(mask, mask.ndim - 1)
        out = compiled(*leaves, mask, case)
        (out * torch.from_numpy(data["grad_out"])).sum().backward()
        results.append({"out": out.detach().numpy(), "grads": [t.grad.numpy() for t in leaves]})
    return results


def in_subgroups(cases_by_dp: list[Case], sp_size: int, debug: bool) -> list[dict[str, Any]]:
    """A DP x SP layout: the world split into SP groups of ``sp_size`` consecutive ranks
    (every rank creates every group), DP replica i running ``cases_by_dp[i]`` inside
    ``sp_group(its group)`` (in debug mode when ``debug``)."""
    import contextlib

    import torch
    import torch.distributed as dist

    import sp_common as sp

    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(i, i + sp_size))) for i in range(0, world, sp_size)]
    replica = rank // sp_size
    with sp.sp_group(groups[replica]), sp.sp_debug() if debug else contextlib.nullcontext():
        assert sp.sp_world_size(torch.zeros(1)) == sp_size
        return run_cases([cases_by_dp[replica]])


def per_rank_loss(case: Case) -> dict[str, Any]:
    """No shard, no gather: this rank slices its own chunk of q, k, v (leaves), the key mask
    and the output gradient, and backpropagates its own loss term ``sum(out * grad_out)`` over
    its chunk. Each rank's chunk gradients are then those of the whole loss (the sum of every
    rank's term). Returns this rank's output chunk and chunk gradients."""
    import torch
    import torch.distributed as dist

    import sp_common as sp

    n, rank = dist.get_world_size(), dist.get_rank()
    data = case_data(case)
    s = -(-case.seq // n)
    pad = s * n - case.seq

    def chunk(a: np.ndarray, fill: Any = 0.0) -> np.ndarray:
        widths = [(0, 0)] * a.ndim
        widths[1 if a.ndim > 1 else 0] = (0, pad)
        padded = np.pad(a, widths, constant_values=fill)
        return padded[:, rank * s : (rank + 1) * s] if a.ndim > 1 else padded[rank * s :][:s]

    leaves = [torch.from_numpy(chunk(data[n_])).requires_grad_() for n_ in ("q", "k", "v")]
    mask = data["key_mask"]
    local_mask = None if mask is None else torch.from_numpy(chunk(mask, False))
    out = sp.sp_attention(
        *leaves,
        strategy=case.strategy,
        causal=case.causal,
        seq_len=case.seq,
        key_mask=local_mask,
        scale=case.scale,
    )
    (out * torch.from_numpy(chunk(data["grad_out"]))).sum().backward()
    return {
        "start": rank * s,
        "out": out.detach().numpy(),
        "grads": [t.grad.numpy() for t in leaves],
    }


def run_arrays(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, grad_out: np.ndarray, strategy: str, dtype: str
) -> list[np.ndarray]:
    """Given full float64 arrays (a length N divides): each sharded, cast to ``dtype``,
    sp_attention, gathered; the q, k, v gradients of ``sum(out * grad_out)`` (grad_out cast to
    ``dtype`` too), as float64."""
    import torch

    import sp_common as sp

    dt = getattr(torch, dtype)
    leaves = [torch.from_numpy(a).to(dt).requires_grad_() for a in (q, k, v)]
    out = sp.sp_attention(*(sp.sp_shard(t, 1) for t in leaves), strategy=strategy)
    sp.sp_gather(out, 1).backward(torch.from_numpy(grad_out).to(dt))
    return [t.grad.double().numpy() for t in leaves]


def empty_calls(strategy: str) -> dict[str, str]:
    """sp_attention on zero-size inputs on every rank: an empty batch ``[0, s, H, D]`` and an
    empty local sequence ``[B, 0, H, D]``. Returns the output shape, or the error."""
    import torch

    import sp_common as sp

    results = {}
    for name, shape in (("batch", (0, 3, 4, 2)), ("sequence", (2, 0, 4, 2))):
        q = torch.zeros(shape, requires_grad=True)
        try:
            out = sp.sp_attention(q, q, q, strategy=strategy, causal=True)
            out.sum().backward()
            results[name] = f"shape {tuple(out.shape)}"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    return results
