"""Helpers for testing and measuring sequence-parallel code, as ``numpy.testing`` or
``torch.testing`` are for theirs: one rank pool, seeded data with numpy references, bitwise
comparison, one timing loop and one table writer. Used by this project's tests, benchmarks,
examples and ``sp-compare``; numpy and ml_dtypes only (frameworks are imported when used).
Names load lazily: ``from sp_common.testing import RankPool`` imports only :mod:`.ranks`.

- :mod:`.attention`: the float64 numpy reference of attention, forward and gradients.
- :mod:`.ranks`: :class:`RankPool`, persistent torch ranks with deadlines.
- :mod:`.data`: :func:`make_data`, the numpy references, :func:`assert_bitwise`, converters.
- :mod:`.mesh`: JAX meshes and ``jit(shard_map(...))`` over the first n devices.
- :mod:`.timing`: :func:`interleaved` and :func:`slowest_rank`.
- :mod:`.tables`: :func:`format_table`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attention import AttentionGrads, reference_attention, reference_attention_grads
    from .data import (
        DTYPES,
        FLOAT_DTYPES,
        all_to_all,
        assert_bitwise,
        bits,
        make_data,
        numpy_dtype,
        pad_size,
        padded_shards,
        reduce_scatter,
        same_bits,
        shards,
        to_jax,
        to_numpy,
        to_torch,
    )
    from .mesh import (
        mesh_of,
        run_sharded,
        sharded,
        spec_on,
    )
    from .ranks import (
        RankFailure,
        RankPool,
        cuda_device_count,
        free_port,
    )
    from .tables import (
        format_table,
    )
    from .timing import (
        Fences,
        Timings,
        interleaved,
        jax_fences,
        slowest_rank,
        torch_fences,
    )

_MODULE_OF = {
    "AttentionGrads": "attention",
    "reference_attention": "attention",
    "reference_attention_grads": "attention",
    "DTYPES": "data",
    "FLOAT_DTYPES": "data",
    "all_to_all": "data",
    "assert_bitwise": "data",
    "bits": "data",
    "make_data": "data",
    "numpy_dtype": "data",
    "pad_size": "data",
    "padded_shards": "data",
    "reduce_scatter": "data",
    "same_bits": "data",
    "shards": "data",
    "to_jax": "data",
    "to_numpy": "data",
    "to_torch": "data",
    "mesh_of": "mesh",
    "run_sharded": "mesh",
    "sharded": "mesh",
    "spec_on": "mesh",
    "RankFailure": "ranks",
    "RankPool": "ranks",
    "cuda_device_count": "ranks",
    "free_port": "ranks",
    "format_table": "tables",
    "Fences": "timing",
    "Timings": "timing",
    "interleaved": "timing",
    "jax_fences": "timing",
    "slowest_rank": "timing",
    "torch_fences": "timing",
}

__all__ = [
    "AttentionGrads",
    "DTYPES",
    "FLOAT_DTYPES",
    "Fences",
    "RankFailure",
    "RankPool",
    "Timings",
    "all_to_all",
    "assert_bitwise",
    "bits",
    "cuda_device_count",
    "format_table",
    "free_port",
    "interleaved",
    "jax_fences",
    "make_data",
    "mesh_of",
    "numpy_dtype",
    "pad_size",
    "padded_shards",
    "reduce_scatter",
    "reference_attention",
    "reference_attention_grads",
    "run_sharded",
    "same_bits",
    "sharded",
    "shards",
    "slowest_rank",
    "spec_on",
    "to_jax",
    "to_numpy",
    "to_torch",
    "torch_fences",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sp_common.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return __all__
