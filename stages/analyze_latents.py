"""Analyze-latents stage: what a trained continuous autoencoder's latents mean, with pictures.

Inputs: a `train_autoencoder` artifact of a non-quantized family (``autoencoder``, ...,
``vae``, ``beta_vae``, ``cvae``) and the image table it was trained on. Images go in as the
training stage fed them (``[0, 1]``, binarized the same way, held-out images with one fixed
draw). The held-out images are the ``split`` option's (``val`` by default; ``test`` for figures
comparable with published ones, e.g. MNIST's t10k set).

Pictures:

- ``traversals.png``: one row per latent dimension (the most used first: by mean KL for VAEs,
  by code variance otherwise), each dimension swept over ``±traversal_range`` (prior standard
  deviations for VAEs, code standard deviations otherwise) around a val image's code while the
  others stay fixed;
- ``interpolations.png``: decodings along the straight line between two val images' codes
  (posterior means), the two originals at the ends;
- ``class_swap.png`` (``cvae``): each val image's code decoded with every class label.

Figures (``metrics.json``):

- ``iw_nll``: importance-weighted NLL in nats on the val images (VAE-type models; Burda et al.
  2016 with ``iw_samples`` samples), ``neg_elbo`` beside it, ``kl_per_dim`` and
  ``active_units`` (dimensions with ``Cov_x E_q[z_j] > 0.01``, Burda et al.);
- ``probe_accuracy`` (labelled tables): a linear classifier (multinomial logistic regression) fit
  on the train images' codes, scored on the val images' codes: how linearly readable the class
  is from the code;
- on tables with ground-truth factors (dSprites): ``mig`` (Chen et al. 2018, from the posterior
  means of the first ``mig_images`` train images and their stored factors) and ``factor_vae_score`` (Kim & Mnih
  2018, on images rendered for the votes).

Every image set is bounded by an option and read a row group at a time (the first rows of a
split: `stages.formats.image_stream.read_rows`), so the table may be larger than memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.families import is_quantized, load
from models.io import MODEL_FILES
from pipeline.stage import Input
from stages.figures.png import grid, save_png
from stages.formats.image_stream import read_rows
from stages.formats.images import image_table_meta
from stages.formats.pixels import to_uint8, to_unit
from stages.metrics.disentanglement import factor_vae_score, mig
from stages.sources import dsprites

VERSION = "2"  # 2: streamed reads; MIG on the first train images (was a sample of all)
INPUTS = {
    "autoencoder": Input(kinds=("train_autoencoder",)),
    "images": Input(kinds=("ingest",)),
}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Analysis options.

    Args:
        traversal_dims: Latent dimensions shown in ``traversals.png`` (the most used first).
        traversal_range: Sweep ``±range`` standard deviations around the reference code.
        traversal_steps: Images per traversal row.
        interpolation_pairs: Rows of ``interpolations.png``.
        interpolation_steps: Decodings between the two ends of a row.
        iw_samples: Importance samples per image for ``iw_nll`` (k; 0 skips it).
        iw_images: Val images the NLL is averaged over.
        mig_images: Train images (the first, in table order) whose codes give MIG.
        factor_vae_votes: Train and eval votes each for the FactorVAE metric (0 skips it).
        factor_vae_batch: Images per vote (L in Kim & Mnih).
        probe_images: Train images whose codes fit the linear probe (0 skips it).
        split: The held-out split the figures and pictures use (``val`` or ``test``).
        seed: Seed of the images picked and of the samples drawn.
    """

    traversal_dims: int = 10
    traversal_range: float = 2.5
    traversal_steps: int = 9
    interpolation_pairs: int = 6
    interpolation_steps: int = 8
    iw_samples: int = 500
    iw_images: int = 1000
    mig_images: int = 10_000
    factor_vae_votes: int = 500
    factor_vae_batch: int = 64
    probe_images: int = 5000
    split: Literal["val", "test"] = "val"
    seed: int = 0

    def __post_init__(self):
        for name in ("traversal_dims", "traversal_steps", "interpolation_steps", "mig_images"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be at least 2, got {getattr(self, name)}")
        for name in ("iw_samples", "iw_images", "factor_vae_votes", "interpolation_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.traversal_range <= 0:
            raise ValueError(f"traversal_range: must be positive, got {self.traversal_range}")


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Writes the pictures and figures listed in the module docstring into `out`."""
    artifact = inputs["autoencoder"]
    model = load(artifact.local_dir(*MODEL_FILES)).eval()
    if is_quantized(model):
        raise ValueError(
            f"{artifact.uri} is a VQ-VAE-2 (discrete codes); analyze_latents takes the "
            "continuous families (autoencoder ... vae, beta_vae, cvae)"
        )
    binarize = artifact.config.get("train", {}).get("binarize", "none")
    images = inputs["images"]
    meta = image_table_meta(images)
    val = read_rows(images, config.split, max(config.iw_images, 64))
    if len(val) == 0:
        raise ValueError(f"{inputs['images'].uri}: has no {config.split!r} images; set split")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)

    def prepare(images: np.ndarray) -> torch.Tensor:
        return to_unit(torch.from_numpy(images), torch.device("cpu"), binarize, generator)

    x_val = prepare(val.images[: max(config.iw_images, 64)])
    y_val = torch.from_numpy(val.labels[: len(x_val)].astype(np.int64))
    labels = y_val if model.config.family == "cvae" else None
    metrics: dict = {"family": model.config.family, "latent_dim": model.config.latent_dim}

    with torch.no_grad():
        codes = _batched(lambda x, y: model.encode(x, y), x_val, labels)
        usage = _usage(model, x_val, labels, codes)
    order = np.argsort(-usage)[: config.traversal_dims]
    metrics["active_units"] = int((codes.var(0) > 0.01).sum())
    if hasattr(model, "posterior"):
        metrics["kl_per_dim"] = [round(float(u), 4) for u in usage]
    _traversals(model, codes, labels, order, config, out / "traversals.png")
    if config.interpolation_pairs:
        _interpolations(model, x_val, codes, labels, config, out / "interpolations.png")
    if model.config.family == "cvae":
        _class_swap(model, x_val[:8], codes[:8], len(meta.class_names), out)

    if hasattr(model, "iw_nll") and config.iw_samples and config.iw_images:
        start = time.perf_counter()
        x = x_val[: config.iw_images]
        y = None if labels is None else labels[: len(x)]
        with torch.no_grad():
            nll = _batched(lambda a, b: model.iw_nll(a, config.iw_samples, b), x, y, 50)
            neg_elbo = _batched(lambda a, b: model.iw_nll(a, 1, b), x, y, 50)
        metrics.update(
            iw_nll=float(nll.mean()),
            iw_nll_stderr=float(nll.std() / np.sqrt(len(nll))),
            neg_elbo=float(neg_elbo.mean()),
            iw_samples=config.iw_samples,
            iw_images=len(x),
        )
        log.info(
            "analyze_latents: IW-NLL %.2f nats (k=%d, %d %s images, %.0f s), -ELBO %.2f",
            metrics["iw_nll"],
            config.iw_samples,
            len(x),
            config.split,
            time.perf_counter() - start,
            metrics["neg_elbo"],
        )

    if meta.factor_names:
        metrics.update(
            _disentanglement(model, read_rows(images, "train", config.mig_images), prepare, config)
        )
    train = read_rows(images, "train", config.probe_images)
    if config.probe_images and (train.labels >= 0).any() and (y_val >= 0).all():
        x_train = prepare(train.images)
        y_train = torch.from_numpy(train.labels[: len(x_train)].astype(np.int64))
        with torch.no_grad():
            train_codes = _batched(
                lambda x, y: model.encode(x, y), x_train, y_train if labels is not None else None
            )
        metrics["probe_accuracy"] = linear_probe(train_codes, y_train, codes, y_val)
    log.info(
        "analyze_latents: %s",
        ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
    )
    return metrics


# ----- pieces -------------------------------------------------------------------------------


def _batched(fn, x: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256):
    parts = []
    for start in range(0, len(x), batch_size):
        y = None if labels is None else labels[start : start + batch_size]
        parts.append(fn(x[start : start + batch_size], y).float().cpu())
    return torch.cat(parts)


def linear_probe(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decay: float = 1e-4,
) -> float:
    """Accuracy on the test codes of a multinomial logistic regression fit on the train codes.

    Codes are standardised with the train statistics; the fit is full-batch L-BFGS on the
    cross-entropy plus ``weight_decay * |W|^2``.
    """
    mean, std = train_codes.mean(0), train_codes.std(0).clamp_min(1e-6)
    a, b = (train_codes - mean) / std, (test_codes - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    linear = torch.nn.Linear(a.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(a), train_labels)
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((linear(b).argmax(1) == test_labels).float().mean())


def _usage(model, x: torch.Tensor, labels, codes: torch.Tensor) -> np.ndarray:
    """Per-dimension use: mean KL(q(z_j|x) || N(0, 1)) for VAEs, code variance otherwise."""
    if not hasattr(model, "posterior"):
        return codes.var(0).numpy()
    kl = []
    for start in range(0, len(x), 256):
        y = None if labels is None else labels[start : start + 256]
        mu, logvar = model.posterior(x[start : start + 256], y)
        kl.append(0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float()))
    return torch.cat(kl).mean(0).numpy()


@torch.no_grad()
def _traversals(model, codes, labels, order, config: Config, path: Path) -> None:
    """Rows: latent dims in `order`; columns: that dim swept, the others at a val image's code."""
    vae = hasattr(model, "posterior")
    scale = torch.ones(codes.shape[1]) if vae else codes.std(0)
    centre = torch.zeros(codes.shape[1]) if vae else codes.mean(0)
    steps = torch.linspace(-config.traversal_range, config.traversal_range, config.traversal_steps)
    reference = codes[0]
    rows = []
    for dim in order:
        z = reference.repeat(len(steps), 1)
        z[:, dim] = centre[dim] + steps * scale[dim]
        y = None if labels is None else labels[:1].repeat(len(steps))
        rows.append(model.decode(z, y))
    save_png(grid(to_uint8(torch.cat(rows)), nrow=len(steps), scale=2), path)


@torch.no_grad()
def _interpolations(model, x, codes, labels, config: Config, path: Path) -> None:
    """Rows: original a, decodings along codes a -> b, original b."""
    pairs = min(config.interpolation_pairs, len(x) // 2)
    weights = torch.linspace(0, 1, config.interpolation_steps)[:, None]
    rows = []
    for i in range(pairs):
        a, b = 2 * i, 2 * i + 1
        z = (1 - weights) * codes[a] + weights * codes[b]
        y = None
        if labels is not None:  # the conditional model keeps a's class along the row
            y = labels[a : a + 1].repeat(len(z))
        rows += [x[a : a + 1], model.decode(z, y), x[b : b + 1]]
    save_png(grid(to_uint8(torch.cat(rows)), nrow=config.interpolation_steps + 2, scale=2), path)


@torch.no_grad()
def _class_swap(model, x, codes, num_classes: int, out: Path) -> None:
    """Rows: a val image, then its code decoded with each class label."""
    rows = []
    for i in range(len(x)):
        z = codes[i].repeat(num_classes, 1)
        rows += [x[i : i + 1], model.decode(z, torch.arange(num_classes))]
    save_png(grid(to_uint8(torch.cat(rows)), nrow=num_classes + 1, scale=2), out / "class_swap.png")


def _disentanglement(model, table, prepare, config: Config) -> dict:
    """MIG on `table`'s images and factors; the FactorVAE score on rendered dSprites."""

    def code_fn(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _batched(lambda x, y: model.encode(x, y), prepare(images), None).numpy()

    start = time.perf_counter()
    result = mig(code_fn(table.images), table.factors)
    metrics = {
        "mig": result["mig"],
        "mig_per_factor": dict(zip(table.meta.factor_names, result["per_factor"], strict=True)),
    }
    if config.factor_vae_votes and list(table.meta.factor_names) == list(dsprites.FACTOR_NAMES):
        size = table.meta.height
        score = factor_vae_score(
            code_fn,
            dsprites.FACTOR_SIZES,
            lambda factors: dsprites.render_batch(factors, size),
            num_train=config.factor_vae_votes,
            num_eval=config.factor_vae_votes,
            batch_size=config.factor_vae_batch,
            seed=config.seed,
        )
        metrics["factor_vae_score"] = score["score"]
        metrics["factor_vae_active_dims"] = score["active_dims"]
    log.info(
        "analyze_latents: MIG %.3f%s (%.0f s)",
        metrics["mig"],
        f", FactorVAE score {metrics['factor_vae_score']:.3f}"
        if "factor_vae_score" in metrics
        else "",
        time.perf_counter() - start,
    )
    return metrics
