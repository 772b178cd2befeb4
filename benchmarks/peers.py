"""Peers' implementations of the same ops, loaded for side-by-side timing on the same inputs.

vLLM-Omni (``pip install --no-deps vllm-omni``): its ``sp_sharding`` module imports
``vllm.logger`` and its own ``parallel_state`` (which needs the whole vLLM stack). Both are
shimmed here, so only the module under test runs: ``init_logger`` is ``logging.getLogger``, and
the SP group is torch's default process group (``get_sequence_parallel_world_size`` /
``_rank`` are ``dist.get_world_size`` / ``dist.get_rank``; ``get_sp_group().all_gather`` is a
list ``all_gather`` + ``cat``, which it is not timed on here).

yunchang 0.6.4 (``pip install --no-deps yunchang``), checked on 2 and 4 gloo ranks against
float64 full attention (2026-12, torch 2.13 CPU):

- ``UlyssesAttention(attn_type=TORCH_MATH | TORCH_FLASH | TORCH_EFFICIENT)`` is not a peer. Its
  local attention (``select_flash_attn_impl(attn_type, stage="fwd-bwd")``) is
  ``ring_pytorch_attn_func`` for every ``TORCH_*`` type, called with ``group=None``: a ring
  attention over the default process group after the all-to-all, although each rank then
  holds other heads. On the CPU it raises first (the ring calls ``pytorch_attn_forward`` with
  its default ``op_type="flash"``, ``aten::_scaled_dot_product_flash_attention``, which has no
  CPU kernel, whatever ``attn_type`` says); with that one op replaced by its CPU twin
  (``_scaled_dot_product_flash_attention_for_cpu``) it runs, and its output is wrong:
  max |out - full attention| 0.41 (2 ranks) / 0.60 (4 ranks) non-causal, 2.35 / 2.38 causal,
  where max |full attention| is 0.76 / 3.3 ([1, 256, 8, 32], float32). Its backward raises
  (``pytorch_attn_backward``: "Not implemented backward for PyTorch attention types").
- ``LongContextAttention(attn_type=TORCH_MATH)`` with ring degree 1
  (``set_seq_parallel_pg(N, 1, ...)``; ring ``"basic"``, whose ``fwd-only`` kernel is
  ``pytorch_attn_forward(op_type="math")``) is correct: 3.2e-7 from full attention (float32),
  bitwise equal to ``sp_attention`` under ``sdpa_kernel(MATH)``. Forward only: its backward
  raises as above, and ``TORCH_FLASH`` / ``TORCH_EFFICIENT`` raise on the CPU (no CPU kernel
  for ``_scaled_dot_product_flash_attention`` / ``_efficient_attention``). This is the peer.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


class YunchangUlysses(NamedTuple):
    """yunchang's Ulysses forward pass, ``forward(q, k, v, causal) -> out`` on this rank's
    ``[B, S/N, H, D]`` chunks, and the process group it runs on."""

    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
    group: Any


_YUNCHANG: list[YunchangUlysses] = []  # made once per rank: its process groups are collective


def yunchang_ulysses() -> YunchangUlysses | None:
    """yunchang's ``LongContextAttention(attn_type=TORCH_MATH)`` with Ulysses over all ranks
    and ring degree 1 (the configuration that is correct on the CPU, see above), or None if
    yunchang is not installed. The first call must happen on every rank (it makes groups)."""
    if importlib.util.find_spec("yunchang") is None:
        return None
    if not _YUNCHANG:
        # Imported by name: yunchang ships no type information.
        yunchang = importlib.import_module("yunchang")
        attn_type = importlib.import_module("yunchang.kernels").AttnType.TORCH_MATH
        n = dist.get_world_size()
        yunchang.set_seq_parallel_pg(n, 1, dist.get_rank(), n)
        layer = yunchang.LongContextAttention(attn_type=attn_type)

        def forward(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
        ) -> torch.Tensor:
            return layer(q, k, v, causal=causal)

        group = importlib.import_module("yunchang.globals").PROCESS_GROUP.ULYSSES_PG
        _YUNCHANG.append(YunchangUlysses(forward, group))
    return _YUNCHANG[0]
