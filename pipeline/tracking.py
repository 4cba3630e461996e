"""Experiment tracking: TensorBoard event files of every training curve and of each run's results.

With ``tracking: tensorboard`` in a pipeline file, the runner gives each step that runs a log
directory ``<runs_dir>/<run_id>/tensorboard/<step>`` (in the environment variable `ENV` of the
process that runs the step); the training skeleton writes, from rank 0, each logged row of the
loop (``train/<term>``: loss terms, learning rate, throughput) and each checkpoint's figures
(``checkpoint/<metric>``: val figures and more) there. At the end of the run the runner writes ``<run_id>/tensorboard/_run``:
every step's final figures (``<step>/<metric>``), the pipeline file and the artifact keys as
text. ``tensorboard --logdir runs`` then shows every run side by side. Without ``tracking``
nothing is written and TensorBoard is not imported.

The directory is a local path: on a cluster of several machines, point ``runs_dir`` at a
directory every node mounts, or the curves of steps that ran elsewhere stay on their node.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV = "TWOSTAGE_TRACKING_DIR"
reporter = None  # set in a Tune trial's process (`pipeline.tune`): it gets what a tracker gets


class Tracker:
    """Writes scalars of one step (or one run) into a TensorBoard log directory."""

    def __init__(self, logdir: str | Path):
        self.logdir = str(logdir)
        self.last_step = 0  # rows up to here are written (a resumed run wrote them before)
        self._writer = None

    def _out(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            Path(self.logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(self.logdir, flush_secs=30)
        return self._writer

    def rows(self, history: list[dict], metrics: dict | None = None) -> None:
        """Writes the history rows past `last_step` (``train/<key>``) and the figures of the
        checkpoint at ``metrics["step"]`` (``checkpoint/<key>``) unless that step is written
        already, then flushes."""
        if metrics and int(metrics.get("step", 0)) <= self.last_step:
            return
        out = self._out()
        for row in history:
            step = int(row.get("step", 0))
            if step <= self.last_step:
                continue
            for key, value in row.items():
                if key != "step" and _scalar(value):
                    out.add_scalar(f"train/{key}", value, step)
        if metrics:
            step = int(metrics.get("step", 0))
            for key, value in metrics.items():
                if key != "step" and _scalar(value):
                    out.add_scalar(f"checkpoint/{key}", value, step)
            self.last_step = max(self.last_step, step)
        elif history:
            self.last_step = max(self.last_step, int(history[-1].get("step", 0)))
        out.flush()

    def scalars(self, prefix: str, values: dict, step: int = 0) -> None:
        """Writes ``<prefix>/<key>`` for every number in `values`."""
        for key, value in values.items():
            if _scalar(value):
                self._out().add_scalar(f"{prefix}/{key}", value, step)

    def text(self, tag: str, text: str) -> None:
        self._out().add_text(tag, text)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def for_this_step() -> Tracker | None:
    """The tracker the runner set up for the step running in this process, if any (in a Tune
    trial, the trial's reporter)."""
    if reporter is not None:
        return reporter
    logdir = os.environ.get(ENV)
    return Tracker(logdir) if logdir else None


def _scalar(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
