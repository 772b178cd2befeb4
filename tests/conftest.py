"""Test-session setup: 8 virtual JAX CPU devices, Keras on JAX in this process, and reusable
torch gloo rank pools."""

from __future__ import annotations

import os

# Must be set before JAX initializes its CPU backend. The test programs are tiny, so their
# time is XLA's compile time: the CPU backend's code generation runs at optimization level 0
# (the programs' semantics are XLA's either way; the JAX tests' compile time falls by about a
# quarter). The README snippets and the examples run in their own processes with XLA's defaults.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
# Keras reads its backend once, at its first import: this process's is JAX (the Keras tests'
# torch ranks set KERAS_BACKEND=torch before they import keras).
os.environ["KERAS_BACKEND"] = "jax"

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from sp_common.testing import RankPool

# gloo's own timeout: a rank left alone in a collective raises after this many seconds.
COLLECTIVE_TIMEOUT_S = 30
# A call that takes longer than this fails (its ranks are replaced for the next test).
CALL_TIMEOUT_S = 90


@pytest.fixture(scope="session")
def torch_ranks() -> Iterator[Callable[[int], RankPool]]:
    """``torch_ranks(n)``: a pool of n gloo ranks, started on first use and kept for the session
    (a pool whose ranks hung is restarted on its next call)."""
    pools: dict[int, RankPool] = {}

    def get(n: int) -> RankPool:
        if n not in pools:
            pools[n] = RankPool(
                n, collective_timeout_s=COLLECTIVE_TIMEOUT_S, call_timeout_s=CALL_TIMEOUT_S
            )
        return pools[n]

    yield get
    # Together: each pool's ranks take a second or two to leave their process group and exit.
    with ThreadPoolExecutor() as closing:
        list(closing.map(RankPool.close, pools.values()))


@pytest.fixture
def jax_x64() -> Iterator[None]:
    """64-bit JAX types for one test (int64 stays int64)."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)
