"""Attention cases (seeded, rebuilt from their fields on every rank) and the torch rank tasks
that run them. See ``test_attention.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sp_common.testing import make_data, to_numpy, to_torch

MASKS = ("none", "batch", "shared")  # no key mask, [B, S] per batch row, [S] for every row
# USP runs over two axes, ring first: R = 2 ring ranks by U = N / 2 Ulysses ranks.
USP_AXES = ("ring", "ulysses")


def usp_shape(n: int) -> tuple[int, int]:
    """The (R, U) mesh shape of the USP cases on ``n`` ranks or devices."""
    return (2, n // 2)


_USP_MESHES: dict[tuple[int, int], Any] = {}


def torch_group(case: AttnCase) -> Any:
    """The torch group a case runs over: the default one, or for USP this rank's 2-D
    DeviceMesh (made once per shape; every rank makes it in the same order)."""
    if case.strategy != "usp":
        return None
    from torch.distributed.device_mesh import init_device_mesh

    shape = usp_shape(case.n)
    if shape not in _USP_MESHES:
        _USP_MESHES[shape] = init_device_mesh("cpu", shape, mesh_dim_names=USP_AXES)
    return _USP_MESHES[shape]


@dataclass(frozen=True)
class AttnCase:
    """One sp_attention call: full (unsharded) sizes; ``mask``: which key mask it passes."""

    n: int
    seq: int
    hq: int
    hkv: int
    causal: bool
    mask: str
    dtype: str
    batch: int = 2
    d: int = 8
    dv: int = 8
    seed: int = 0
    strategy: str = "ulysses"
    layout: str = "contiguous"

    @property
    def label(self) -> str:
        return (
            f"n{self.n}-S{self.seq}-H{self.hq}/{self.hkv}-{'causal' if self.causal else 'full'}"
            f"-mask_{self.mask}-{self.dtype}-{self.strategy}-{self.layout}"
        )


def case_inputs(case: AttnCase) -> dict[str, Any]:
    """q, k, v in the case's dtype, the output gradient (float64), and the full key mask
    (``[B, S]``, ``[S]`` or None; every batch row keeps at least one key except row 1 of a
    "batch" mask, which has none, so that fully masked queries are covered)."""
    shapes = {
        "q": (case.batch, case.seq, case.hq, case.d),
        "k": (case.batch, case.seq, case.hkv, case.d),
        "v": (case.batch, case.seq, case.hkv, case.dv),
    }
    data = {
        name: make_data(shape, "float64", case.seed + i, specials=False).astype(case.dtype)
        for i, (name, shape) in enumerate(shapes.items())
    }
    out_shape = (case.batch, case.seq, case.hq, case.dv)
    data["grad_out"] = make_data(out_shape, "float64", case.seed + 3, specials=False)
    rng = np.random.default_rng(case.seed + 4)
    mask = None
    if case.mask == "batch":
        mask = rng.random((case.batch, case.seq)) < 0.6
        mask[0, 0] = True
        if case.batch > 1:
            mask[1] = False
    elif case.mask == "shared":
        mask = rng.random(case.seq) < 0.6
        mask[0] = True
    data["key_mask"] = mask
    return data


def sharded_attention(
    q: Any,
    k: Any,
    v: Any,
    mask: Any,
    *,
    strategy: str = "ulysses",
    causal: bool = False,
    seq_len: int | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    group: Any = None,
) -> Any:
    """Full (replicated) q, k, v and key mask -> this rank's shards (padded, in ``layout``) ->
    ``sp_attention`` -> the output gathered back: ``[B, S, Hq, Dv]``. Written once over
    sp_common, for torch ranks and JAX meshes alike."""
    import sp_common as sp

    (qs, pad), (ks, _), (vs, _) = (
        sp.sp_shard_with_padding(t, 1, layout=layout, group=group) for t in (q, k, v)
    )
    local = None
    if mask is not None:
        local, _ = sp.sp_shard_with_padding(
            mask, mask.ndim - 1, pad_value=False, layout=layout, group=group
        )
    out = sp.sp_attention(
        qs,
        ks,
        vs,
        strategy=strategy,
        causal=causal,
        seq_len=seq_len,
        key_mask=local,
        scale=scale,
        layout=layout,
        group=group,
    )
    return sp.sp_gather(out, 1, pad_size=pad, layout=layout, group=group)


def torch_attention(cases: list[AttnCase]) -> list[dict[str, Any]]:
    """Each case on this rank: q, k, v (and the key mask) sharded with padding, sp_attention,
    the output gathered; the loss ``sum(out * grad_out)``, the same on every rank, gives the
    whole gradients. Returns the output and gradients as float64."""
    import torch

    results = []
    for case in cases:
        data = case_inputs(case)
        q, k, v = (to_torch(data[n]).requires_grad_() for n in ("q", "k", "v"))
        mask = None if data["key_mask"] is None else torch.from_numpy(data["key_mask"])
        full = sharded_attention(
            q,
            k,
            v,
            mask,
            strategy=case.strategy,
            causal=case.causal,
            seq_len=case.seq,
            layout=case.layout,
            group=torch_group(case),
        )
        (full.double() * to_torch(data["grad_out"])).sum().backward()
        results.append(
            {
                "out": to_numpy(full.detach()).astype(np.float64),
                "grads": [to_numpy(t.grad).astype(np.float64) for t in (q, k, v)],
            }
        )
    return results


def joint_attention(text: list[Any], image: list[Any], masks: list[Any]) -> Any:
    """Flux-style joint attention written once over sp_common (torch or JAX): the text and
    the image stream (each ``[q, k, v]`` of ``[B, S_stream, H, D]``, replicated) are sharded
    and padded on their own, each rank concatenates its two chunks, and ``key_mask`` (the
    prompt mask and both paddings) keeps every padded key out. Returns ``[text, image]``
    outputs gathered, ``[B, S_text + S_image, H, D]``."""
    from array_api_compat import array_namespace

    xp = array_namespace(text[0])
    sharded_text = [sp_pad(t) for t in text]
    sharded_image = [sp_pad(t) for t in image]
    pad_text, pad_image = sharded_text[0][1], sharded_image[0][1]
    mask_text, _ = sp_pad(masks[0], pad_value=False)
    mask_image, _ = sp_pad(masks[1], pad_value=False)
    local_text = sharded_text[0][0].shape[1]
    q, k, v = (xp.concat([sharded_text[i][0], sharded_image[i][0]], axis=1) for i in range(3))
    import sp_common as sp

    out = sp.sp_attention(q, k, v, key_mask=xp.concat([mask_text, mask_image], axis=1))
    text_out = sp.sp_gather(out[:, :local_text], 1, pad_size=pad_text)
    image_out = sp.sp_gather(out[:, local_text:], 1, pad_size=pad_image)
    return xp.concat([text_out, image_out], axis=1)


def sp_pad(x: Any, pad_value: Any = 0.0) -> tuple[Any, int]:
    import sp_common as sp

    return sp.sp_shard_with_padding(x, 1, pad_value=pad_value)


def torch_joint(text: list[np.ndarray], image: list[np.ndarray], masks: list[np.ndarray]) -> Any:
    """:func:`joint_attention` on this torch rank."""
    import torch

    out = joint_attention(
        [to_torch(t) for t in text],
        [to_torch(t) for t in image],
        [torch.from_numpy(m) for m in masks],
    )
    return to_numpy(out)


def ulysses_is_attention() -> dict[str, bool]:
    """sp_ulysses_attention and sp_attention(strategy="ulysses") give the same bits."""
    import torch

    import sp_common as sp

    data = case_inputs(AttnCase(2, 7, 6, 2, True, "batch", "float32"))
    q, k, v = (sp.sp_shard_with_padding(to_torch(data[n]), 1)[0] for n in ("q", "k", "v"))
    mask, _ = sp.sp_shard_with_padding(torch.from_numpy(data["key_mask"]), 1, pad_value=False)
    options = {"causal": True, "seq_len": 7, "key_mask": mask, "scale": 0.3}
    a = sp.sp_ulysses_attention(q, k, v, **options)
    b = sp.sp_attention(q, k, v, strategy="ulysses", **options)
    return {"equal": bool(torch.equal(a, b))}


def attention_compiled(
    seq: int, strategy: str = "ulysses", compiler: str = "inductor"
) -> dict[str, Any]:
    """torch.compile(fullgraph=True) over causal, grouped-KV attention on ``seq`` tokens
    (padded where the world size does not divide it) with ``strategy`` (USP: over a 2-D
    DeviceMesh): one graph, forward and backward equal to eager."""
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    import sp_common as sp

    torch._dynamo.reset()
    import torch.distributed as dist

    case = AttnCase(dist.get_world_size(), seq, 4, 2, True, "none", "float32", strategy=strategy)
    group = torch_group(case)  # USP: a 2-D DeviceMesh

    def block(t: torch.Tensor) -> torch.Tensor:
        s, p = sp.sp_shard_with_padding(t, 1, group=group)
        kv = s[:, :, :2]
        out = sp.sp_attention(
            s, kv, kv * 2, strategy=strategy, causal=True, seq_len=t.shape[1], group=group
        )
        return sp.sp_gather(out, 1, pad_size=p, group=group)

    x = make_data((1, seq, 4, 8), "float32", 0, specials=False)
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    tc = to_torch(x).requires_grad_()
    compiled(tc).sum().backward()
    te = to_torch(x).requires_grad_()
    ye = block(te)
    ye.sum().backward()
    return {
        "frames": counter.frame_count,
        "max_out_diff": float((compiled(to_torch(x)).detach() - ye.detach()).abs().max()),
        "max_grad_diff": float((tc.grad - te.grad).abs().max() / te.grad.abs().max().clamp(min=1)),
    }
