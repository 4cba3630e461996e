"""Evaluate stage: offline sample-quality figures for a two-stage run.

Inputs: the image table (held-out real images), the trained classifier (`train_classifier`),
the samples (`sample`) and, optionally, the autoencoder, its code shards and the priors.

Figures (all in ``metrics.json`` and the run report):

- ``frechet_distance``: Fréchet distance between Gaussians fitted to the classifier's
  penultimate features of the samples and of held-out real images (``val``, else ``test``).
  This is **not Inception FID**: the features come from our small MNIST-scale classifier, so
  the number is only comparable to others computed with the same classifier artifact. Two
  references computed in the same run frame it: ``frechet_distance_real`` (two disjoint halves
  of the held-out images: the floor sampling noise sets) and ``frechet_distance_recon`` (the
  autoencoder's reconstructions of the held-out images: what a perfect prior would reach);
- ``class_accuracy``: for class-conditional samples, the fraction the classifier assigns to
  the conditioning class (with ``classifier_accuracy``, the classifier's own accuracy on the
  held-out real images, beside it);
- ``recon_mse``: the autoencoder's reconstruction MSE on the held-out images ([0, 1] pixels);
- ``val_bits_per_code/<level>``: each prior's bits per code on the ``val`` shards.

Equal sample counts matter for Fréchet distances (they are biased upward at small n): the
real side uses as many images as there are samples, up to all held-out images.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.classifier import Classifier
from models.io import MODEL_FILES
from models.prior import CodePrior
from models.vqvae2 import VQVAE2
from pipeline.stage import Input
from stages.formats import image_stream
from stages.formats.codes import open_codes
from stages.formats.images import read_image_table
from stages.formats.pixels import to_signed
from stages.metrics.quality import frechet_distance, predict
from stages.sampling.priors import check_prior_of

VERSION = "2"  # 2: the first max_real held-out images in table order (1: a random subset)
INPUTS = {
    "images": Input(kinds=("ingest",)),
    "classifier": Input(kinds=("train_classifier",)),
    "samples": Input(kinds=("sample",)),
    "autoencoder": Input(kinds=("train_autoencoder",), required=False),
    "codes": Input(kinds=("encode",), required=False),
    "priors": Input(kinds=("train_prior",), many=True, required=False),
}
SCORE = ("frechet_distance", "min")  # `twostage ls --metrics` ranks by it
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Evaluation options.

    Args:
        max_real: At most this many held-out real images are used: the first in table order
            (a random order for image folders; read a row group at a time, never the table).
        seed: Seed of the real-image subsets.
    """

    max_real: int = 10_000
    seed: int = 0

    def __post_init__(self):
        if self.max_real < 2:
            raise ValueError(f"max_real: needs at least 2, got {self.max_real}")


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Computes the figures listed in the module docstring."""
    images = inputs["images"]
    held_split = "val" if image_stream.groups(images, "val") else "test"
    held_out = image_stream.read_rows(images, held_split, config.max_real)
    if len(held_out) < 4:
        raise ValueError(f"{inputs['images'].uri}: too few held-out (val/test) images to compare")
    rng = np.random.default_rng(config.seed)
    held_out_index = rng.permutation(len(held_out))[: config.max_real]
    real_images = held_out.images[held_out_index]
    real_labels = held_out.labels[held_out_index]

    classifier = Classifier.load(inputs["classifier"].local_dir(*MODEL_FILES)).eval()
    samples = read_image_table(inputs["samples"])
    if samples.images.shape[1:] != real_images.shape[1:]:
        raise ValueError(
            f"samples are {samples.images.shape[1:]} images, the real ones "
            f"{real_images.shape[1:]}; evaluate them against the image table they model"
        )
    n = min(len(samples), len(real_images))
    sample_features, sample_classes = predict(classifier, samples.images)
    real_features, real_classes = predict(classifier, real_images)
    metrics = {
        "samples": len(samples),
        "real_images": len(real_images),
        "frechet_distance": frechet_distance(sample_features, real_features[:n]),
        "classifier_accuracy": float((real_classes == real_labels).mean()),
        "feature_extractor": "twostage classifier (not Inception; not comparable to FID)",
    }
    half = len(real_features) // 2
    metrics["frechet_distance_real"] = frechet_distance(
        real_features[:half][:n], real_features[half:][:n]
    )
    conditional = samples.labels >= 0
    if conditional.any():
        metrics["class_accuracy"] = float(
            (sample_classes[conditional] == samples.labels[conditional]).mean()
        )
        metrics["class_accuracy_per_class"] = {
            str(c): float((sample_classes[samples.labels == c] == c).mean())
            for c in sorted(set(samples.labels[conditional].tolist()))
        }
    if inputs.get("autoencoder") is not None:
        autoencoder = VQVAE2.load(inputs["autoencoder"].local_dir(*MODEL_FILES)).eval()
        recon = _reconstruct(autoencoder, real_images)
        metrics["recon_mse"] = float(
            ((recon.astype(np.float64) - real_images.astype(np.float64)) / 255).__pow__(2).mean()
        )
        recon_features, _ = predict(classifier, recon)
        metrics["frechet_distance_recon"] = frechet_distance(recon_features[:n], real_features[:n])
    priors = inputs.get("priors") or []
    if priors and inputs.get("codes") is not None:
        shards = open_codes(inputs["codes"])
        codes = shards.to_torch("val")
        if len(codes["label"]) == 0:
            raise ValueError(
                f"{inputs['codes'].uri}: the code shards hold no val rows to measure the priors' "
                "bits per code on; encode a table with a val split (ingest val_fraction > 0)"
            )
        for artifact in priors:
            level = artifact.metrics["level"]
            check_prior_of(artifact, shards.meta.autoencoder_key, "the codes input")
            prior = CodePrior.load(artifact.local_dir(*MODEL_FILES)).eval()
            metrics[f"val_bits_per_code/{level}"] = _bits_per_code(prior, level, codes)
    log.info(
        "evaluate: %s",
        ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
    )
    (out / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def _reconstruct(model: VQVAE2, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        x = to_signed(images[start : start + batch_size])
        x_hat = model.decode_indices(model.encode_indices(x)).clamp(-1, 1)
        out.append(((x_hat + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def _bits_per_code(prior: CodePrior, level: str, codes: dict, batch_size: int = 256) -> float:
    """Teacher-forced bits per code of `prior` on the val rows of `codes`."""
    total, count = 0.0, 0
    n = len(codes["label"])
    for start in range(0, n, batch_size):
        s = slice(start, start + batch_size)
        context = {k: codes[k][s] for k in prior.config.context_grids}
        target = codes[level][s]
        nll = prior(target, context, codes["label"][s])["nll"]
        total += float(nll) * target.numel()
        count += target.numel()
    return total / max(count, 1) / math.log(2)
