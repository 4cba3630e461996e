"""Train-classifier stage: an image table -> a small trained classifier (`models.classifier`).

The evaluate stage uses it as its feature extractor and judge: Fréchet distance on its
penultimate features, and the class it assigns to class-conditional samples. It is an artifact
like any other, so it is trained once per image table and served from the store after that.

The loop runs in the stage's own process (a few seconds to a minute on a CPU): Adam, cosine
decay, random shifts of up to ``shift`` pixels as augmentation. The train split streams a row
group at a time, epoch after epoch in a seeded order, through a shuffle buffer
(`stages.formats.image_stream`). Val accuracy is measured on up to 10,000 images of the ``val``
split (``test`` when there is no val split).

Artifact: ``config.json`` + ``model.safetensors``, ``metrics.json`` (history and val accuracy).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.classifier import Classifier, ClassifierConfig
from pipeline import tracking
from pipeline.stage import Input
from stages.formats import image_stream
from stages.formats.images import image_table_meta
from stages.formats.pixels import to_signed
from stages.metrics.quality import accuracy_on
from stages.training import loop

VERSION = "2"  # 2: streamed epochs (1 drew batches with replacement from the whole split)
HELD_OUT = 10_000  # val (or test) images the accuracy is measured on
SHUFFLE_BUFFER = 4096
INPUTS = {"images": Input(kinds=("ingest",))}
SCORE = ("val_accuracy", "max")  # `twostage ls --metrics` ranks by it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Classifier training options.

    Args:
        steps: Optimizer steps.
        batch_size: Images per step.
        lr: Peak learning rate (Adam; cosine decay to zero).
        shift: Random translation of up to this many pixels (0: off).
        feature_dim: Width of the feature layer.
        seed: Seed of initialisation and batches.
        threads: CPU threads (0: all).
    """

    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    shift: int = 2
    feature_dim: int = 128
    seed: int = 0
    threads: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Trains the classifier on the ``train`` split of ``images``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    artifact = inputs["images"]
    meta = image_table_meta(artifact)
    names = meta.class_names
    if len(names) < 2:
        raise ValueError(f"{artifact.uri}: the image table has no class labels to learn")
    if not image_stream.groups(artifact, "train"):
        raise ValueError("the classifier needs a labelled train split")
    held_split = "val" if image_stream.groups(artifact, "val") else "test"
    held_out = image_stream.read_rows(artifact, held_split, HELD_OUT)
    blocks = (
        {"image": t.images, "label": t.labels}
        for t in image_stream.tables(artifact, "train", seed=config.seed)
    )
    batches = image_stream.shuffled_batches(blocks, config.batch_size, SHUFFLE_BUFFER, config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = Classifier(
        ClassifierConfig(
            in_channels=meta.channels, num_classes=len(names), feature_dim=config.feature_dim
        )
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history, start = [], time.perf_counter()
    model.train()
    for step in range(config.steps):
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        if (batch["label"] < 0).any():
            raise ValueError("the classifier needs a labelled train split")
        x = _shift(to_signed(batch["image"]), config.shift, generator)
        loss = model(x, torch.from_numpy(batch["label"]))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.clip_and_step(optimizer, model.parameters(), 0, step, "check the input data")
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "lr": lr, "ce": float(loss.detach())})
            log.info(
                "train_classifier: step %d/%d ce %.4f", step + 1, config.steps, history[-1]["ce"]
            )
    seconds = time.perf_counter() - start
    model.eval()
    accuracy = accuracy_on(model, held_out.images, held_out.labels)
    log.info("train_classifier: held-out accuracy %.4f (%d images)", accuracy, len(held_out))
    model.save(out)
    metrics = {
        "val_accuracy": accuracy,
        "val_images": len(held_out),
        "seconds": seconds,
        "class_names": names,
    }
    (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    tracker = tracking.for_this_step()  # a short loop without checkpoints: its curve at the end
    if tracker is not None:
        tracker.rows(history, {"step": config.steps, "val_accuracy": accuracy})
        tracker.close()
    return metrics


def _shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translates each image by up to `shift` pixels (zero = background padding)."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(x.shape[1])[None, :, None, None],
        rows,
        cols,
    ]
