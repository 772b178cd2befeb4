"""One process of the 2-process x 2-device JAX test (run as a script by test_jax_multihost.py).

argv: process_id, coordinator port. Prints one JSON line with what this process observed.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sp_common as sp
from sp_common.testing.data import same_bits


def main() -> None:
    process_id, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    mesh = jax.make_mesh((4,), ("sp",))
    x = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
    w = np.linspace(-1, 1, x.size, dtype=np.float32).reshape(x.shape)

    def replicated(a: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, P()), lambda i: a[i])

    def body(a, w):
        s, p = sp.sp_shard_with_padding(a, 1)
        y = sp.sp_gather(s * 3, 1, pad_size=p)
        return y, (y * w).sum(), sp.sp_world_size(a), s.shape[1]

    sizes = []

    def traced(a, w):
        y, loss, n, local = body(a, w)
        sizes.append((n, local))
        return y, loss

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.shard_map(traced, mesh=mesh, in_specs=(P(), P()), out_specs=(P(), P())))
        y, _ = fn(replicated(x), replicated(w))
        grad = jax.jit(jax.grad(lambda a, w: fn(a, w)[1]))(replicated(x), replicated(w))
    local_y = np.asarray(y.addressable_data(0))
    local_grad = np.asarray(grad.addressable_data(0))
    expected_grad = np.asarray(jax.grad(lambda a: (a * 3 * jnp.asarray(w)).sum())(jnp.asarray(x)))
    print(
        json.dumps(
            {
                "process_count": jax.process_count(),
                "devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "world_size": sizes[0][0],
                "local_len": sizes[0][1],
                "forward_bitwise": bool(np.array_equal(local_y, x * 3)),
                "grad_bitwise": same_bits(local_grad, expected_grad),
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
