"""Bad-input cases as data, the public calls they go to, and the rank tasks that run them.

A case names a public function (a key of ``CALLS``) and its arguments, with :class:`Tensor`
placeholders that :func:`materialize` builds in the framework under test. The same case runs in
the pytest process (torch without a process group; JAX outside ``shard_map`` or traced inside it,
see ``test_bad_input.py``) and on every rank of a TorchRanks pool (``run_case``). Tasks return
plain values: the error as ``(type name, message)``, data as numpy arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import sp_common as sp


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A zero tensor of ``shape`` and ``dtype`` (a name torch and jax.numpy both know), built
    in the framework under test."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Foreign:
    """A :class:`Tensor` built in the other framework (single-process runs only)."""

    tensor: Tensor


@dataclasses.dataclass(frozen=True)
class Module:
    """A small ``torch.nn.Module`` (torch runs only)."""


def _build(spec: Tensor, framework: str) -> Any:
    if framework == "torch":
        return torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype))
    import jax.numpy as jnp

    return jnp.zeros(spec.shape, dtype=getattr(jnp, spec.dtype))


def materialize(value: Any, framework: str) -> Any:
    """``value`` with every placeholder replaced by a tensor of ``framework`` (``"torch"`` or
    ``"jax"``); other values are returned as they are."""
    if isinstance(value, Tensor):
        return _build(value, framework)
    if isinstance(value, Module):
        return torch.nn.Linear(2, 2)
    if isinstance(value, Foreign):
        return _build(value.tensor, "jax" if framework == "torch" else "torch")
    return value


def _in_sp_group(group: Any, like: Any) -> int:
    with sp.sp_group(group):
        return sp.sp_world_size(like)


def _in_sp_debug(enabled: Any) -> None:
    with sp.sp_debug(enabled):
        pass


def _validator_shard_tracked(tensor: Any, name: str, dim: Any, **kwargs: Any) -> Any:
    v = sp.ShardingValidator()
    with v.track():
        return v.shard(tensor, name, dim, **kwargs)


def _validator_gather_tracked(tensor: Any, name: str, shard_dim: int, gather_dim: Any) -> Any:
    """Shard ``name`` on ``shard_dim`` inside ``track()``, then gather it on ``gather_dim``."""
    v = sp.ShardingValidator()
    with v.track():
        return v.gather(v.shard(tensor, name, shard_dim), name, gather_dim)


def _in_sp_strict(enabled: Any) -> None:
    with sp.sp_strict(enabled):
        pass


class _Head(torch.nn.Module):
    """Returns its input twice, as a dict (``"dict"``) or a tuple (``"tuple"``)."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> Any:
        return {"sample": x, "aux": x} if self.output == "dict" else (x, x)


class _HeadModel(torch.nn.Module):
    def __init__(self, output: str) -> None:
        super().__init__()
        self.head = _Head(output)

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(x)


def _planned_forward(x: torch.Tensor, output: str, index: Any) -> Any:
    """A forward pass of a model whose ``head`` returns a dict or tuple (see :class:`_Head`),
    under a plan that shards ``x`` on dim 1 and gathers ``head``'s output (``index``)."""
    model = _HeadModel(output)
    plan = sp.SPPlan({"": sp.ShardInput("x", 1), "head": sp.GatherOutput(1, index=index)})
    with sp.apply_plan(model, plan):
        return model(x)


def _torch_to_jax(*args: Any, **kwargs: Any) -> Any:
    from sp_common.interop import torch_to_jax

    return torch_to_jax(*args, **kwargs)


def _jax_to_torch(*args: Any, **kwargs: Any) -> Any:
    from sp_common.interop import jax_to_torch

    return jax_to_torch(*args, **kwargs)


# Every public function, by the name a user calls it by (text after a space says how).
CALLS: dict[str, Callable[..., Any]] = {
    "sp_shard": sp.sp_shard,
    "sp_gather": sp.sp_gather,
    "sp_shard_with_padding": sp.sp_shard_with_padding,
    "sp_unpad": sp.sp_unpad,
    "sp_all_to_all": sp.sp_all_to_all,
    "sp_reduce_scatter": sp.sp_reduce_scatter,
    "sp_padding_mask": sp.sp_padding_mask,
    "sp_ulysses_attention": sp.sp_ulysses_attention,
    "sp_attention": sp.sp_attention,
    "sp_world_size": sp.sp_world_size,
    "sp_rank": sp.sp_rank,
    "sp_group (then sp_world_size inside)": _in_sp_group,
    "sp_debug": _in_sp_debug,
    "get_sharding_validator": sp.get_sharding_validator,
    "ShardingValidator": sp.ShardingValidator,
    "ShardingValidator.shard": lambda *a, **k: sp.ShardingValidator().shard(*a, **k),
    "ShardingValidator.shard (in track)": _validator_shard_tracked,
    "ShardingValidator.gather": lambda *a, **k: sp.ShardingValidator().gather(*a, **k),
    "ShardingValidator.gather (in track, after shard)": _validator_gather_tracked,
    "SPPlan": sp.SPPlan,
    "ShardInput": sp.ShardInput,
    "GatherOutput": sp.GatherOutput,
    "apply_plan": sp.apply_plan,
    "apply_plan (then a forward pass)": _planned_forward,
    "all_reduce_grads": sp.all_reduce_grads,
    "planned_seq_len": sp.planned_seq_len,
    "sp_strict": _in_sp_strict,
    "torch_to_jax": _torch_to_jax,
    "jax_to_torch": _jax_to_torch,
}


def public_name(call: str) -> str:
    """The name in ``sp_common`` that ``call`` exercises: ``"ShardingValidator.shard"`` ->
    ``"ShardingValidator"``."""
    return call.split(" ")[0].split(".")[0]


def outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    """``(exception type name, message)`` of ``fn()``, or ``("no error", "")``."""
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return "no error", ""


def run_case(call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
    """Run one case with torch tensors (on a pool rank, or in-process at world size 1)."""
    a = tuple(materialize(v, "torch") for v in args)
    k = {key: materialize(v, "torch") for key, v in kwargs.items()}
    return outcome(lambda: CALLS[call](*a, **k))


# Data that must still move correctly: carriers are numpy dtypes with the same item size, so a
# float8 tensor travels to the rank as uint8 bits and comes back the same way.


def _from_carrier(a: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(getattr(torch, dtype))


def _to_carrier(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    return t.contiguous().view(torch.from_numpy(like[:0].copy()).dtype).numpy()


def move_bits(a: np.ndarray, dtype: str, dim: int) -> dict[str, np.ndarray | int]:
    """Shard, gather, padded shard, gather with ``pad_size`` and the all-to-all (``dim`` ->
    dim 0) of the ``dtype`` tensor whose bits are ``a``; results as carrier arrays."""
    t = _from_carrier(a, dtype)
    n = sp.sp_world_size(t)
    out: dict[str, np.ndarray | int] = {}
    if a.shape[dim] % n == 0:
        shard = sp.sp_shard(t, dim)
        out["shard"] = _to_carrier(shard, a)
        out["gather"] = _to_carrier(sp.sp_gather(shard, dim), a)
        out["all_to_all"] = _to_carrier(sp.sp_all_to_all(t, dim, 0), a)
    padded, pad = sp.sp_shard_with_padding(t, dim)
    out["padded_shard"], out["pad"] = _to_carrier(padded, a), pad
    out["gather_unpad"] = _to_carrier(sp.sp_gather(padded, dim, pad_size=pad), a)
    return out


def short_sequence(x: np.ndarray, dim: int, pad_value: float) -> dict[str, Any]:
    """A sequence shorter than (or as long as) the world size: padded shard, gather with
    ``pad_size``, ``sp_unpad`` and this rank's padding mask."""
    t = torch.from_numpy(x)
    padded, pad = sp.sp_shard_with_padding(t, dim, pad_value)
    out: dict[str, Any] = {
        "padded_shard": padded.numpy(),
        "pad": pad,
        "gather_unpad": sp.sp_gather(padded, dim, pad_size=pad).numpy(),
        "unpad": sp.sp_unpad(sp.sp_gather(padded, dim), dim, pad).numpy(),
    }
    if x.shape[dim]:
        out["mask"] = sp.sp_padding_mask(t, x.shape[dim]).numpy()
    return out


def empty_sequence(x: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """Every op on a tensor whose ``dim`` has size 0 (and so nothing to move)."""
    t = torch.from_numpy(x)
    padded, pad = sp.sp_shard_with_padding(t, dim)
    return {
        "shard": sp.sp_shard(t, dim).numpy(),
        "gather": sp.sp_gather(t, dim).numpy(),
        "padded_shard": padded.numpy(),
        "gather_unpad": sp.sp_gather(padded, dim, pad_size=pad).numpy(),
        "all_to_all": sp.sp_all_to_all(t, dim, 0).numpy(),
        "reduce_scatter": sp.sp_reduce_scatter(t, dim).numpy(),
    }


def reduce_scatter_rank(stacked: np.ndarray, dim: int) -> np.ndarray:
    """``sp_reduce_scatter`` of ``stacked[rank]``."""
    t = torch.from_numpy(stacked[sp.sp_rank(torch.zeros(()))])
    return sp.sp_reduce_scatter(t, dim).numpy()
