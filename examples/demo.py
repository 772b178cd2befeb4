"""One transformer block, written once against sp_common, run sharded on torch and on JAX.

Run from the repository root (``make demo``)::

    .venv/bin/python examples/demo.py

The block in ``examples/model.py`` runs four ways on the same seeded float32 input and weights:

* torch, 4 gloo ranks on the CPU (one process each), and torch unsharded (no process group);
* JAX, ``shard_map`` over a 4-device CPU mesh, and JAX unsharded (outside ``shard_map``).

It prints how far each sharded output is from its framework's unsharded one, whether the two
frameworks produce byte-identical shards (``sp_shard_with_padding``) and gathers (``sp_gather``)
of the same input, and how far the torch and JAX outputs are from each other. It exits 1 when a
check fails. The sequence length (10) is not divisible by the world size (4), so every path pads.
"""

from __future__ import annotations

import os

# Before JAX is first imported (it is imported lazily, in run_jax): 4 host CPU devices.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
).strip()

import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from model import init_params, jax_ops, shard_roundtrip, torch_ops, transformer_block

WORLD = 4
BATCH, SEQ, HIDDEN, HEADS = 2, 10, 16, 2
SEED = 0
TORCH_TIMEOUT_S = 90.0  # the whole torch run; a hung rank is killed after this
SHARDED_TOL = 1e-5  # sharded vs unsharded, same framework
CROSS_TOL = 1e-4  # torch vs JAX: same math, different kernels

Params = dict[str, np.ndarray]


@dataclass
class ShardedRun:
    """What one sharded run produced, as numpy arrays; each list is in rank order."""

    outputs: list[np.ndarray]  # each rank's copy of the block output [B, S, H]
    shards: list[np.ndarray]  # each rank's sp_shard_with_padding of the input [B, s, H]
    gathered: list[np.ndarray]  # each rank's sp_gather of the shards, pad removed [B, S, H]


def make_input() -> np.ndarray:
    """The seeded ``[BATCH, SEQ, HIDDEN]`` float32 input shared by every run."""
    return np.random.default_rng(SEED + 1).standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)


def reference_shards(x: np.ndarray) -> list[np.ndarray]:
    """Each rank's padded shard of ``x`` along dim 1, computed with plain numpy."""
    pad = -x.shape[1] % WORLD
    padded = np.concatenate([x, np.zeros((x.shape[0], pad, x.shape[2]), x.dtype)], axis=1)
    return np.split(padded, WORLD, axis=1)


# --------------------------------------------------------------------------------------- torch


def _free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torch_rank(rank: int, port: int, x: np.ndarray, params: Params, results: Any) -> None:
    """Body of one torch rank: join the gloo group, run the block, send numpy results back.

    Sends ``(rank, "ok", (output, shard, gathered))`` or ``(rank, "error", traceback)``.
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TORCH_TIMEOUT_S)
        )
        ops = torch_ops()
        xt = ops.asarray(x)
        with torch.no_grad():
            out = transformer_block(ops, {k: ops.asarray(v) for k, v in params.items()}, xt, HEADS)
            shard, gathered = shard_roundtrip(xt)
        results.put((rank, "ok", (out.numpy(), shard.numpy(), gathered.numpy())))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_torch_sharded(x: np.ndarray, params: Params) -> ShardedRun:
    """Run the block on ``WORLD`` gloo ranks (spawned processes); every rank is reaped.

    Raises RuntimeError when a rank fails or dies, TimeoutError after ``TORCH_TIMEOUT_S``.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_torch_rank, args=(r, port, x, params, results), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TORCH_TIMEOUT_S
    got: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    try:
        while len(got) < WORLD:
            if time.monotonic() > deadline:
                raise TimeoutError(f"torch ranks {sorted(set(range(WORLD)) - set(got))} hung")
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"torch ranks {dead} died without reporting") from None
                continue
            if status != "ok":
                raise RuntimeError(f"torch rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        # Ranks exit right after reporting; after a failure, peers blocked in a collective are
        # killed once this short grace period is over.
        grace_end = time.monotonic() + 10.0
        for p in procs:
            p.join(timeout=max(0.0, grace_end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    ranks = [got[r] for r in range(WORLD)]
    return ShardedRun(*([r[i] for r in ranks] for i in range(3)))


def run_torch_unsharded(x: np.ndarray, params: Params) -> np.ndarray:
    """The same block in this process, with no process group: every sp_* op is the identity."""
    import torch

    ops = torch_ops()
    with torch.no_grad():
        out = transformer_block(
            ops, {k: ops.asarray(v) for k, v in params.items()}, ops.asarray(x), HEADS
        )
    return out.numpy()


# ----------------------------------------------------------------------------------------- JAX


def run_jax(x: np.ndarray, params: Params) -> tuple[ShardedRun, np.ndarray]:
    """The block under ``shard_map`` on a ``WORLD``-device CPU mesh, and outside it (unsharded)."""
    import jax
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < WORLD:
        raise RuntimeError(f"JAX sees {jax.device_count()} devices, need {WORLD}; check XLA_FLAGS")
    ops = jax_ops()
    jparams = {k: ops.asarray(v) for k, v in params.items()}
    jx = ops.asarray(x)

    def step(params: dict[str, jax.Array], x: jax.Array) -> tuple[jax.Array, ...]:
        shard, gathered = shard_roundtrip(x)
        return transformer_block(ops, params, x, HEADS), shard, gathered

    unsharded = np.asarray(jax.jit(step)(jparams, jx)[0])

    def per_device(params: dict[str, jax.Array], x: jax.Array) -> tuple[jax.Array, ...]:
        # A leading axis of 1 on each replicated result, so that out_specs=P("sp") hands back
        # every device's own copy (stacked), not one copy that stands for all.
        out, shard, gathered = step(params, x)
        return out[None], shard, gathered[None]

    mesh = jax.make_mesh((WORLD,), ("sp",))
    with jax.set_mesh(mesh):
        sharded = jax.jit(
            jax.shard_map(
                per_device, mesh=mesh, in_specs=P(), out_specs=(P("sp"), P(None, "sp"), P("sp"))
            )
        )
        outs, shards, gathered = (np.asarray(a) for a in sharded(jparams, jx))
    run = ShardedRun(list(outs), np.split(shards, WORLD, axis=1), list(gathered))
    return run, unsharded


# ------------------------------------------------------------------------------------- checks


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality: same dtype, same shape, same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference (inf when the shapes differ)."""
    return float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain left-aligned text table."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    for i, row in enumerate([headers, *rows]):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print(line)


def main() -> int:
    """Run everything, print the tables; 0 when every check holds, else 1."""
    t0 = time.perf_counter()
    x, params = make_input(), init_params(HIDDEN, seed=SEED)
    pad = -SEQ % WORLD
    print(
        f"transformer block: batch {BATCH}, seq {SEQ}, hidden {HIDDEN}, heads {HEADS}; "
        f"SP world size {WORLD} -> shards of {(SEQ + pad) // WORLD} tokens, pad {pad}"
    )

    torch_run = run_torch_sharded(x, params)
    torch_ref = run_torch_unsharded(x, params)
    jax_run, jax_ref = run_jax(x, params)
    expected_shards = reference_shards(x)

    def mark(ok: bool) -> str:
        return "ok" if ok else "FAIL"

    failures = 0

    # Per backend: sharded vs unsharded (same framework).
    rows = []
    for name, run, ref in (
        ("torch (4 gloo ranks)", torch_run, torch_ref),
        ("jax (shard_map, 4 devices)", jax_run, jax_ref),
    ):
        diff = max(max_abs(out, ref) for out in run.outputs)
        same = all(same_bytes(o, run.outputs[0]) for o in run.outputs)
        ok = diff <= SHARDED_TOL and same
        failures += not ok
        replicas = "bitwise equal" if same else "DIFFER"
        rows.append([name, f"{diff:.2e}", f"{SHARDED_TOL:.0e}", replicas, mark(ok)])
    print("\nsharded vs unsharded run of the block, same framework")
    print_table(["backend", "max |diff|", "tol", "output on every rank", ""], rows)

    # Across frameworks: the data movement must match byte for byte.
    rows = []
    checks = [
        ("sp_shard_with_padding", torch_run.shards, jax_run.shards, expected_shards),
        ("sp_gather(pad_size)", torch_run.gathered, jax_run.gathered, [x] * WORLD),
    ]
    for label, torch_out, jax_out, expected in checks:
        for r in range(WORLD):
            t, j, e = torch_out[r], jax_out[r], expected[r]
            ok = same_bytes(t, j) and same_bytes(t, e)
            failures += not ok
            rows.append(
                [
                    f"{label}, rank {r}",
                    "x".join(map(str, t.shape)),
                    "bitwise equal" if same_bytes(t, j) else f"DIFFER (max {max_abs(t, j):.1e})",
                    "yes" if same_bytes(t, e) else "NO",
                    mark(ok),
                ]
            )
    print("\ntorch vs jax on the sharded input data (pure data movement)")
    print_table(["op on the input x", "shape", "torch vs jax", "matches numpy", ""], rows)

    # Across frameworks: the block outputs (same math, different kernels: close, not bitwise).
    rows = []
    for label, t, j in (
        ("sharded", torch_run.outputs[0], jax_run.outputs[0]),
        ("unsharded", torch_ref, jax_ref),
    ):
        diff = max_abs(t, j)
        ok = diff <= CROSS_TOL
        failures += not ok
        rows.append([label, f"{diff:.2e}", f"{CROSS_TOL:.0e}", mark(ok)])
    print("\ntorch vs jax block output")
    print_table(["run", "max |diff|", "tol", ""], rows)

    verdict = "all checks passed" if not failures else f"{failures} check(s) FAILED"
    print(f"\n{verdict} in {time.perf_counter() - t0:.1f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
