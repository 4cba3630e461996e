"""A test stage that records each attempt, sleeps, and optionally fails.

Each attempt writes ``<marker_dir>/attempt-<pid>`` before sleeping, so a test can find the worker
process running it (to kill it) and count attempts afterwards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from stages import Input

VERSION = "1"
INPUTS = {"after": Input(required=False)}


@dataclass(frozen=True)
class Config:
    seconds: float = 0.5
    marker_dir: str = ""
    fail: bool = False
    tag: str = ""


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    if config.marker_dir:
        Path(config.marker_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.marker_dir) / f"attempt-{os.getpid()}").write_text(str(time.time()))
    time.sleep(config.seconds)
    if config.fail:
        raise ValueError("sleepy was told to fail")
    (out / "done.txt").write_text(f"{config.tag} pid={os.getpid()}\n")
    return {"pid": os.getpid()}
