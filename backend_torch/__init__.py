"""torch.distributed backend of sp_common (NCCL on CUDA tensors, gloo on CPU tensors)."""

from .core import TorchBackend, default_group

BACKEND = TorchBackend()

__all__ = ["BACKEND", "TorchBackend", "default_group"]
