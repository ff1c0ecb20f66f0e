"""Preemption: SIGTERM (SLURM, Kubernetes, spot instances), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's ``--signal``)
end a run with a checkpoint instead of losing everything since the last one.

A handler only notes the signal. At the next optimizer-step boundary every process agrees on it (one max
all-reduce of a flag, under several processes), the Trainer saves a complete checkpoint through its usual staged
path and ``RunPreempted`` ends the run. A second signal stops the process at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from dualadam_hf.hf.collective import max_over_processes

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class RunPreempted(RuntimeError):
    """A run stopped by a signal after saving ``checkpoint``; ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}, checkpoint saved in {checkpoint}")


class PreemptionWatch:
    """Notes SIGTERM, SIGINT and SIGUSR1 while active (a context manager; the previous handlers come back on
    exit). Signal handlers can only be set from the main thread: elsewhere it watches nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            sys.stderr.write(f"{name} received: finishing this optimizer step, then saving a checkpoint "
                             f"(send it again to stop at once, without one)\n")
            sys.stderr.flush()
            return
        sys.stderr.write(f"{name} received again: stopping now, without a checkpoint\n")
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def agreed(self, device: torch.device | str, world_size: int) -> int | None:
        """The signal any process received, the same on every process (a collective: every process calls it at
        the same step boundary), or None."""
        return max_over_processes(self.received or 0, device, world_size) or None
