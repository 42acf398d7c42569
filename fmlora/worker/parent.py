"""Ending a worker with the process that started it (``fmlora serve``'s embedded worker).

The server starts its worker in a session of its own (so a terminal's Ctrl-C reaches the server
only, which then stops the worker in order). If the server is SIGKILLed, nothing would stop that
child: it would keep the lease and publish for a server that is gone. Two mechanisms end it:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel signals the worker the moment its parent
  dies (the fast path; the worker's SIGTERM handler stops it as Ctrl-C would).
- everywhere: a thread that checks every ``interval_s`` whether the parent is still there, and
  stops the worker when it is not.

A stopped worker abandons its task at the next step, puts it back in the queue and releases the
lease; if it has not exited ``grace_s`` after the parent went, it exits hard (the lease then expires
and the next holder requeues the task).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["PARENT_PID_ENV", "parent_alive", "set_parent_death_signal", "watch_parent"]

log = logging.getLogger("fmlora.worker.parent")

PARENT_PID_ENV = "FMLORA_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_alive(pid: int, direct: bool) -> bool:
    """Whether process ``pid`` still runs; ``direct``: it is our parent (then reparenting tells at once,
    even while the dead parent is an unreaped zombie)."""
    if direct:
        return os.getppid() == pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _exit_hard(grace_s: float) -> None:
    os.write(2, f"the worker did not stop within {grace_s:.0f} s of its parent's death; exiting\n".encode())
    os._exit(1)


def watch_parent(
    pid: int, stop: Callable[[], None], *, interval_s: float = 0.5, grace_s: float = 30.0
) -> threading.Thread:
    """Call ``stop()`` once process ``pid`` is gone (and ``os._exit(1)`` if still running ``grace_s`` later)."""
    direct = os.getppid() == pid
    if direct:
        set_parent_death_signal(signal.SIGTERM)

    def run() -> None:
        while parent_alive(pid, direct):
            threading.Event().wait(interval_s)
        log.error("the parent process %d is gone; stopping this worker (its task goes back to the queue)", pid)
        # Armed before stop(), and without logging's locks: the hard exit must happen even if
        # stopping blocks.
        deadline = threading.Timer(grace_s, _exit_hard, args=(grace_s,))
        deadline.daemon = True
        deadline.start()
        stop()

    thread = threading.Thread(target=run, name="fmlora-parent-watch", daemon=True)
    thread.start()
    return thread
