"""Disentanglement metrics against ground-truth factors: MIG and the FactorVAE score.

Shapes: ``codes`` are float ``n d`` (one row per image, e.g. a VAE's posterior means),
``factors`` integer ``n k`` (one column per ground-truth factor, e.g. `stages.sources.dsprites` indices).
Mutual information and entropies are in nats. Both metrics follow the evaluation protocol of
Locatello et al. 2019 ("Challenging Common Assumptions in the Unsupervised Learning of
Disentangled Representations"): equal-width code histograms for MIG, majority-vote classifier
over argmin-variance votes for FactorVAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

_CHUNK = 1024  # images per call of sample_images and code_fn for the variance estimate


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> dict:
    """Mutual Information Gap (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

    Each code dimension ``z_j`` is discretised into `bins` equal-width bins over its range; for
    every code dimension ``j`` and factor ``k`` the discrete mutual information ``I(z_j; v_k)`` is
    computed from the joint histogram. For each factor, the gap between the largest and the
    second-largest ``I(z_j; v_k)`` over code dimensions is divided by the factor's entropy
    ``H(v_k)``; MIG is the mean gap over factors (Chen et al. 2018, eq. 6). 1 means each factor
    is captured by one code dimension alone, 0 that no dimension stands out.

    Factors with a single value (entropy 0, e.g. dSprites' color) carry no information and are
    skipped: their `per_factor` entry is None and they do not enter the mean.

    Args:
        codes: float ``n d`` codes.
        factors: ``n k`` ground-truth factor values (any discrete values; indices are typical).
        bins: Number of equal-width bins per code dimension.

    Returns:
        ``{"mig": float, "per_factor": list[float | None] (k), "mutual_information":
        list[list[float]] (d x k, nats), "factor_entropy": list[float] (k, nats),
        "skipped_factors": list[int]}``. ``mig`` is 0.0 when every factor is skipped.
    """
    codes, factors = _check_pair(codes, factors)
    if bins < 2:
        raise ValueError(f"bins: must be at least 2, got {bins}")
    num_dims, num_factors = codes.shape[1], factors.shape[1]
    code_bins = [_discretize(codes[:, j], bins) for j in range(num_dims)]
    factor_ids = [
        np.unique(factors[:, k], return_inverse=True)[1].ravel() for k in range(num_factors)
    ]
    info = np.zeros((num_dims, num_factors))
    for j in range(num_dims):
        for k in range(num_factors):
            info[j, k] = _mutual_information(code_bins[j], factor_ids[k])
    entropy = np.array([_entropy(ids) for ids in factor_ids])
    per_factor: list[float | None] = []
    skipped = []
    for k in range(num_factors):
        if entropy[k] <= 0.0:
            per_factor.append(None)
            skipped.append(k)
            continue
        top = np.sort(info[:, k])[::-1]
        second = top[1] if len(top) > 1 else 0.0
        per_factor.append(float((top[0] - second) / entropy[k]))
    gaps = [g for g in per_factor if g is not None]
    return {
        "mig": float(np.mean(gaps)) if gaps else 0.0,
        "per_factor": per_factor,
        "mutual_information": info.tolist(),
        "factor_entropy": entropy.tolist(),
        "skipped_factors": skipped,
    }


def factor_vae_score(
    code_fn: Callable[[np.ndarray], np.ndarray],
    factor_sizes: Sequence[int],
    sample_images: Callable[[np.ndarray], np.ndarray],
    num_train: int = 800,
    num_eval: int = 800,
    batch_size: int = 64,
    num_variance_estimate: int = 10_000,
    prune_threshold: float = 0.05,
    seed: int = 0,
) -> dict:
    """The FactorVAE disentanglement metric (Kim & Mnih 2018, "Disentangling by Factorising").

    1. Codes of `num_variance_estimate` images with uniformly random factors give each code
       dimension's empirical variance; dimensions whose standard deviation is below
       `prune_threshold` (collapsed to the prior) are dropped, the rest are divided by their
       standard deviation.
    2. A vote: pick a factor ``k`` uniformly, draw `batch_size` factor rows with ``k`` fixed to
       one random value and the others random, and vote ``(argmin_j Var[z_j] / Var_global[z_j],
       k)`` over the active dimensions.
    3. `num_train` votes train a majority-vote classifier (each dimension predicts the factor
       it voted for most; one without votes predicts factor 0); the score is its accuracy on
       `num_eval` further votes.

    With no active dimension the score is 0.0. Everything random comes from one
    ``numpy.random.default_rng(seed)``, so a deterministic `code_fn` gives a deterministic score.

    Args:
        code_fn: Maps images (as `sample_images` returns them) to float codes ``n d``.
        factor_sizes: Number of values of each factor; factor rows hold indices below these.
        sample_images: Renders images for int factor index rows ``n k``.
        num_train: Votes for the majority-vote classifier.
        num_eval: Held-out votes the score is measured on.
        batch_size: Images per vote (``L`` in the paper).
        num_variance_estimate: Images for the global per-dimension variance.
        prune_threshold: Dimensions with a global standard deviation below this are dropped.
        seed: Seed of every random draw.

    Returns:
        ``{"score": float (eval accuracy), "train_accuracy": float, "active_dims": int,
        "votes": {"active_dim_indices": list[int], "classifier": list[int] (factor per active
        dimension), "train": list[list[int]], "eval": list[list[int]]}}``, where the vote
        matrices count votes per (active dimension, factor).
    """
    factor_sizes = tuple(int(s) for s in factor_sizes)
    if not factor_sizes or min(factor_sizes) < 1:
        raise ValueError(
            f"factor_sizes: need at least one factor, each of size >= 1, got {factor_sizes}"
        )
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train, num_eval: must be positive, got {num_train}, {num_eval}")
    if batch_size < 2 or num_variance_estimate < 2:
        raise ValueError(
            f"batch_size, num_variance_estimate: variances need at least 2 samples, "
            f"got {batch_size}, {num_variance_estimate}"
        )
    rng = np.random.default_rng(seed)
    sample = _random_factors(rng, factor_sizes, num_variance_estimate)
    codes = np.concatenate(
        [
            _codes(code_fn, sample_images, sample[start : start + _CHUNK])
            for start in range(0, len(sample), _CHUNK)
        ]
    )
    global_std = codes.std(axis=0, ddof=1)
    active = np.flatnonzero(global_std >= prune_threshold)
    if len(active) == 0:
        return {
            "score": 0.0,
            "train_accuracy": 0.0,
            "active_dims": 0,
            "votes": {"active_dim_indices": [], "classifier": [], "train": [], "eval": []},
        }
    vote = (rng, code_fn, sample_images, factor_sizes, batch_size, active, global_std[active])
    train, held_out = _votes(num_train, *vote), _votes(num_eval, *vote)
    classifier = np.argmax(train, axis=1)
    dims = np.arange(len(active))
    return {
        "score": float(held_out[dims, classifier].sum() / num_eval),
        "train_accuracy": float(train[dims, classifier].sum() / num_train),
        "active_dims": int(len(active)),
        "votes": {
            "active_dim_indices": active.tolist(),
            "classifier": classifier.tolist(),
            "train": train.tolist(),
            "eval": held_out.tolist(),
        },
    }


# ----- helpers ------------------------------------------------------------------------------


def _check_pair(codes, factors) -> tuple[np.ndarray, np.ndarray]:
    codes, factors = np.asarray(codes, np.float64), np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(
            f"codes and factors: expected (n, d) and (n, k) with the same n, "
            f"got {codes.shape} and {factors.shape}"
        )
    if len(codes) == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes: need at least one row and one dimension, got {codes.shape}")
    if not np.isfinite(codes).all():
        raise ValueError("codes: hold NaN or infinite values")
    return codes, factors


def _discretize(x: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin index in ``[0, bins)`` over ``[min(x), max(x)]`` (the last bin closed)."""
    low, high = x.min(), x.max()
    if high <= low:
        return np.zeros(len(x), np.int64)
    index = np.floor((x - low) / (high - low) * bins).astype(np.int64)
    return np.minimum(index, bins - 1)


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Discrete mutual information (nats) of two label arrays with values ``0..m-1``."""
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb) / len(a)
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float(max((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum(), 0.0))


def _votes(
    count: int,
    rng: np.random.Generator,
    code_fn,
    sample_images,
    factor_sizes: tuple[int, ...],
    batch_size: int,
    active: np.ndarray,
    scale: np.ndarray,
) -> np.ndarray:
    """Vote counts ``len(active) x num_factors`` of `count` FactorVAE votes."""
    matrix = np.zeros((len(active), len(factor_sizes)), np.int64)
    for _ in range(count):
        k = int(rng.integers(len(factor_sizes)))
        rows = _random_factors(rng, factor_sizes, batch_size)
        rows[:, k] = rng.integers(factor_sizes[k])
        normalised = _codes(code_fn, sample_images, rows)[:, active] / scale
        matrix[int(np.argmin(normalised.var(axis=0, ddof=1))), k] += 1
    return matrix


def _random_factors(rng: np.random.Generator, factor_sizes: tuple[int, ...], n: int) -> np.ndarray:
    return rng.integers(0, factor_sizes, size=(n, len(factor_sizes)), dtype=np.int64)


def _codes(code_fn, sample_images, factors: np.ndarray) -> np.ndarray:
    codes = np.asarray(code_fn(sample_images(factors)), np.float64)
    if codes.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"code_fn: expected codes of shape ({len(factors)}, d), got {codes.shape}")
    return codes
