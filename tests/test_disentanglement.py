import math

import numpy as np
import pytest

from stages.metrics.disentanglement import factor_vae_score, mig
from stages.sources import dsprites

SIZES = (3, 6, 10, 8, 8)


def _factors(n: int, sizes=SIZES, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, sizes, size=(n, len(sizes)))


def test_mig_mutual_information_by_hand():
    # joint counts of (z, v): (0,0) x3, (0,1) x1, (1,0) x1, (1,1) x3 over 8 samples, so
    # p(z, v) = 3/8 on the diagonal, 1/8 off it, and both marginals are (1/2, 1/2):
    # I = 2 * 3/8 * ln(3/8 / 1/4) + 2 * 1/8 * ln(1/8 / 1/4) = 3/4 ln(3/2) - 1/4 ln 2
    z = np.array([0, 0, 0, 0, 1, 1, 1, 1], float)
    v = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    constant = np.full(8, 7)  # a one-valued factor, like dSprites' color
    by_hand = 0.75 * math.log(1.5) - 0.25 * math.log(2)
    result = mig(np.stack([z, 1 - z, v * 2.5], axis=1), np.stack([v, constant], axis=1), bins=2)
    info = np.array(result["mutual_information"])
    assert info.shape == (3, 2)
    assert info[0, 0] == pytest.approx(by_hand, abs=1e-12)
    assert info[1, 0] == pytest.approx(by_hand, abs=1e-12)  # a relabelled copy
    assert info[2, 0] == pytest.approx(math.log(2), abs=1e-12)  # the factor itself: I = H
    np.testing.assert_allclose(info[:, 1], 0.0, atol=1e-12)
    assert result["factor_entropy"] == pytest.approx([math.log(2), 0.0])
    assert result["skipped_factors"] == [1]
    assert result["per_factor"][1] is None
    assert result["per_factor"][0] == pytest.approx((math.log(2) - by_hand) / math.log(2))
    assert result["mig"] == pytest.approx(result["per_factor"][0])


def test_mig_disentangled_code_is_near_one():
    factors = _factors(5000)
    noise = np.random.default_rng(1).normal(scale=1e-3, size=factors.shape)
    codes = factors * np.array([1.0, 0.3, 2.0, -1.0, 5.0]) + noise
    result = mig(codes, factors)
    assert result["mig"] > 0.9
    assert min(result["per_factor"]) > 0.9
    assert len(result["mutual_information"]) == 5 and len(result["per_factor"]) == 5


def test_mig_entangled_codes_are_low():
    sizes = (8, 8, 8, 8)
    factors = _factors(5000, sizes)
    standardized = (factors - 3.5) / np.sqrt((64 - 1) / 12)
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2
    mixed = mig(standardized @ hadamard, factors)
    assert mixed["mig"] < 0.3
    one_factor = np.repeat(factors[:, :1].astype(float), 4, axis=1)
    one_factor += np.random.default_rng(2).normal(scale=1e-3, size=one_factor.shape)
    assert mig(one_factor, factors)["mig"] < 0.1
    disentangled = mig(standardized, factors)["mig"]
    assert disentangled > 0.9 > 0.3 > mixed["mig"]


def test_mig_rejects_bad_input():
    with pytest.raises(ValueError, match="same n"):
        mig(np.zeros((4, 2)), np.zeros((5, 1), int))
    with pytest.raises(ValueError, match="bins"):
        mig(np.zeros((4, 2)), np.zeros((4, 1), int), bins=1)


def _identity(images: np.ndarray) -> np.ndarray:
    return images.astype(float)


def _factors_as_images(factors: np.ndarray) -> np.ndarray:
    return factors.astype(float)  # the "images" are the factor values themselves


def test_factor_vae_identity_code_scores_one():
    result = factor_vae_score(_identity, SIZES, _factors_as_images, num_train=300, num_eval=300)
    assert result["score"] == 1.0 and result["train_accuracy"] == 1.0
    assert result["active_dims"] == 5
    assert result["votes"]["classifier"] == [0, 1, 2, 3, 4]
    assert sum(map(sum, result["votes"]["eval"])) == 300


def test_factor_vae_prunes_collapsed_dims():
    def code_fn(images):  # permuted factors plus a collapsed (constant) and a tiny dimension
        n = len(images)
        return np.column_stack([images[:, [3, 0, 4, 2, 1]], np.zeros(n), 0.01 * images[:, 0]])

    result = factor_vae_score(code_fn, SIZES, _factors_as_images, num_train=200, num_eval=200)
    assert result["active_dims"] == 5
    assert result["votes"]["active_dim_indices"] == [0, 1, 2, 3, 4]
    assert result["votes"]["classifier"] == [3, 0, 4, 2, 1]
    assert result["score"] == 1.0


def test_factor_vae_noise_code_is_at_chance():
    noise = np.random.default_rng(5)

    def code_fn(images):
        return noise.normal(size=(len(images), 5))

    result = factor_vae_score(code_fn, SIZES, _factors_as_images)
    assert result["score"] <= 1 / len(SIZES) + 0.1
    assert result["active_dims"] == 5


def test_factor_vae_is_deterministic_under_seed():
    mixing = np.random.default_rng(3).normal(size=(5, 5))

    def code_fn(images):
        return images @ mixing

    def run(seed):
        return factor_vae_score(
            code_fn, SIZES, _factors_as_images, num_train=100, num_eval=100, seed=seed
        )

    first, second, other = run(0), run(0), run(1)
    assert first == second
    assert first["votes"] != other["votes"]


def test_factor_vae_no_active_dims_scores_zero():
    result = factor_vae_score(
        lambda images: np.zeros((len(images), 3)), SIZES, _factors_as_images, num_train=5
    )
    assert result["score"] == 0.0 and result["active_dims"] == 0


def test_factor_vae_on_dsprites_with_a_hand_made_encoder():
    def code_fn(images):  # centre of mass (column, row) and area of each sprite
        on = images[..., 0] > 0
        area = on.sum(axis=(1, 2))
        rows, cols = np.arange(64)[None, :, None], np.arange(64)[None, None, :]
        return np.column_stack(
            [(on * cols).sum(axis=(1, 2)) / area, (on * rows).sum(axis=(1, 2)) / area, area]
        )

    result = factor_vae_score(
        code_fn,
        dsprites.FACTOR_SIZES,
        dsprites.render_batch,
        num_train=60,
        num_eval=60,
        batch_size=32,
        num_variance_estimate=1000,
    )
    classifier = result["votes"]["classifier"]
    assert classifier[0] == dsprites.FACTOR_NAMES.index("pos_x")
    assert classifier[1] == dsprites.FACTOR_NAMES.index("pos_y")
    assert classifier[2] in (0, 1)  # area: shape or scale
    assert result["score"] >= 0.4
