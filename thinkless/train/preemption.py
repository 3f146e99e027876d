"""Preemption: SIGTERM (SLURM, Kubernetes) or SIGINT (Ctrl-C) ends a run at the next step boundary, saved.

The first signal only sets a flag: the step in progress finishes (its rollouts, its update), then every rank saves
that step and the run exits with status 0 and one line. Ranks agree through one small collective per step, so a
signal to any rank stops them all at the same step. A second signal exits at once (status 128 + its number),
for a run that must go now. The handlers are this process's only while the stage runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"thinkless: {name} again: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"thinkless: {name}: finishing this step, then saving and exiting (send it again to exit now)",
              file=sys.stderr, flush=True)  # fmt: skip

    def stop(self, d) -> bool:
        """Whether any rank received a signal (a collective: every rank calls it at the same point of each step)."""
        return bool(d.max(int(self.received is not None)))
