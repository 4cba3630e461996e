"""A test stage that records each attempt, sleeps, and optionally fails.

Each attempt writes ``<marker_dir>/attempt-<pid>`` before sleeping, so a test can find the worker
process running it (to kill it) and count attempts afterwards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.stage import Input

VERSION = "1"
INPUTS = {"after": Input(required=False)}


@dataclass(frozen=True)
class Config:
    seconds: float = 0.5
    marker_dir: str = ""
    fail: bool = False
    fail_in_ray_data: bool = False  # raise inside a Ray Data function instead
    tag: str = ""
    scratch_file: bool = False  # write a file into its scratch first (as checkpoints would)


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    if config.scratch_file:
        Path(scratch).mkdir(parents=True, exist_ok=True)
        (Path(scratch) / "checkpoint.txt").write_text("state")
    if config.marker_dir:
        Path(config.marker_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.marker_dir) / f"attempt-{os.getpid()}").write_text(str(time.time()))
    time.sleep(config.seconds)
    if config.fail:
        raise ValueError("sleepy was told to fail")
    if config.fail_in_ray_data:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.range(4).map_batches(_fail).materialize()
    (out / "done.txt").write_text(f"{config.tag} pid={os.getpid()}\n")
    return {"pid": os.getpid()}


def _fail(batch):
    raise ValueError("sleepy's data was told to fail")
