"""Tracebacks from a worker that dies without raising.

vLLM's worker processes log a Python exception before they stop, but a fatal signal (a crash in
native code, an abort) ends the process silently: the engine only sees a worker that stopped
answering (`RuntimeError: cancelled` from its shared-memory broadcast). Python's `faulthandler`
prints every thread's Python stack on SIGSEGV, SIGFPE, SIGABRT, SIGBUS and SIGILL; ucm turns it
on in each worker process it runs in, unless the process already did (SIGKILL, e.g. the
kernel's OOM killer, leaves no trace by design: the system log names it).
"""

from __future__ import annotations

import faulthandler
import logging
import sys

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
