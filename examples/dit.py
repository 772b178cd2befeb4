"""A small diffusion-transformer-like model, defined in torch and in JAX with identical weights.

patch embedding -> ``depth`` attention blocks (pre-LN, Ulysses attention, tanh-GELU MLP) ->
final LayerNorm -> output projection. Shapes: ``x [B, S, patch] -> [B, S, patch]``.

The model code knows nothing about sharding except that its attention is
``sp_ulysses_attention``, which is plain attention at world size 1. Sequence parallelism comes
only from applying a plan (see ``TORCH_PLAN`` / ``JAX_PLAN``); with padding, the attention asks
the plan for the real length explicitly (``planned_seq_len``), so padded keys never take part.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace

from examples.model import gelu, layer_norm
from sp_common import planned_seq_len, sp_ulysses_attention
from sp_common.plan import GatherOutput, ShardInput, SPPlan

PATCH, WIDTH, HEADS, DEPTH, MLP = 12, 16, 4, 2, 32

# torch: shard the patch embedding's input, gather the output projection's output.
TORCH_PLAN = SPPlan(
    {
        "patch_embed": ShardInput("input", dim=1, ndim=3, pad=True),
        "proj_out": GatherOutput(dim=1, ndim=3),
    }
)
# JAX (and torch on the whole model): shard the model's input, gather its output.
JAX_PLAN = SPPlan({"": (ShardInput("x", dim=1, ndim=3, pad=True), GatherOutput(dim=1, ndim=3))})


def init_params(seed: int = 0) -> dict[str, Any]:
    """Seeded float32 weights as numpy arrays, ``[in, out]`` matrices."""
    rng = np.random.default_rng(seed)

    def dense(n_in: int, n_out: int) -> dict[str, np.ndarray]:
        w = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
        return {"w": w, "b": (0.1 * rng.standard_normal(n_out)).astype(np.float32)}

    def norm() -> dict[str, np.ndarray]:
        return {
            "g": (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
            "b": (0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
        }

    blocks = [
        {
            "ln1": norm(),
            "qkv": dense(WIDTH, 3 * WIDTH),
            "proj": dense(WIDTH, WIDTH),
            "ln2": norm(),
            "fc1": dense(WIDTH, MLP),
            "fc2": dense(MLP, WIDTH),
        }
        for _ in range(DEPTH)
    ]
    return {
        "patch_embed": dense(PATCH, WIDTH),
        "blocks": blocks,
        "norm_out": norm(),
        "proj_out": dense(WIDTH, PATCH),
    }


# ----------------------------------------------------------------------------------- torch
def torch_model(params: dict[str, Any]) -> Any:
    """The model as an ``nn.Module`` holding ``params`` (copied)."""
    import torch
    from torch import nn

    def linear(p: dict[str, np.ndarray]) -> nn.Linear:
        layer = nn.Linear(*p["w"].shape)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(p["w"].T.copy()))
            layer.bias.copy_(torch.from_numpy(p["b"]))
        return layer

    def layer_norm(p: dict[str, np.ndarray]) -> nn.LayerNorm:
        layer = nn.LayerNorm(WIDTH, eps=1e-5)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(p["g"]))
            layer.bias.copy_(torch.from_numpy(p["b"]))
        return layer

    class Block(nn.Module):
        def __init__(self, p: dict[str, Any]) -> None:
            super().__init__()
            self.ln1, self.qkv, self.proj = (
                layer_norm(p["ln1"]),
                linear(p["qkv"]),
                linear(p["proj"]),
            )
            self.ln2, self.fc1, self.fc2 = layer_norm(p["ln2"]), linear(p["fc1"]), linear(p["fc2"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(b, s, 3, HEADS, WIDTH // HEADS).unbind(2)
            attn = sp_ulysses_attention(q, k, v, seq_len=planned_seq_len(default=None))
            x = x + self.proj(attn.reshape(b, s, WIDTH))
            h = nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh")
            return x + self.fc2(h)

    class DiT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = linear(params["patch_embed"])
            self.blocks = nn.ModuleList(Block(p) for p in params["blocks"])
            self.norm_out = layer_norm(params["norm_out"])
            self.proj_out = linear(params["proj_out"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.patch_embed(x)
            for block in self.blocks:
                h = block(h)
            return self.proj_out(self.norm_out(h))

    return DiT()


# ------------------------------------------------------------------------------------- JAX
def jax_forward(params: dict[str, Any], x: Any) -> Any:
    """The same model as a pure function of its parameters (JAX arrays), over the array API
    with the LayerNorm and GELU of ``examples.model``."""

    def linear(p: dict[str, Any], h: Any) -> Any:
        return h @ p["w"] + p["b"]

    def norm(p: dict[str, Any], h: Any) -> Any:
        return layer_norm(h, p["g"], p["b"])

    xp = array_namespace(x)
    h = linear(params["patch_embed"], x)
    for p in params["blocks"]:
        b, s, _ = h.shape
        qkv = xp.reshape(linear(p["qkv"], norm(p["ln1"], h)), (b, s, 3, HEADS, WIDTH // HEADS))
        seq_len = planned_seq_len(default=None)
        attn = sp_ulysses_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], seq_len=seq_len)
        h = h + linear(p["proj"], xp.reshape(attn, (b, s, WIDTH)))
        h = h + linear(p["fc2"], gelu(linear(p["fc1"], norm(p["ln2"], h))))
    return linear(params["proj_out"], norm(params["norm_out"], h))
