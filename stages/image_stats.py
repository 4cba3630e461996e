"""Image statistics stage: a quick look at an image table.

Writes ``stats.json`` (counts per split and class, pixel mean and standard deviation per
channel over the train split) and ``class_means.png`` (the mean image of each class, then a
few train examples of each class; the first 32 classes). Cheap, so the smoke pipeline uses it
as its second stage. Reads the table a row group at a time: memory does not grow with it.
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
from stages.formats import image_stream
from stages.formats.images import SPLITS

VERSION = "1"
SHOWN_CLASSES = 32  # rows of class_means.png
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
    artifact = inputs["images"]
    splits = {s: sum(g.rows for g in image_stream.groups(artifact, s)) for s in SPLITS}
    if splits["train"] == 0:
        raise ValueError("the image table has no train split")
    counts: dict[int, int] = {}
    sums: dict[int, np.ndarray] = {}  # per shown class: the sum of its images
    examples: dict[int, list[np.ndarray]] = {}
    pixel_sum = pixel_sq = 0.0
    for part in image_stream.tables(artifact, "train"):
        pixels = part.images.reshape(-1, part.meta.channels).astype(np.float64) / 255.0
        pixel_sum = pixel_sum + pixels.sum(axis=0)
        pixel_sq = pixel_sq + (pixels**2).sum(axis=0)
        for label in np.unique(part.labels).tolist():
            members = part.images[part.labels == label]
            counts[label] = counts.get(label, 0) + len(members)
            if label in sums or len(sums) < SHOWN_CLASSES:
                sums[label] = sums.get(label, 0) + members.astype(np.float64).sum(axis=0)
                shown = examples.setdefault(label, [])
                shown.extend(members[: config.examples_per_class - len(shown)])
    n = splits["train"] * part.meta.height * part.meta.width
    mean = pixel_sum / n
    std = np.sqrt(np.maximum(pixel_sq / n - mean**2, 0.0))
    width = 1 + config.examples_per_class
    rows = []
    for label in sorted(sums):
        average = (sums[label] / counts[label]).round().astype(np.uint8)
        row = np.stack([average, *examples[label]])
        rows.append(np.concatenate([row, np.zeros((width - len(row), *row.shape[1:]), np.uint8)]))
    save_png(grid(np.concatenate(rows), nrow=width, scale=2), out / "class_means.png")
    classes = sorted(counts)
    stats = {
        "splits": splits,
        "train_class_counts": {str(c): counts[c] for c in classes},
        "pixel_mean": mean.round(5).tolist(),
        "pixel_std": std.round(5).tolist(),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("image_stats: %d train images, pixel mean %s", splits["train"], stats["pixel_mean"])
    return stats
