"""The layer contracts (`[tool.importlinter]` in pyproject.toml, docs/architecture.md "Layers")
hold on the real tree, and each one bites: a copy of the packages with one import planted fails
`lint-imports`, run with the repository's own config, on exactly the contracts that import breaks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="needs import-linter (the test extra)")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LINTER = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c["name"] for c in LINTER["contracts"]}  # id -> the name lint-imports prints
# lint-imports puts its working directory first on sys.path, so a copy there shadows the installed ucm
RUN = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

# (what is planted, the file, the lines appended to it, the contract ids it must break, what the
# report must show; {line}: the line number of the planted import)
PLANTED = [
    (
        "an algorithm imports vLLM",
        "ucm/sparse/selection.py",
        "import vllm",
        {"core-engine-free"},
        "ucm.sparse.selection -> vllm (l.{line})",
    ),
    (
        "an algorithm imports a backend",
        "ucm/sparse/selection.py",
        "from ucm_backends.cpu import ops",
        {"core-engine-free", "backends-through-registry"},
        "ucm.sparse.selection -> ucm_backends.cpu.ops (l.{line})",
    ),
    (
        "the plugin imports the demo face",
        "ucm/integration/vllm/offline.py",
        "from ucm.models import fetch_model",
        {"layers"},
        "ucm.integration.vllm.offline -> ucm.models (l.{line})",
    ),
    (
        "the plugin imports a kernel toolkit",
        "ucm/integration/vllm/cpu_attn.py",
        "import triton",
        {"backends-through-registry"},
        "ucm.integration.vllm.cpu_attn -> triton (l.{line})",
    ),
    (
        "the registry imports the config layer (a methods <-> config cycle)",
        "ucm/methods.py",
        "def _f():\n    from ucm.config.sparse import WindowedMethodConfig",
        {"layers", "registry-light", "acyclic"},
        "ucm.methods -> ucm.config.sparse (l.{line})",
    ),
    (
        "the store imports the selection engine",
        "ucm/store/posix.py",
        "import ucm.sparse.selection",
        {"layers"},
        "ucm.store.posix -> ucm.sparse.selection (l.{line})",
    ),
    (
        "config parsing imports torch",
        "ucm/config/loader.py",
        "import torch",
        {"config-light"},
        "ucm.config.loader -> torch (l.{line})",
    ),
    (
        "the core demo imports the vLLM demo (a cycle inside one layer)",
        "ucm/demo.py",
        "def _f():\n    from ucm.demo_vllm import run_vllm_demo",
        {"acyclic"},
        "No cycles are allowed in ucm.",
    ),
    (
        "a backend imports another",
        "ucm_backends/cuda/ops.py",
        "from ucm_backends.cpu import probe",
        {"backends-independent"},
        "ucm_backends.cuda.ops -> ucm_backends.cpu.probe (l.{line})",
    ),
    (
        "a backend imports an algorithm",
        "ucm_backends/cpu/ops.py",
        "import ucm.sparse.selection",
        {"backends-contract-only"},
        "ucm_backends.cpu.ops -> ucm.sparse.selection (l.{line})",
    ),
    (
        "a new module in no layer",
        "ucm/scratch.py",
        "import json",
        {"layers"},
        "The following modules are not listed as layers:\n\n- ucm.scratch\n",
    ),
]


def _lint(cwd: Path) -> tuple[int, str, set[str]]:
    """(exit code, output, names of the broken contracts) of lint-imports run in `cwd`."""
    path = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "400"}  # COLUMNS: one contract a line, unwrapped
    proc = subprocess.run(
        [sys.executable, "-c", RUN, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    return proc.returncode, out, set(re.findall(r"^(.+?) BROKEN(?: \(.*\))?$", out, re.MULTILINE))


def _copy(dest: Path) -> Path:
    """The two root packages as an installed tree has them (backends/ is ucm_backends)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(ROOT / "ucm", dest / "ucm", ignore=ignore)
    shutil.copytree(ROOT / "backends", dest / "ucm_backends", ignore=ignore)
    return dest


def test_every_contract_has_a_planted_violation() -> None:
    assert set().union(*(p[3] for p in PLANTED)) == set(CONTRACTS)


def test_the_real_tree_keeps_every_contract() -> None:
    code, out, broken = _lint(ROOT)
    assert code == 0 and not broken, out
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out, out


def test_an_untouched_copy_keeps_every_contract(tmp_path: Path) -> None:
    """The copy the planted cases edit is what lint-imports reads, and it starts clean."""
    code, out, broken = _lint(_copy(tmp_path))
    assert code == 0 and not broken, out


@pytest.mark.parametrize(("what", "path", "lines", "ids", "shows"), PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_import_fails_lint_imports(
    tmp_path: Path, what: str, path: str, lines: str, ids: set[str], shows: str
) -> None:
    tree = _copy(tmp_path)
    target = tree / path
    source = target.read_text().rstrip("\n") if target.exists() else ""
    target.write_text(source + "\n\n" + lines + "\n")
    line = len(source.splitlines()) + 2 + lines.count("\n")  # the import is the last planted line
    code, out, broken = _lint(tree)
    assert code == 1, out
    assert broken == {CONTRACTS[i] for i in ids}, out
    assert shows.format(line=line) in out, out
