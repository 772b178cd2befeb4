"""Every Python snippet in README.md runs as written.

A snippet runs in a fresh interpreter (``python``), or under ``torchrun --nproc_per_node=N`` on
gloo, as the ``<!-- readme-test: ... -->`` line just above it says; several runs are separated
by ``;``. ``setup=NAME`` prepends ``SETUPS[NAME]``: the names a fragment uses but does not define
(a model, its inputs), never code that changes what the snippet does; under torchrun the
process group is destroyed at the end if the snippet left it. ``skip: reason`` marks a
snippet that needs what no test machine has (two hosts); the reason names the test that runs the
same code instead. A snippet with no line runs once with ``python``. It passes when the process
exits 0: the snippets assert their own results.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
pytestmark = pytest.mark.timeout(600)

SETUPS = {
    "torch-init": 'import torch.distributed as dist\ndist.init_process_group("gloo")\n',
    "torch-x": (
        "import torch\nimport torch.distributed as dist\n"
        'dist.init_process_group("gloo")\n'
        "x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)\n"
    ),
    "torch-qkv": (
        "import torch\nimport torch.distributed as dist\n"
        "from sp_common import sp_gather, sp_shard_with_padding, sp_ulysses_attention\n"
        'dist.init_process_group("gloo")\n'
        "q, k, v = torch.randn(3, 1, 10, 4, 8, generator=torch.Generator().manual_seed(0))\n"
    ),
    "ranks": "ranks = [0, 1]\n",
    "flax": (
        "import os\n"
        'os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"\n'
        "import jax, jax.numpy as jnp\n"
        "from flax import nnx\n"
        "from examples.flax_nnx import inputs, tiny_model\n"
        "mesh = jax.make_mesh((4,), ('sp',))\n"
        "x, w = (jnp.asarray(a) for a in inputs(10))\n"
    ),
    "keras-jax": (
        "import os\n"
        'os.environ["KERAS_BACKEND"] = "jax"\n'
        'os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"\n'
        "import jax, numpy as np\n"
        "from examples.keras_model import inputs, tiny_model\n"
    ),
    "plans": (
        "import os\n"
        'os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"\n'
        "import jax, numpy as np, torch\n"
        "from examples.dit import PATCH, init_params, jax_forward, torch_model\n"
        "model = torch_model(init_params())\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "x = torch.randn(2, 10, PATCH)\n"
        "w = torch.randn(2, 10, PATCH)\n"
        "mesh = jax.make_mesh((4,), ('sp',))\n"
        "params = jax.tree_util.tree_map(jax.numpy.asarray, init_params())\n"
    ),
}


TEARDOWN = (
    "\nimport torch.distributed as _dist\n"
    "if _dist.is_initialized():\n"
    "    _dist.destroy_process_group()\n"
)


@dataclass(frozen=True)
class Snippet:
    line: int  # of the opening fence
    code: str
    runs: tuple[str, ...]  # "python", "torchrun=N", optionally with " setup=NAME"; or "skip: ..."


def snippets() -> list[Snippet]:
    text = README.read_text().split("\n")
    found = []
    for i, line in enumerate(text):
        if line.strip() != "```python":
            continue
        end = text.index("```", i + 1)
        label = re.fullmatch(r"<!-- readme-test: (.*) -->", text[i - 1].strip()) if i else None
        runs = ("python",) if label is None else tuple(r.strip() for r in label[1].split(";"))
        found.append(Snippet(i + 1, "\n".join(text[i + 1 : end]) + "\n", runs))
    return found


def _cases() -> list[tuple[Snippet, str]]:
    return [(s, run) for s in snippets() for run in s.runs]


def test_the_readme_has_snippets_and_every_setup_is_used() -> None:
    runs = [run for _, run in _cases()]
    assert len(snippets()) >= 8
    used = {m[1] for run in runs if (m := re.search(r"setup=(\S+)", run))}
    assert used == set(SETUPS), f"unused setups {set(SETUPS) - used}, unknown {used - set(SETUPS)}"


@pytest.mark.parametrize(
    ("snippet", "run"), _cases(), ids=[f"line{s.line}-{r.split()[0]}" for s, r in _cases()]
)
def test_the_readme_snippet_runs_as_written(snippet: Snippet, run: str, tmp_path: Path) -> None:
    if run.startswith("skip:"):
        pytest.skip(run)
    setup = re.search(r"setup=(\S+)", run)
    script = tmp_path / "snippet.py"
    script.write_text((SETUPS[setup[1]] if setup else "") + snippet.code)
    launcher = re.search(r"torchrun=(\d+)", run)
    if launcher:
        # A gloo group left for interpreter exit to tear down sometimes aborts the process
        # ("terminate called without an active exception"): end it, as a training script does.
        script.write_text(script.read_text() + TEARDOWN)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={launcher[1]}", str(script)]
    else:
        command = [sys.executable, str(script)]
    # A fresh interpreter, as a user's: not this process's JAX devices or Keras backend.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KERAS_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (
        f"README.md line {snippet.line} ({run}) exited {done.returncode}:\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
