"""Stopping when the cluster asks: SIGTERM (preemption, ``scancel``, the time limit) and SIGUSR1
(what SLURM's ``--signal=USR1@120`` sends ahead of the time limit).

While :meth:`dgss.engine.Trainer.train` runs, :class:`PreemptionWatch` records these signals instead
of dying on them. After every optimizer step all processes agree, by one all-reduce (MAX) of the
signal number, whether any of them received one, so they all stop after the same iteration even when
the signal reached only some of them. The trainer then writes a checkpoint of that iteration through
the normal atomic path, logs one line and raises :class:`TrainingPreempted`, a ``SystemExit`` with
:data:`PREEMPTED_EXIT_CODE` (``dgss train`` exits with it): a requeue script resubmits on that code,
and ``--resume`` (or ``--auto-resume``) continues bit-exactly from the checkpoint.

A second signal, e.g. during that save, is recorded and ignored: the save completes (and a SIGKILL
that follows the grace period finds the previous checkpoint intact, since every file is renamed into
place). DataLoader worker processes ignore these signals (a scheduler signals every process of a job,
and a worker that died would abort the step through PyTorch's SIGCHLD check): they serve until the
trainer, checkpoint written, exits and shuts them down.

Before training starts (imports, the model, the checkpoint, the process group) the signals keep their
default action: a job stopped then has lost nothing, and dies at once even inside a blocking call.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

__all__ = ["PREEMPTION_SIGNALS", "PREEMPTED_EXIT_CODE", "PreemptionWatch", "TrainingPreempted", "ignore_in_worker"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry"
PREEMPTED_EXIT_CODE = 75


def ignore_in_worker() -> None:
    """For a DataLoader worker process: ignore :data:`PREEMPTION_SIGNALS` (see the module docstring)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after writing ``checkpoint``. A ``SystemExit`` with code
    :data:`PREEMPTED_EXIT_CODE`, so a script that does not catch it exits with that code."""

    def __init__(self, message: str, checkpoint: Optional[Path]) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message, self.checkpoint = message, checkpoint

    def __str__(self) -> str:
        return self.message


class PreemptionWatch:
    """Records :data:`PREEMPTION_SIGNALS` between :meth:`install` and :meth:`uninstall` (which restores
    the previous handlers). Signal handlers can only be set from the main thread; elsewhere the watch
    does nothing and the signals keep their previous meaning."""

    def __init__(self) -> None:
        self.received: list[int] = []  # signal numbers, in the order they came
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Start recording (from the main thread; elsewhere nothing happens). False: already installed."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked process (a DataLoader worker): the trainer decides, not it
            return
        self.received.append(signum)  # nothing else here: the loop acts on it between steps

    def agreed_signal(self, device) -> int:
        """The signal number any process received so far (0: none); the same answer on every process.
        A collective under DDP: every process must call it at the same point."""
        import torch

        from .distributed import all_reduce_max

        flag = torch.tensor([self.received[0] if self.received else 0], dtype=torch.int64, device=device)
        return int(all_reduce_max(flag).item())

    def ignored_after(self, count: int) -> list[str]:
        """Names of the signals received after the first ``count`` ones."""
        return [signal.Signals(s).name for s in self.received[count:]]
