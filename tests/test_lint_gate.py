"""The lint gate CI runs (`ruff check .` and `ruff format --check .` in `.ci/run`, before
`lint-imports`) bites: the real ruff, run with the repository's own `[tool.ruff]` config on a copy
of a real module, passes the copy untouched and fails it with one planted finding or one badly
formatted line. The rules planted are ones ruff's defaults leave off (bugbear, pyupgrade, import
order, 120 columns), so a pass here also shows the config is the one read.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff", reason="needs ruff (the test extra)")

ROOT = Path(__file__).resolve().parent.parent
MODULE = "ucm/methods.py"  # a real module of the tree, lint-clean and formatted

# (what is planted, the lines appended to the module, the rule ruff must report, the planted
# line's offset from the first appended line)
PLANTED = [
    ("zip without strict", "def _pairs(a, b):\n    return list(zip(a, b))", "B905", 1),
    ("a line of 121 columns", "_LONG = " + repr("x" * 111), "E501", 0),
    ("an unused import", "def _f():\n    import json", "F401", 1),
    ("an undefined name", "def _f():\n    return _no_such_name", "F821", 1),
    (
        "a closure over a loop variable",
        "def _fs():\n    out = []\n    for i in range(3):\n        out.append(lambda: i)\n    return out",
        "B023",
        3,
    ),
    ("percent formatting", "def _f(x):\n    return '%s!' % x", "UP031", 1),
    ("an unused loop variable", "def _f(d):\n    for k, v in d.items():\n        print(v)", "B007", 1),
]


def _ruff(cwd: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _copy(dest: Path) -> Path:
    """pyproject.toml (ruff's config) and the one module, at their places in the tree."""
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    (dest / MODULE).parent.mkdir(parents=True)
    shutil.copy(ROOT / MODULE, dest / MODULE)
    return dest


def test_ci_and_the_readme_run_the_gate_before_the_tests() -> None:
    """`.ci/run` (set -e: a failing command ends it) and the README's test command, which says
    it is what CI does, run ruff check, ruff format --check, lint-imports, pytest in that order."""
    steps = ["ruff check .", "ruff format --check .", "lint-imports", "python -m pytest -q"]
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    ci = [line.split("#")[0].strip() for line in script.splitlines()]
    at = [next(i for i, c in enumerate(ci) if c == s or c.startswith(s + " ")) for s in steps]
    assert at == sorted(at), ci
    readme = (ROOT / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    parts = [p.strip() for p in command.split("&&")]
    assert parts[-len(steps) :] == steps, parts


def test_an_untouched_copy_passes(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    code, out = _ruff(tree, "check", ".")
    assert code == 0, out
    code, out = _ruff(tree, "format", "--check", ".")
    assert code == 0, out


@pytest.mark.parametrize(("what", "lines", "rule", "offset"), PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_finding_fails_ruff_check(tmp_path: Path, what: str, lines: str, rule: str, offset: int) -> None:
    tree = _copy(tmp_path)
    target = tree / MODULE
    source = target.read_text().rstrip("\n")
    target.write_text(source + "\n\n\n" + lines + "\n")
    line = len(source.splitlines()) + 3 + offset
    code, out = _ruff(tree, "check", "--output-format", "concise", ".")
    assert code == 1, out
    found = re.findall(r"^(\S+?):(\d+):\d+: (\w+) ", out, re.MULTILINE)
    assert found == [(MODULE, str(line), rule)], out


@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        ("missing spaces around =", 'ENTRY_POINT_GROUP = "', 'ENTRY_POINT_GROUP="'),
        ("spaces inside brackets", '_RESERVED = frozenset({"dense"})', "_RESERVED = frozenset( {'dense'} )"),
    ],
)
def test_a_badly_formatted_copy_fails_ruff_format_check(tmp_path: Path, what: str, old: str, new: str) -> None:
    tree = _copy(tmp_path)
    target = tree / MODULE
    source = target.read_text()
    assert source.count(old) == 1, f"{MODULE} changed: plant {what!r} elsewhere"
    target.write_text(source.replace(old, new))
    code, out = _ruff(tree, "check", ".")
    assert code == 0, out  # lint alone does not see it: the format check is its own gate
    code, out = _ruff(tree, "format", "--check", ".")
    assert code == 1, out
    assert "1 file would be reformatted" in out and MODULE in out, out
