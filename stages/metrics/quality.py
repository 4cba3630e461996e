"""Sample quality against real images, through a trained classifier (`models.classifier`):
class accuracy and the Fréchet distance between the classifier's features of two image sets."""

from __future__ import annotations

import numpy as np
import torch

from models.classifier import Classifier
from stages.formats.pixels import to_signed


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows `a` and `b`.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``; the matrix square
    roots come from symmetric eigendecompositions (no complex parts, no scipy).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance: needs at least 2 rows on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@torch.no_grad()
def predict(model: Classifier, images: np.ndarray, batch_size: int = 512):
    """(features ``n d`` float64, predicted classes ``n``) of uint8 images."""
    model.eval()
    features, classes = [], []
    for start in range(0, len(images), batch_size):
        x = to_signed(images[start : start + batch_size])
        f = model.features(x)
        features.append(f.double().numpy())
        classes.append(model.head(f).argmax(-1).numpy())
    return np.concatenate(features), np.concatenate(classes)


def accuracy_on(model: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `images` classified as `labels`."""
    if len(images) == 0:
        return float("nan")
    _, predicted = predict(model, images)
    return float((predicted == labels).mean())
