"""Sequence-parallel sharding for PyTorch and JAX behind one API.

``import sp_common`` imports neither framework; the backend is picked from the tensor's type.
"""

from .api import sp_gather, sp_rank, sp_shard, sp_shard_with_padding, sp_unpad, sp_world_size
from .debug import sp_debug
from .groups import sp_group
from .validator import ShardingValidator, get_sharding_validator

__all__ = [
    "ShardingValidator",
    "get_sharding_validator",
    "sp_debug",
    "sp_gather",
    "sp_group",
    "sp_rank",
    "sp_shard",
    "sp_shard_with_padding",
    "sp_unpad",
    "sp_world_size",
]

__version__ = "0.1.0"
