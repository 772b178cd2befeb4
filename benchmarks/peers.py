"""Peers' implementations of the same ops, loaded for side-by-side timing on the same inputs.

vLLM-Omni (``pip install --no-deps vllm-omni``): its ``sp_sharding`` module imports
``vllm.logger`` and its own ``parallel_state`` (which needs the whole vLLM stack). Both are
shimmed here, so only the module under test runs: ``init_logger`` is ``logging.getLogger``, and
the SP group is torch's default process group (``get_sequence_parallel_world_size`` /
``_rank`` are ``dist.get_world_size`` / ``dist.get_rank``; ``get_sp_group().all_gather`` is a
list ``all_gather`` + ``cat``, which it is not timed on here).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class _SPGroup:
    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)


def vllm_omni_sp_sharding() -> Any | None:
    """vLLM-Omni's ``sp_sharding`` module with its imports shimmed, or None if not installed."""
    spec = importlib.util.find_spec("vllm_omni")
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "diffusion" / "distributed" / "sp_sharding.py"
    logger_mod = types.ModuleType("vllm.logger")
    logger_mod.init_logger = logging.getLogger  # type: ignore[attr-defined]
    state = types.ModuleType("vllm_omni.diffusion.distributed.parallel_state")
    state.get_sequence_parallel_rank = dist.get_rank  # type: ignore[attr-defined]
    state.get_sequence_parallel_world_size = dist.get_world_size  # type: ignore[attr-defined]
    state.get_sp_group = _SPGroup  # type: ignore[attr-defined]
    sys.modules.setdefault("vllm", types.ModuleType("vllm"))
    sys.modules["vllm.logger"] = logger_mod
    sys.modules[state.__name__] = state
    module_spec = importlib.util.spec_from_file_location("vllm_omni_sp_sharding", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # its dataclasses look their module up there
    module_spec.loader.exec_module(module)
    return module
