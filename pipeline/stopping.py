"""SIGTERM stops a command the way Ctrl-C does: what Kubernetes, systemd and ``docker stop`` send.

An orchestrator stops a process with SIGTERM, then SIGKILL once its grace period is over (Kubernetes:
30 s by default). Python's default for SIGTERM ends the process on the spot, without ``finally``
blocks, and a Ray driver's own handlers do worse (see :mod:`pipeline.local_cluster`). So the CLI runs
every command under :func:`sigterm_stops`, and a SIGTERM then does what Ctrl-C would do at that moment:

* while Ray Tune or Ray Train holds the SIGINT handler (a sweep, a distillation's ``fit``), that
  handler runs: Tune stops its trials and saves its state, Train aborts the run (its checkpoints stay);
* otherwise ``KeyboardInterrupt`` is raised in the main thread: ``amad serve`` lets the requests in
  flight finish, every job unwinds, and the Ray cluster the command started is shut down;
* one more SIGTERM while the command stops is ignored: a stop in progress is never cut short (SIGKILL
  is how an orchestrator insists).

The command's exit status then says how it ended (``amad --help`` lists them; docs/operations.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator

INTERRUPTED = 128 + signal.SIGINT  # 130, as shells report a process ended by Ctrl-C
TERMINATED = 128 + signal.SIGTERM  # 143, as shells report a process ended by SIGTERM


@dataclasses.dataclass
class Stop:
    """What :func:`sigterm_stops` saw: the signal that asked the command to stop (None: none yet)."""

    name: str
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


_current: Stop | None = None


def _say(message: str) -> None:
    # os.write, not print: a signal handler runs between two bytecodes of the main thread, possibly
    # inside a print() to the same stream, and print() is not reentrant.
    try:
        os.write(2, f"{message}\n".encode())
    except OSError:
        pass


def _on_sigterm(signum: int, frame) -> None:
    stop = _current
    if stop is None:  # pragma: no cover -- only installed while a Stop is current
        raise KeyboardInterrupt
    if stop.requested:
        _say(f"{stop.name}: SIGTERM again: already stopping (SIGKILL ends it at once, leaving Ray's processes to the reaper)")
        return
    stop.signum = signum
    _say(f"{stop.name}: SIGTERM: stopping as on Ctrl-C")
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    if callable(on_ctrl_c) and on_ctrl_c is not signal.default_int_handler and _ray_connected():
        on_ctrl_c(signal.SIGINT, frame)  # Ray Tune's or Ray Train's graceful stop
        return
    raise KeyboardInterrupt


def _ray_connected() -> bool:
    # Ray Train leaves its SIGINT handler in place after ``fit`` returns; called once Ray is shut
    # down, it would make a remote call (and start a new Ray to make it).
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def sigterm_stops(name: str) -> Iterator[Stop]:
    """For the duration, SIGTERM stops this process as Ctrl-C does (see the module docstring).

    ``name`` prefixes the messages (``"amad serve"``). Nested calls share the outer one's :class:`Stop`.
    Only the main thread may install a signal handler: from another thread this changes nothing.
    """
    global _current
    if _current is not None:
        yield _current
        return
    stop = Stop(name)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    _current = stop
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        _current = None

