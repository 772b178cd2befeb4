"""The multi-host path: 2 processes x 2 CPU devices joined by jax.distributed.initialize on
127.0.0.1, one 4-device mesh across both, forward and gradient bitwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sp_common.testing import free_port

pytestmark = pytest.mark.timeout(180)


def test_two_processes_of_two_devices_shard_pad_gather_and_differentiate() -> None:
    port = free_port()
    worker = Path(__file__).with_name("jax_multihost_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, f"process exited {p.returncode}:\n{err[-3000:]}"
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for o in outputs:
        assert (o["process_count"], o["devices"], o["local_devices"]) == (2, 4, 2)
        assert (o["world_size"], o["local_len"]) == (4, 3)  # 10 tokens -> 12 padded -> 3 each
        assert o["forward_bitwise"] and o["grad_bitwise"]
