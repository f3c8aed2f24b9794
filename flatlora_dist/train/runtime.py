"""Run-time facts every part of the app asks for: this process's rank, the world size, a barrier, the
app's logger, the exit codes of a stopped run, and the SIGTERM / Ctrl-C flag (:class:`StopRequest`)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("flatlora_dist.train")

STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # 143: stopped on SIGTERM with a complete checkpoint
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: stopped (or aborted) by Ctrl-C


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
    """SIGTERM or a first Ctrl-C (SIGINT) sets a flag (nothing else: the handler may run mid-step, with
    noise in the weights); the run then stops cleanly at the end of the step (see ``run.py``).

    ``install``/``uninstall`` swap the handlers in and back out (main thread only; elsewhere, e.g. a
    notebook worker thread, signals cannot be handled and the default behaviour stays).  ``signum`` is
    the first stop signal received and never changes after.  Repeated SIGTERMs change nothing: a rank
    often gets two (``kill`` of the process group, then the DeepSpeed launcher forwarding its own);
    schedulers and launchers escalate with SIGKILL.  A second Ctrl-C aborts at once
    (``KeyboardInterrupt``), unless it comes within :attr:`relay_s` of the first: a launcher whose ranks
    share the terminal's process group and that relays the SIGINT itself delivers one Ctrl-C twice,
    milliseconds apart (plain python: no such window).  torchrun (and ``accelerate launch``, through it)
    starts each rank in a session of its own (torch 2.11 to 2.14), so there a rank gets only the agent's
    relayed SIGINT, once.
    """

    def __init__(self, relay_s: float | None = None) -> None:
        self.signum: int | None = None
        self.relay_s = (1.0 if "LOCAL_RANK" in os.environ else 0.0) if relay_s is None else relay_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
                os.write(2, b"\nCtrl-C: stopping at the end of this step and writing a checkpoint " + self._again())
        elif signum == signal.SIGINT and self.signum == signal.SIGINT and now - self._first_at > self.relay_s:
            raise KeyboardInterrupt

    @staticmethod
    def _again() -> bytes:
        """What a second Ctrl-C does.  Under a launcher (``LOCAL_RANK``) the launcher gets it, not the ranks:
        torchrun's agent answers it by sending its ranks SIGTERM, which they take as the same clean stop."""
        if "LOCAL_RANK" in os.environ:
            return b"(a second Ctrl-C goes to the launcher, which asks the ranks to stop the same way)\n"
        return b"(Ctrl-C again to abort at once, losing the steps since the last checkpoint)\n"

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped this process (130 Ctrl-C, 143 SIGTERM; 143 if none reached it:
        another rank's stop)."""
        return 128 + (self.signum or signal.SIGTERM)


def signal_name(signum: int | None) -> str:
    """``SIGINT (Ctrl-C)`` or ``SIGTERM`` (the latter also for ``None``: a stop that came from another rank)."""
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"


def agreed_signal(signum: int | None) -> int | None:
    """The stop signal any rank got (SIGTERM over SIGINT if both), on every rank; ``None`` if none did.
    One tiny all-reduce (collective) when several ranks run."""
    code = int(signum or 0)
    if distributed():
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code = int(t.item())
    return code or None
