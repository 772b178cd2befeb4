"""Sequence-parallel sharding for PyTorch and JAX behind one API.

``import sp_common`` imports neither framework; the backend is picked from the tensor's type.
"""

from .api import sp_gather, sp_rank, sp_shard, sp_shard_with_padding, sp_unpad, sp_world_size
from .attention import sp_attention, sp_padding_mask, sp_ulysses_attention
from .debug import sp_debug
from .exchange import sp_all_to_all, sp_reduce_scatter
from .groups import sp_group
from .interop import jax_to_torch, torch_to_jax
from .plan import (
    GatherOutput,
    PlanError,
    ShardInput,
    SPPlan,
    all_reduce_grads,
    apply_plan,
    planned_seq_len,
)
from .strict import sp_strict
from .validator import ShardingValidator, get_sharding_validator

__all__ = [
    "GatherOutput",
    "PlanError",
    "SPPlan",
    "ShardInput",
    "ShardingValidator",
    "all_reduce_grads",
    "apply_plan",
    "get_sharding_validator",
    "jax_to_torch",
    "planned_seq_len",
    "sp_attention",
    "sp_all_to_all",
    "sp_debug",
    "sp_gather",
    "sp_group",
    "sp_padding_mask",
    "sp_rank",
    "sp_reduce_scatter",
    "sp_shard",
    "sp_shard_with_padding",
    "sp_strict",
    "sp_ulysses_attention",
    "sp_unpad",
    "sp_world_size",
    "torch_to_jax",
]

__version__ = "0.1.0"
