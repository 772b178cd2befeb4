"""The house: the library apart from its tooling, imports running one way, one harness."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
TOOLING = ("sp_common.testing", "sp_common.compare")
# Not the library's to import: a framework, numpy, or the tools' optional dependencies.
HEAVY = ("torch", "jax", "numpy", "ml_dtypes", "tqdm", "tabulate", "matplotlib")

# Blocks imports of the given top-level modules, as if they were not installed.
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=ROOT
    )


def test_import_sp_common_imports_no_tooling_framework_or_numpy() -> None:
    code = (
        "import sys, sp_common\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TOOLING!r}) "
        f"or m.split('.')[0] in {HEAVY!r}))"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sp_compare_help_works_without_the_compare_extra_and_a_run_says_what_to_install() -> None:
    blocked = ("numpy", "ml_dtypes", "tqdm", "tabulate", "matplotlib")
    prelude = BLOCKER.format(blocked=blocked)
    helped = run_python(prelude + "from sp_common.compare.cli import main\nmain(['--help'])")
    assert helped.returncode == 0, helped.stderr
    assert "usage: sp-compare" in helped.stdout
    ran = run_python(
        prelude + "import sys\nfrom sp_common.compare.cli import main\nsys.exit(main([]))"
    )
    assert ran.returncode == 2, ran.stderr
    assert "pip install 'sp-sharding[compare]'" in ran.stderr
    assert "Traceback" not in ran.stderr


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_sp_common_reaches_the_backends_only_through_backend_py() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in _imported_modules(p) if m.split(".")[0] in ("backend_torch", "backend_jax")
        )
        for p in (ROOT / "sp_common").rglob("*.py")
        if p.name != "backend.py" or p.parent.name != "sp_common"
    }
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_library_modules_never_import_the_tooling() -> None:
    library = [
        p
        for p in (ROOT / "sp_common").rglob("*.py")
        if not {"testing", "compare"} & set(p.relative_to(ROOT / "sp_common").parts)
        and p.name != "__main__.py"
    ]
    source = {str(p.relative_to(ROOT)): p.read_text() for p in library}
    offenders = [
        p
        for p, text in source.items()
        if re.search(r"\b(testing|compare)\b.*import|import .*\.(testing|compare)\b", text)
    ]
    assert offenders == []


# One definition of each piece of harness in the whole tree (tests, benchmarks, examples, tools).
ONE_OF_EACH = {
    "a rank pool": r"^class (\w*RankPool|TorchRanks)\b",
    "a timing loop": r"^def interleaved\(",
    "a seeded-data generator": r"^def (make_data|make_input)\(",
    "a table writer": r"tabulate\(|\.ljust\(",
    "a bitwise comparator": r"^def (same_bits|same_bytes|_same_bits|bits)\(",
    "a free-port finder": r"^def _?free_port\(",
    "a numpy -> torch converter": r"^def to_torch\(",
}


@pytest.mark.parametrize("what", sorted(ONE_OF_EACH))
def test_the_tree_has_one_of_each_piece_of_harness(what: str) -> None:
    pattern = re.compile(ONE_OF_EACH[what], re.MULTILINE)
    found = [
        str(p.relative_to(ROOT))
        for folder in (
            "sp_common",
            "backend_torch",
            "backend_jax",
            "tests",
            "benchmarks",
            "examples",
        )
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p.name != "test_layout.py" and pattern.search(p.read_text())
    ]
    assert len(found) == 1, f"{what}: defined in {found}"
