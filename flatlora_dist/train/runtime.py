"""Run-time facts every part of the app asks for: this process's rank, the world size, a barrier, the
app's logger, the exit code of a stopped run, and the SIGTERM flag (:class:`StopRequest`)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("flatlora_dist.train")

STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # 143: stopped on SIGTERM with a complete checkpoint


class RunError(ValueError):
    """A problem with the requested run; the message is one line naming it and the fix."""


class AlreadyFinished(Exception):
    """``--resume`` of a run that has finished: nothing to do (exit 0, nothing touched)."""


def dist_on() -> bool:
    """Whether a torch.distributed process group is running."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return not dist_on() or dist.get_rank() == 0


def barrier() -> None:
    if dist_on():
        dist.barrier()


def world_size() -> int:
    if dist_on():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed() -> bool:
    """More than one rank is running."""
    return dist_on() and dist.get_world_size() > 1


class StopRequest:
    """SIGTERM sets a flag (nothing else: the handler may run mid-step, with noise in the weights).

    ``install``/``uninstall`` swap the handler in and back out (main thread only; elsewhere, e.g. a
    notebook worker thread, signals cannot be handled and the default behaviour stays).  Repeated
    SIGTERMs change nothing: a rank often gets two (``kill`` of the process group, then the DeepSpeed
    launcher forwarding its own); schedulers and launchers escalate with SIGKILL.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None
        self._installed = False

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        self.signum = signum
