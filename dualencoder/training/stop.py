"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (a cluster's pre-emption) end a run with a checkpoint.

The handler only records the signal; the loop, after the step in flight, saves a checkpoint and exits with the
shell's code for that signal (130, 143), so `--resume_from_checkpoint latest` continues exactly where the run
stopped. A second SIGINT while stopping gives up at once (KeyboardInterrupt). With several processes the
request is agreed on at logging steps (where the loop reads the device anyway), so every process saves the same
step; on one process it is acted on after every step.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """`with StopRequest() as stop:` around the loop; `stop.requested(accelerator, synced)` after each step."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        if self.signal == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        self.signal = number

    def requested(self, accelerator, synced: bool) -> bool:
        """Whether every process should stop now (`synced`: a step at which processes may agree on it)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        if not synced:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGTERM).name
