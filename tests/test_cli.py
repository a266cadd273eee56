"""The `ucm` command line, run as users run it: a subprocess, checked by output and exit code."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ucm import cli
from ucm.config.loader import SPARSE_KEY, builtin_config_dir, load_model_config

SHIPPED_FILES = sorted(p.name for p in builtin_config_dir().glob("*.json"))


def ucm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ucm.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_help_lists_the_subcommands() -> None:
    r = ucm("--help")
    assert r.returncode == 0
    assert "configs" in r.stdout and "backends" in r.stdout


def test_no_subcommand_is_a_usage_error() -> None:
    r = ucm()
    assert r.returncode == 2 and "COMMAND" in r.stderr
    r = ucm("configs")
    assert r.returncode == 2 and "ACTION" in r.stderr


def test_importing_the_cli_is_cheap() -> None:
    """`ucm --help` must not pay for torch or pydantic; handlers import them."""
    code = "import sys, ucm.cli; heavy = {'torch', 'pydantic', 'ucm.ops'} & set(sys.modules); print(sorted(heavy))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_configs_list() -> None:
    r = ucm("configs", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["file", "model", "layers", "MLA", "hash"]
    assert set(lines[1]) <= {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:]}
    assert sorted(rows) == SHIPPED_FILES
    assert rows["qwen3_4b.json"].split()[1:6] == ["Qwen/Qwen3-4B", "36", "no", "128", "33/36"]
    assert rows["deepseek_r1.json"].split()[1:7] == ["deepseek-ai/DeepSeek-R1", "61", "yes", "576", "(512+64)", "58/61"]
    assert "gpu 2048/2 npu 2048/1" in rows["qwq_32b.json"]  # one GPU row stays dense (docs/vllm.md)


@pytest.mark.parametrize("ref", ["qwen3-4b", "Qwen/Qwen3-4B", "qwen3_4b.json"])
def test_configs_show_by_name(ref: str) -> None:
    r = ucm("configs", "show", ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == load_model_config("Qwen/Qwen3-4B").config.model_dump()


def test_configs_show_by_path(tmp_path: Path) -> None:
    data = json.loads((builtin_config_dir() / "deepseek_v2_lite.json").read_text())
    data["model_name"] = "mine/DeepSeek-V2-Lite"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    r = ucm("configs", "show", str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == data


def test_configs_show_unknown_model() -> None:
    r = ucm("configs", "show", "meta-llama/Llama-3-8B")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: meta-llama/Llama-3-8B") and "qwen3_4b" in r.stderr


def test_configs_show_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"model_name": ')
    r = ucm("configs", "show", str(path))
    assert r.returncode == 1 and "broken.json" in r.stderr and "not valid JSON" in r.stderr


def test_configs_check_shipped_files() -> None:
    paths = [str(builtin_config_dir() / name) for name in SHIPPED_FILES]
    r = ucm("configs", "check", *paths)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok  ") == len(paths) and "Qwen/QwQ-32B" in r.stdout


def test_configs_check_sparse_files(tmp_path: Path) -> None:
    esa = tmp_path / "esa.json"
    esa.write_text(json.dumps({SPARSE_KEY: {"ESA": {"sparse_ratio": 0.2}}}))
    bare = tmp_path / "kvstar.json"
    bare.write_text(json.dumps({"KVStarMultiStep": {}}))
    r = ucm("configs", "check", str(esa), str(bare))
    assert r.returncode == 0, r.stderr
    assert "ESA sparse config" in r.stdout and "KVStarMultiStep sparse config" in r.stdout


def test_configs_check_stops_at_the_first_bad_file(tmp_path: Path) -> None:
    good = builtin_config_dir() / "qwen3_4b.json"
    data = json.loads(good.read_text())
    data["hash_bits"] = 100
    bad = tmp_path / "bad_bits.json"
    bad.write_text(json.dumps(data))
    bad_sparse = tmp_path / "bad_sparse.json"
    bad_sparse.write_text(json.dumps({SPARSE_KEY: {"KVStarMultiStep": {"blk_repre_inner_token_merge": 0}}}))
    r = ucm("configs", "check", str(good), str(bad), str(bad_sparse))
    assert r.returncode == 1
    assert "qwen3_4b.json" in r.stdout and "bad_sparse" not in r.stdout + r.stderr
    assert "bad_bits.json" in r.stderr and "'hash_bits'" in r.stderr and "multiple of 8" in r.stderr
    r = ucm("configs", "check", str(bad_sparse))
    assert r.returncode == 1 and "blk_repre_inner_token_merge" in r.stderr and "bad_sparse.json" in r.stderr


def test_configs_check_does_not_fall_back_to_a_shipped_file(tmp_path: Path) -> None:
    r = ucm("configs", "check", "qwen3_4b.json", cwd=tmp_path)
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_backends() -> None:
    r = ucm("backends")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "available", "reason"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert {"cuda", "ascend", "cpu", "reference"} <= set(rows)
    assert rows["reference"][1] == "yes"
    for name, row in rows.items():
        assert row[1] in ("yes", "no")
        assert (row[1] == "no") == (row[2:] != ["-"]), name  # a reason exactly when unavailable


def test_version() -> None:
    r = ucm("--version")
    assert r.returncode == 0 and r.stdout.startswith("ucm ")


def test_other_modules_can_register_subcommands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subcommand from another module, by function or by lazy "module:function" path."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", list(cli.SUBCOMMANDS))

    def add_hello(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("hello")
        p.add_argument("who")
        p.set_defaults(handler=lambda args: print(f"hello {args.who}") or 3)

    plugin = types.ModuleType("ucm_test_plugin")
    plugin.add_parser = add_hello  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ucm_test_plugin", plugin)
    cli.register_subcommand("hello", add_hello)
    assert cli.main(["hello", "world"]) == 3
    assert capsys.readouterr().out == "hello world\n"
    cli.register_subcommand("hello", "ucm_test_plugin:add_parser")  # replaces, does not duplicate
    assert [name for name, _ in cli.SUBCOMMANDS].count("hello") == 1
    assert cli.main(["hello", "lazy"]) == 3
    assert capsys.readouterr().out == "hello lazy\n"


@pytest.mark.parametrize(
    "weights,why",
    [
        ("shape", r"holds \(2, 64, 128\), expected a tensor of shape \(30, 64, 128\)"),
        ("garbage", "cannot load hash weights"),
        ("nan", "non-finite values"),
        ("pickle", "cannot load hash weights"),
    ],
)
def test_configs_check_loads_trained_weights(tmp_path: Path, weights: str, why: str) -> None:
    """A trained hash weight file that cannot serve the model fails the check, naming the key
    (a pickle payload is refused by weights_only loading: no code runs)."""
    import pickle

    import torch

    data = json.loads((builtin_config_dir() / "smollm2_135m.json").read_text())
    data["hash_weight"] = "w.pt"
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(data))
    w = tmp_path / "w.pt"
    if weights == "shape":
        torch.save({"weight": torch.randn(2, 64, 128)}, w)
    elif weights == "garbage":
        w.write_bytes(b"not a torch file")
    elif weights == "nan":
        t = torch.randn(30, 64, 128)
        t[3, 1, 2] = float("nan")
        torch.save({"weight": t}, w)
    else:  # a pickle naming a global: weights_only loading refuses it
        w.write_bytes(pickle.dumps(types.SimpleNamespace))
    r = ucm("configs", "check", str(cfg))
    assert r.returncode == 1 and "hash_weight" in r.stderr and __import__("re").search(why, r.stderr), r.stderr
    torch.save({"weight": torch.randn(30, 64, 128)}, w)
    assert ucm("configs", "check", str(cfg)).returncode == 0
