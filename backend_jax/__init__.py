"""JAX backend of sp_common: collectives over a mesh axis inside ``jax.shard_map``."""

from .core import DEFAULT_AXIS, JaxBackend

BACKEND = JaxBackend()

__all__ = ["BACKEND", "DEFAULT_AXIS", "JaxBackend"]
