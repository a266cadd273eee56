"""Tracebacks from a worker that dies without raising, or that stops making progress.

vLLM's worker processes log a Python exception before they stop, but a fatal signal (a crash in
native code, an abort) ends the process silently: the engine only sees a worker that stopped
answering (`RuntimeError: cancelled` from its shared-memory broadcast, after vLLM's
"Worker proc ... died unexpectedly (exit code: -N)"). Python's `faulthandler` prints every
thread's Python stack on SIGSEGV, SIGFPE, SIGABRT, SIGBUS and SIGILL; ucm turns it on in each
worker process it runs in, unless the process already did (SIGKILL, e.g. the kernel's OOM
killer, leaves no trace by design: the exit code is -9 and the system log names it).

A worker that hangs prints nothing either: the engine gives up on it after vLLM's
`VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS` ("RPC call to execute_model timed out"). `StepWatchdog`
prints the stack of every thread of a worker whose step has run for ``UCM_HANG_DUMP_S``
seconds (`ucm.timeouts`), once per step, from a thread of its own. Should that thread be unable
to run (a native call that never releases the GIL), faulthandler's own timer, which needs no
GIL, dumps the stacks once the watchdog has been silent for a while longer.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import tempfile
import threading
import time
from typing import TextIO

from ucm.timeouts import HANG_DUMP_ENV, hang_dump_s

logger = logging.getLogger(__name__)


def enable_fault_tracebacks() -> bool:
    """Turn on `faulthandler` for this process (all threads, to stderr); True if this call did."""
    if faulthandler.is_enabled():
        return False
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError) as exc:  # stderr closed or not a real file
        logger.debug("ucm: faulthandler unavailable (%s)", exc)
        return False
    return True


class StepWatchdog:
    """Prints every thread's Python stack when a step runs longer than `limit_s` seconds.

    The step's owner calls `step_started(label)` and `step_ended()` (two attribute writes: cheap
    enough for every step); a daemon thread checks every `poll_s`. While it runs, it also keeps
    faulthandler's timer (`dump_traceback_later`, one per process) armed `limit_s + grace_s`
    ahead: the timer fires only when this thread could not run for that long, i.e. something
    holds the GIL. The timer is cancelled before `os.fork` (a child inherits its lock: cancelling
    or re-arming it there, as interpreter exit does, would never return) and re-armed by the next
    poll. Being one per process, the timer is shared with anything else that uses it (pytest's
    `faulthandler_timeout`): set ``UCM_HANG_DUMP_S=0`` in such a process.
    """

    def __init__(
        self, limit_s: float, file: TextIO | None = None, poll_s: float | None = None, grace_s: float | None = None
    ) -> None:
        if not limit_s > 0:
            raise ValueError(f"limit_s must be > 0, got {limit_s}")
        self.limit_s = float(limit_s)
        self.poll_s = poll_s if poll_s is not None else min(max(self.limit_s / 8, 0.05), 2.0)
        self.grace_s = grace_s if grace_s is not None else max(5.0, self.limit_s / 4)
        self._file = file  # None: sys.stderr as it is when used (test runners swap it)
        self._step: tuple[float, str, int] | None = None  # (started, label, sequence number)
        self._seq = 0
        self._dumped_seq = -1
        self.dumps = 0
        self._pid = os.getpid()
        self._armed = False
        self._arm_lock = threading.Lock()
        self._stop = threading.Event()
        os.register_at_fork(
            before=self._before_fork, after_in_parent=self._after_fork_parent, after_in_child=self._after_fork_child
        )
        self._thread = threading.Thread(target=self._run, name="ucm-hang-watchdog", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the step's owner
    def step_started(self, label: str) -> None:
        self._seq += 1
        self._step = (time.monotonic(), label, self._seq)

    def step_ended(self) -> None:
        self._step = None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._disarm()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._arm()
            step = self._step
            if step is None or step[2] == self._dumped_seq:
                continue
            started, label, seq = step
            elapsed = time.monotonic() - started
            if elapsed >= self.limit_s:
                self._dumped_seq = seq
                self._dump(label, elapsed)
        self._disarm()

    def _dump(self, label: str, elapsed: float) -> None:
        """The stacks of every thread, each line prefixed with this process's id (ranks dump at once)."""
        try:
            with tempfile.TemporaryFile("w+") as tmp:
                faulthandler.dump_traceback(file=tmp, all_threads=True)
                tmp.seek(0)
                stacks = tmp.read()
        except (OSError, ValueError) as exc:
            stacks = f"(the stacks could not be taken: {exc})\n"
        tag = f"[ucm hang pid {os.getpid()}] "
        head = (
            f"ucm: {label} has run for {elapsed:.1f} s ({HANG_DUMP_ENV}={self.limit_s:g}); the Python stack of "
            "every thread of this process follows (most recent call first)"
        )
        text = "\n" + "".join(tag + line + "\n" for line in [head, *stacks.splitlines()])
        out = self._out()
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):  # stderr closed
            return
        self.dumps += 1

    def _out(self) -> TextIO:
        return self._file if self._file is not None else sys.stderr

    # ------------------------------------------------- faulthandler's timer (no GIL)
    def _arm(self) -> None:
        with self._arm_lock:
            if self._stop.is_set() or os.getpid() != self._pid:
                return
            try:
                faulthandler.dump_traceback_later(
                    self.limit_s + self.grace_s, repeat=False, file=self._out(), exit=False
                )
            except (OSError, ValueError, RuntimeError) as exc:  # stderr without a file descriptor
                logger.debug("ucm: faulthandler's timer unavailable (%s)", exc)
                return
            self._armed = True

    def _disarm(self) -> None:
        with self._arm_lock:
            if self._armed and os.getpid() == self._pid:
                faulthandler.cancel_dump_traceback_later()
                self._armed = False

    def _before_fork(self) -> None:
        self._arm_lock.acquire()  # no re-arm between here and the fork
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed = False

    def _after_fork_parent(self) -> None:
        self._arm_lock.release()

    def _after_fork_child(self) -> None:
        self._arm_lock.release()  # the rest stays as it is: this watchdog's thread is not in the child, whose
        # `step_watchdog()` makes its own (the pid differs), and `_arm`/`_disarm` act in its own process only


_WATCHDOG: StepWatchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def step_watchdog() -> StepWatchdog | None:
    """This process's `StepWatchdog` (made on first use, with ``UCM_HANG_DUMP_S``), or None when
    that is 0. vLLM's worker connectors share it: one process runs one step at a time."""
    global _WATCHDOG
    limit = hang_dump_s()
    if limit is None:
        return None
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None or _WATCHDOG._pid != os.getpid() or _WATCHDOG._stop.is_set():
            _WATCHDOG = StepWatchdog(limit)
        return _WATCHDOG
