"""Image statistics stage: a quick look at an image table.

Writes ``stats.json`` (counts per split and class, pixel mean and standard deviation per
channel over the train split) and ``class_means.png`` (the mean image of each class, then a
few train examples of each class). Cheap, so the smoke pipeline uses it as its second stage.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.stage import Input
from stages.figures.png import grid, save_png
from stages.formats.images import read_image_table

VERSION = "1"
INPUTS = {"images": Input(kinds=("ingest",))}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Options.

    Args:
        examples_per_class: Train examples shown per class in ``class_means.png``.
    """

    examples_per_class: int = 8

    def __post_init__(self):
        if not 0 <= self.examples_per_class <= 64:
            raise ConfigError("examples_per_class: must be between 0 and 64")


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Computes the statistics of the ``images`` input."""
    table = read_image_table(inputs["images"])
    train = table.split("train")
    if len(train) == 0:
        raise ValueError("the image table has no train split")
    pixels = train.images.reshape(-1, table.meta.channels).astype(np.float64) / 255.0
    classes = sorted(set(train.labels.tolist()) - {-1}) or [-1]
    rows = []
    for label in classes:
        members = train.images[train.labels == label]
        mean = members.astype(np.float32).mean(axis=0).round().astype(np.uint8)
        rows.append(np.concatenate([mean[None], members[: config.examples_per_class]]))
    width = 1 + config.examples_per_class
    rows = [np.concatenate([r, np.zeros((width - len(r), *r.shape[1:]), np.uint8)]) for r in rows]
    save_png(grid(np.concatenate(rows), nrow=width, scale=2), out / "class_means.png")
    stats = {
        "splits": {s: int(np.sum(table.splits == s)) for s in ("train", "val", "test")},
        "train_class_counts": {str(c): int(np.sum(train.labels == c)) for c in classes},
        "pixel_mean": pixels.mean(axis=0).round(5).tolist(),
        "pixel_std": pixels.std(axis=0).round(5).tolist(),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("image_stats: %d train images, pixel mean %s", len(train), stats["pixel_mean"])
    return stats
