"""Sample-quality pieces: the Fréchet distance, the classifier, the report's chart."""

import numpy as np
import torch

from models.classifier import Classifier, ClassifierConfig
from pipeline.report import line_chart
from stages.evaluate import frechet_distance


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Independent route: tr(sqrtm(S_a S_b)) from the eigenvalues of the (non-symmetric)
    product, which are real and non-negative for PSD matrices."""
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(0)
    return float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum())


def test_frechet_distance_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(400, 6)) @ rng.normal(size=(6, 6))
    assert abs(frechet_distance(a, b) - _reference_fd(a, b)) < 1e-6 * max(1, _reference_fd(a, b))
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(200_000, 3))
    b = rng.normal([1.0, 0.0, 0.0], [2.0, 1.0, 0.5], size=(200_000, 3))
    # |mu|^2 + sum (s_a - s_b)^2 = 1 + 1 + 0 + 0.25
    assert abs(frechet_distance(a, b) - 2.25) < 0.03


def test_classifier_shapes_loss_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(num_classes=10, feature_dim=16)).eval()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    out = model(x, torch.tensor([0, 1, 2, 3]))
    assert set(out) == {"logits", "ce", "loss"} and out["logits"].shape == (4, 10)
    assert torch.isfinite(out["loss"])
    assert model.features(x).shape == (4, 16)
    model.save(tmp_path)
    again = Classifier.load(tmp_path).eval()
    assert torch.equal(again(x)["logits"], model(x)["logits"])


def test_line_chart_is_a_png():
    png = line_chart([(1, 3.0), (2, 2.0), (3, 1.5)], "loss")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert line_chart([], "empty")[:4] == b"\x89PNG"
