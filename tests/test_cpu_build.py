"""Building the CPU kernels: keyed build folders, the build lock (stale, orphaned and live holders),
torch's leftover baton, `ucm build`, and the engine building at start rather than in a forward.

Real processes and files throughout. Builds into a temporary cache start from a copy of this
machine's build (made once by `ucm build` in the default cache, ~30 s the first time), so only the
`slow` test compiles from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ucm_backends.cpu import ops as cpu_module

import ucm

pytestmark = pytest.mark.skipif(cpu_module.find_compiler() is None, reason="no C++ compiler: nothing to build")

HOLD_LOCK = """
import os, sys, time
from pathlib import Path
from ucm_backends.cpu.ops import build_lock
with build_lock(Path(sys.argv[1]), timeout=5):
    if len(sys.argv) > 2:  # leave a fork that inherits the locked descriptor, then let the test kill us
        child = os.fork()
        if child == 0:
            time.sleep(600)
            os._exit(0)
        print("child", child, flush=True)
    print("locked", flush=True)
    time.sleep(600)
"""


def _env(cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("UCM_CPU_NATIVE", cpu_module.LOCK_TIMEOUT_ENV_VAR)}
    if cache is not None:
        env[cpu_module.CACHE_ENV_VAR] = str(cache)
    env.update(extra)
    return env


def _ucm_build(env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ucm.cli", "build"], capture_output=True, text=True, env=env, timeout=timeout
    )


def _report(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def _hold_lock(lock: Path, env: dict[str, str], fork: bool = False) -> tuple[subprocess.Popen[str], int | None]:
    """A process that takes the build lock and sleeps (with a fork sharing the lock when asked)."""
    args = [sys.executable, "-c", HOLD_LOCK, str(lock)] + (["fork"] if fork else [])
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    child = None
    for line in holder.stdout:
        if line.startswith("child"):
            child = int(line.split()[1])
        if line.strip() == "locked":
            return holder, child
    raise AssertionError(f"the lock holder exited ({holder.wait()}) without taking the lock")


def _kill(holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)


@pytest.fixture(scope="module")
def built_folder() -> Path:
    """This environment's build in the default cache (`ucm build` compiles it the first time)."""
    r = _ucm_build(_env())
    assert r.returncode == 0, r.stdout + r.stderr
    folder = Path(_report(r.stdout)["folder"])
    assert (folder / "built.json").is_file()
    return folder


@pytest.fixture()
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(cpu_module.CACHE_ENV_VAR, str(cache))
    return cache


def _copy_build(built_folder: Path, cache: Path) -> Path:
    """The machine's build, copied under `cache` as if interrupted before it was recorded."""
    folder = cpu_module.build_folder()
    assert folder.parent == cache / "torch_extensions" and folder.name == built_folder.name
    shutil.copytree(built_folder, folder)
    (folder / "built.json").unlink()
    (folder / "build.lock").unlink(missing_ok=True)
    return folder


# ------------------------------------------------------------------------------- the folder key
def test_build_key_changes_with_torch_version_flags_and_compiler() -> None:
    inputs = cpu_module.build_key_inputs(cpu_module.find_compiler())
    key = cpu_module.build_key(inputs)
    assert key == cpu_module.build_key(dict(inputs)), "the key is a function of its inputs"
    assert key.startswith(f"{ucm.__version__}-torch{inputs['torch']}-")
    changed = [
        {**inputs, "torch": "2.99.0+cpu"},
        {**inputs, "torch_git": "0" * 40},  # same version string, another torch build
        {**inputs, "cxx11_abi": not inputs["cxx11_abi"]},
        {**inputs, "cpu_flags": sorted(set(inputs["cpu_flags"]) ^ {"avx2"})},
        {**inputs, "compiler": "/usr/bin/clang++: clang version 18"},
        {**inputs, "source_sha256": "0" * 64},
        {**inputs, "ucm": "9.9.9"},
    ]
    keys = [cpu_module.build_key(c) for c in changed]
    assert len({key, *keys}) == len(keys) + 1
    assert keys[0].startswith(f"{ucm.__version__}-torch2.99.0+cpu-")
    assert all("/" not in k and " " not in k for k in keys)


def test_build_folder_is_keyed_under_the_root(tmp_cache: Path) -> None:
    import torch

    folder = cpu_module.build_folder()
    assert folder.parent == cpu_module.build_root() == tmp_cache / "torch_extensions"
    assert folder.name.startswith(f"{ucm.__version__}-torch{torch.__version__}-")


# ------------------------------------------------------------------------------- the build lock
def test_stale_lock_of_a_killed_builder_does_not_block(built_folder: Path, tmp_cache: Path) -> None:
    """A builder SIGKILLed while holding the lock, having left torch's baton behind too: the next
    build neither waits on our lock (the kernel dropped it) nor on torch's baton (removed)."""
    folder = _copy_build(built_folder, tmp_cache)
    ext_dir = folder / json.loads((built_folder / "built.json").read_text())["extension"]
    baton = ext_dir / "lock"
    baton.touch()  # torch's FileBaton of a build killed midway: torch alone would wait on it forever
    env = _env(tmp_cache, **{cpu_module.LOCK_TIMEOUT_ENV_VAR: "60"})
    holder, _ = _hold_lock(folder / "build.lock", env)
    assert json.loads((folder / "build.lock").read_text())["pid"] == holder.pid
    _kill(holder)

    start = time.monotonic()
    r = _ucm_build(env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - start < 60
    assert _report(r.stdout)["folder"] == str(folder)
    assert f"removing {baton}" in r.stderr and "waiting for" not in r.stderr
    assert not baton.exists() and (folder / "built.json").is_file()
    assert (folder / "build.lock").read_text() == "", "a clean release leaves no holder on record"

    r = _ucm_build(env, timeout=120)  # recorded: the next process loads without locking or building
    assert r.returncode == 0 and _report(r.stdout)["status"] == "already built", r.stdout + r.stderr
    assert "building" not in r.stderr


def test_lock_kept_by_a_fork_of_a_dead_holder_is_broken(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The holder died but a fork of it still has the locked descriptor: the lock is still held,
    yet its recorded holder is dead on this host, so it is broken rather than waited for."""
    lock = tmp_path / "build.lock"
    holder, child = _hold_lock(lock, _env(), fork=True)
    assert child is not None
    try:
        _kill(holder)
        os.kill(child, 0)  # the fork lives on, holding the flock
        start = time.monotonic()
        with cpu_module.build_lock(lock, timeout=30) as info:
            assert info["pid"] == os.getpid()
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert time.monotonic() - start < 5
        err = capfd.readouterr().err
        assert f"breaking the build lock {lock}" in err and f"pid {holder.pid}" in err
    finally:
        os.kill(child, signal.SIGKILL)


def test_live_holder_makes_the_build_wait_then_give_up_naming_it(tmp_cache: Path) -> None:
    folder = cpu_module.build_folder()
    folder.mkdir(parents=True)
    env = _env(tmp_cache, **{cpu_module.LOCK_TIMEOUT_ENV_VAR: "1"})
    holder, _ = _hold_lock(folder / "build.lock", env)
    try:
        start = time.monotonic()
        r = _ucm_build(env, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert time.monotonic() - start < 60
        assert f"waiting for pid {holder.pid} on host" in r.stderr  # the progress line while it waits
        assert "gave up after 1 s waiting for the build lock" in r.stderr
        assert f"held by pid {holder.pid} on host" in r.stderr and "command:" in r.stderr
        assert _report(r.stdout)["status"] == "failed"

        # the engine's path: CpuOps() gives up the same way and runs the torch reference ops
        code = (
            "from ucm_backends.cpu.ops import CpuOps; import torch; ops = CpuOps(); "
            "print(ops.native_loaded); print(ops.native_error); "
            "print(ops.sign_bits_pack(torch.ones(2, 8)).tolist())"
        )
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        loaded, error, packed = p.stdout.splitlines()
        assert loaded == "False" and f"held by pid {holder.pid}" in error
        assert packed == "[[255], [255]]"
        assert "using the torch reference ops" in p.stderr
    finally:
        _kill(holder)
    assert not (folder / "built.json").exists()


# ------------------------------------------------------------------------------- ucm build
def test_ucm_build_reports_the_folder_and_status(built_folder: Path) -> None:
    r = _ucm_build(_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = _report(r.stdout)
    assert report["folder"] == str(built_folder) and report["status"] == "already built"
    assert Path(report["library"]).is_file() and Path(report["library"]).parent.parent == built_folder
    assert report["kernels"]


def test_ucm_build_fails_without_a_compiler() -> None:
    r = _ucm_build(_env(CXX="/nonexistent/c++"), timeout=120)
    assert r.returncode == 1
    assert "status:  failed" in r.stdout and "no C++ compiler" in r.stderr


@pytest.mark.slow
def test_ucm_build_compiles_from_scratch(tmp_cache: Path) -> None:
    env = _env(tmp_cache)
    r = _ucm_build(env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _report(r.stdout)["status"].startswith("built in ")
    assert "ucm: building CPU kernels (first use" in r.stderr and "... done in" in r.stderr
    assert Path(_report(r.stdout)["folder"]).parent == tmp_cache / "torch_extensions"
    r = _ucm_build(env, timeout=120)
    assert r.returncode == 0 and _report(r.stdout)["status"] == "already built"


# ------------------------------------------------------------------------------- engine start
def test_connector_start_builds_the_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's connector builds (or loads) the kernels when it starts, not in a forward."""
    pytest.importorskip("vllm")
    from ucm.config.loader import parse_sparse_config
    from ucm.integration.vllm.connector import _prepare_cpu_kernels

    calls = []
    real = cpu_module.native_build
    monkeypatch.setattr(cpu_module, "native_build", lambda: calls.append(1) or real())
    monkeypatch.delenv("UCM_BACKEND", raising=False)
    monkeypatch.delenv(cpu_module.NATIVE_ENV_VAR, raising=False)
    from ucm.ops.registry import select_backend_name

    if select_backend_name() != "cpu":
        pytest.skip("another backend runs here; the CPU kernels are built only when they will run")
    _prepare_cpu_kernels(parse_sparse_config({"ESA": {}}))
    assert calls, "the connector did not build the CPU kernels at start"
