"""One transformer block, written once against sp_common, run sharded on torch and on JAX.

Run from the repository root (``make demo``)::

    .venv/bin/python -m examples.demo

The block in ``examples/model.py`` runs four ways on the same seeded float32 input and weights:

* torch, 4 gloo ranks on the CPU (a ``sp_common.testing.RankPool``), and torch unsharded (no
  process group);
* JAX, ``shard_map`` over a 4-device CPU mesh, and JAX unsharded (outside ``shard_map``).

It prints how far each sharded output is from its framework's unsharded one, whether the two
frameworks produce byte-identical shards (``sp_shard_with_padding``) and gathers (``sp_gather``)
of the same input, and how far the torch and JAX outputs are from each other. It exits 1 when a
check fails. The sequence length (10) is not divisible by the world size (4), so every path pads.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NamedTuple

import numpy as np

from examples.model import init_params, shard_roundtrip, sp_transformer_block
from sp_common.testing import (
    RankPool,
    format_table,
    make_data,
    padded_shards,
    run_sharded,
    same_bits,
    to_jax,
    to_numpy,
    to_torch,
)

WORLD = 4
BATCH, SEQ, HIDDEN, HEADS = 2, 10, 16, 2
SEED = 0
TORCH_TIMEOUT_S = 90.0  # one call on the torch ranks; hung ranks are killed after this
SHARDED_TOL = 1e-5  # sharded vs unsharded, same framework
CROSS_TOL = 1e-4  # torch vs JAX: same math, different kernels

Params = dict[str, np.ndarray]


class ShardedRun(NamedTuple):
    """What one sharded run produced, as numpy arrays; each list is in rank order."""

    outputs: list[np.ndarray]  # each rank's copy of the block output [B, S, H]
    shards: list[np.ndarray]  # each rank's sp_shard_with_padding of the input [B, s, H]
    gathered: list[np.ndarray]  # each rank's sp_gather of the shards, pad removed [B, S, H]


# --------------------------------------------------------------------------------------- torch


def torch_step(x: np.ndarray, params: Params) -> tuple[np.ndarray, ...]:
    """On one torch rank, or in this process (no process group: unsharded): the block output,
    this rank's padded shard of ``x`` and its gather back, as numpy."""
    import torch

    xt = to_torch(x)
    with torch.no_grad():
        out = sp_transformer_block({k: to_torch(v) for k, v in params.items()}, xt, HEADS)
        shard, gathered = shard_roundtrip(xt)
    return to_numpy(out), to_numpy(shard), to_numpy(gathered)


def run_torch(x: np.ndarray, params: Params) -> tuple[ShardedRun, np.ndarray]:
    """The block on ``WORLD`` gloo ranks, and unsharded in this process."""
    with RankPool(WORLD, call_timeout_s=TORCH_TIMEOUT_S) as pool:
        ranks = pool.run(torch_step, x, params)
    run = ShardedRun(*([r[i] for r in ranks] for i in range(3)))
    return run, torch_step(x, params)[0]


# ----------------------------------------------------------------------------------------- JAX


def run_jax(x: np.ndarray, params: Params) -> tuple[ShardedRun, np.ndarray]:
    """The block under ``shard_map`` on a ``WORLD``-device CPU mesh, and outside it (unsharded)."""
    # WORLD host CPU devices; read when JAX starts, which is here (nothing before imports it).
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={WORLD}"]
    ).strip()
    import jax
    from jax.sharding import PartitionSpec as P

    jparams, jx = {k: to_jax(v) for k, v in params.items()}, to_jax(x)

    def step(params: dict[str, Any], x: Any) -> tuple[Any, ...]:
        return sp_transformer_block(params, x, HEADS), *shard_roundtrip(x)

    unsharded = np.asarray(jax.jit(step)(jparams, jx)[0])

    def per_device(params: dict[str, Any], x: Any) -> tuple[Any, ...]:
        # A leading axis of 1 on each replicated result, so that out_specs=P("sp") hands back
        # every device's own copy (stacked), not one copy that stands for all.
        out, shard, gathered = step(params, x)
        return out[None], shard, gathered[None]

    out_specs = (P("sp"), P(None, "sp"), P("sp"))
    outs, shards, gathered = (
        np.asarray(a) for a in run_sharded(per_device, WORLD, (jparams, jx), out_specs)
    )
    run = ShardedRun(list(outs), np.split(shards, WORLD, axis=1), list(gathered))
    return run, unsharded


# ------------------------------------------------------------------------------------- checks


def main() -> int:
    """Run everything, print the tables; 0 when every check holds, else 1."""
    t0 = time.perf_counter()
    x = make_data((BATCH, SEQ, HIDDEN), "float32", seed=SEED + 1, specials=False)
    params = init_params(HIDDEN, seed=SEED)
    expected_shards, pad = padded_shards(x, 1, WORLD)
    print(
        f"transformer block: batch {BATCH}, seq {SEQ}, hidden {HIDDEN}, heads {HEADS}; "
        f"SP world size {WORLD} -> shards of {(SEQ + pad) // WORLD} tokens, pad {pad}"
    )

    torch_run, torch_ref = run_torch(x, params)
    jax_run, jax_ref = run_jax(x, params)

    def mark(ok: bool) -> str:
        return "ok" if ok else "FAIL"

    failures = 0

    # Per backend: sharded vs unsharded (same framework).
    rows = []
    for name, run, ref in (
        (f"torch ({WORLD} gloo ranks)", torch_run, torch_ref),
        (f"jax (shard_map, {WORLD} devices)", jax_run, jax_ref),
    ):
        diff = max(float(np.abs(out - ref).max()) for out in run.outputs)
        same = all(same_bits(o, run.outputs[0]) for o in run.outputs)
        ok = diff <= SHARDED_TOL and same
        failures += not ok
        replicas = "bitwise equal" if same else "DIFFER"
        rows.append([name, f"{diff:.2e}", f"{SHARDED_TOL:.0e}", replicas, mark(ok)])
    print("\nsharded vs unsharded run of the block, same framework")
    print(format_table(["backend", "max |diff|", "tol", "output on every rank", ""], rows))

    # Across frameworks: the data movement must match byte for byte.
    rows = []
    checks = [
        ("sp_shard_with_padding", torch_run.shards, jax_run.shards, expected_shards),
        ("sp_gather(pad_size)", torch_run.gathered, jax_run.gathered, [x] * WORLD),
    ]
    for label, torch_out, jax_out, expected in checks:
        for r in range(WORLD):
            t, j, e = torch_out[r], jax_out[r], expected[r]
            ok = same_bits(t, j) and same_bits(t, e)
            failures += not ok
            rows.append(
                [
                    f"{label}, rank {r}",
                    "x".join(map(str, t.shape)),
                    "bitwise equal" if same_bits(t, j) else "DIFFER",
                    "yes" if same_bits(t, e) else "NO",
                    mark(ok),
                ]
            )
    print("\ntorch vs jax on the sharded input data (pure data movement)")
    print(format_table(["op on the input x", "shape", "torch vs jax", "matches numpy", ""], rows))

    # Across frameworks: the block outputs (same math, different kernels: close, not bitwise).
    rows = []
    for label, t, j in (
        ("sharded", torch_run.outputs[0], jax_run.outputs[0]),
        ("unsharded", torch_ref, jax_ref),
    ):
        diff = float(np.abs(t - j).max())
        ok = diff <= CROSS_TOL
        failures += not ok
        rows.append([label, f"{diff:.2e}", f"{CROSS_TOL:.0e}", mark(ok)])
    print("\ntorch vs jax block output")
    print(format_table(["run", "max |diff|", "tol", ""], rows))

    verdict = "all checks passed" if not failures else f"{failures} check(s) FAILED"
    print(f"\n{verdict} in {time.perf_counter() - t0:.1f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
