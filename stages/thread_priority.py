"""Priority classes on a shared CPU: the operating system's share of a core follows the step's class.

On a GPU each stage has its own accelerator, and preemption inside the stage is all an interactive task
needs. On a CPU every stage's replicas share the same cores, so a batch-class step in one stage slows an
interactive step in another. There, a stage's engine thread runs a step that holds only batch-class
tasks at the lowest OS priority (nice 19) and any other step at the thread's own priority: the kernel
then gives interactive work most of a contended core, and batch work every cycle nobody else wants
(work-conserving, like the queue policy). Linux only (a thread's nice is its own there). Going back up
needs the right to lower a nice value (root, CAP_SYS_NICE or RLIMIT_NICE); without it this stays off.
With one torch thread a replica's step runs entirely on its engine thread; with more, torch's worker
threads keep their priority.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

LOWEST = 19


def can_switch() -> bool:
    """Whether a thread here may drop to the lowest priority and come back (tried on a throwaway thread)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return False
    result: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        base = os.getpriority(os.PRIO_PROCESS, tid)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, LOWEST)
            os.setpriority(os.PRIO_PROCESS, tid, base)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="priority-probe")
    thread.start()
    thread.join()
    return bool(result and result[0])


class ThreadPriority:
    """The calling thread's OS priority, low for batch-only steps (create it on the thread it governs)."""

    def __init__(self) -> None:
        self.tid = threading.get_native_id()
        self.base = os.getpriority(os.PRIO_PROCESS, self.tid)
        self.low = False

    def set_low(self, low: bool) -> None:
        if low == self.low:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, self.tid, LOWEST if low else self.base)
            self.low = low
        except OSError as err:  # the right was taken away meanwhile: stay as we are
            log.warning("could not change the engine thread's priority: %s", err)
