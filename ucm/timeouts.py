"""How long ucm waits before it calls a wait a hang (environment settings, read when used).

``UCM_WAIT_TIMEOUT_S`` (default 180): the longest a step waits for one of ucm's own background
    tasks (a sparse method's asynchronous retrieval, a KV store load or dump); past it the wait
    raises `WaitTimeout`, whose message names what it waited for (request, layer, blocks).
``UCM_HANG_DUMP_S`` (default 120): a vLLM worker step that runs longer than this prints the
    Python stack of every thread of its process to stderr
    (`ucm.integration.vllm.fault_tracebacks.StepWatchdog`).

0 turns either off. Both defaults are below vLLM's own limit on a step
(``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS``, 300 s), so a worker says where it is stuck before the
engine gives up on it; the dump comes first, so the stacks show the stuck task still running.
"""

from __future__ import annotations

import math
import os

WAIT_TIMEOUT_ENV = "UCM_WAIT_TIMEOUT_S"
HANG_DUMP_ENV = "UCM_HANG_DUMP_S"
DEFAULT_WAIT_TIMEOUT_S = 180.0
DEFAULT_HANG_DUMP_S = 120.0


class WaitTimeout(TimeoutError):
    """A wait on one of ucm's background tasks ran past ``UCM_WAIT_TIMEOUT_S``."""


def seconds_from_env(name: str, default: float) -> float | None:
    """Seconds set by environment variable `name` (`default` when unset or empty); None for 0 (off).
    Anything else than a finite number >= 0 is a ValueError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        value = default
    else:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number of seconds (0 turns it off)") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={raw!r} must be a finite number of seconds >= 0 (0 turns it off)")
    return value or None


def wait_timeout_s() -> float | None:
    """``UCM_WAIT_TIMEOUT_S``: the bound on a wait for a background task (None: unbounded)."""
    return seconds_from_env(WAIT_TIMEOUT_ENV, DEFAULT_WAIT_TIMEOUT_S)


def hang_dump_s() -> float | None:
    """``UCM_HANG_DUMP_S``: how long a worker step runs before its stacks are dumped (None: never)."""
    return seconds_from_env(HANG_DUMP_ENV, DEFAULT_HANG_DUMP_S)
