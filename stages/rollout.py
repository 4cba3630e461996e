"""Rollout stage: a trained TD-VAE + held-out sequences -> predictive figures and rollouts.png.

For every held-out sequence the model sees the first ``context`` frames (``t = 0..k-1``) and
predicts frame ``k - 1 + Δ`` for ``Δ = 1..max_delta`` with one jump of size Δ from the belief
at ``k - 1`` (`models.tdvae.TDVAE.predict`); the prediction is the mean over ``samples`` latent
draws of the decoded pixel probabilities. Frames are used as the model was trained on them:
thresholded at 0.5 for ``binarize: threshold``, else grey values in [0, 1] (the expected value
of ``dynamic`` binarization). Scored against the true frame:

- ``bce``: binary cross-entropy summed over the frame's pixels (nats per frame);
- ``mse``: mean squared error per pixel.

Two baselines are scored on the same frames in the same run: ``copy_last`` (predict the last
observed frame ``x_{k-1}`` for every Δ) and ``mean_frame`` (the pixelwise mean of the train
frames, in the same form). Every prediction's probabilities are clipped to ``[eps, 1 - eps]``
before the BCE, so a baseline's confident mistakes cost a finite amount. ``val_bound``: the
negative TD-VAE objective on these sequences in nats per predicted frame (random (t1, Δ)
pairs, fixed seed).

``rollouts.png``: for each of ``rollout_sequences`` sequences, one row of true frames
(``0..k-1`` then every ``rollout_jump``-th frame after) above ``rollout_samples`` rows of
sampled futures (the observed frames repeated, then the decoded jumps), so the spread of the
futures is visible. Artifact: ``predictions.json`` (the per-Δ table), ``rollouts.png``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from einops import rearrange, repeat

from models.io import MODEL_FILES
from models.tdvae import TDVAE
from pipeline.stage import Input
from stages.figures.png import grid, save_png
from stages.formats.pixels import to_frames
from stages.formats.sequences import read_sequence_rows, sequence_blocks, sequence_groups
from stages.metrics.tdvae import evaluate

VERSION = "2"  # 2: frames scored in the form the model was trained on
INPUTS = {
    "model": Input(kinds=("train_sequence",)),
    "sequences": Input(kinds=("ingest_sequences",)),
}
PREDICTORS = ("model", "copy_last", "mean_frame")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Rollout and scoring options.

    Args:
        context: Observed frames ``k`` before predicting.
        max_delta: Largest jump scored (None: the model's ``max_jump``); must fit
            ``context + max_delta <= frames``.
        samples: Latent draws averaged per prediction.
        sequences: Held-out sequences scored (at most).
        split: Held-out split (``val`` or ``test``).
        eps: Probabilities are clipped to ``[eps, 1 - eps]`` for the BCE.
        rollout_sequences: Sequences shown in ``rollouts.png``.
        rollout_samples: Sampled futures per shown sequence.
        rollout_jump: Jump size of the rollouts.
        seed: Seed of the latent samples and the bound's pairs.
    """

    context: int = 5
    max_delta: int | None = None
    samples: int = 8
    sequences: int = 1000
    split: Literal["val", "test"] = "val"
    eps: float = 1e-3
    rollout_sequences: int = 4
    rollout_samples: int = 3
    rollout_jump: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("context", "samples", "sequences", "rollout_sequences", "rollout_jump"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_delta is not None and self.max_delta < 1:
            raise ValueError(f"max_delta: must be positive or null, got {self.max_delta}")
        if self.rollout_samples < 2:
            raise ValueError("rollout_samples: at least 2, so the spread of futures shows")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"eps: must be in (0, 0.5), got {self.eps}")


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Scores the predictions, draws the rollouts; writes the artifact files into `out`."""
    artifact = inputs["model"]
    model = TDVAE.load(artifact.local_dir(*MODEL_FILES)).eval()
    binarize = artifact.config.get("train", {}).get("binarize", "none")
    sequences = inputs["sequences"]
    held_out = read_sequence_rows(sequences, config.split, config.sequences)
    if len(held_out) == 0:
        raise ValueError(f"{inputs['sequences'].uri}: has no {config.split!r} sequences; set split")
    frames = held_out.shape[1]
    max_delta = config.max_delta or model.config.max_jump
    if max_delta > model.config.max_jump:
        raise ValueError(
            f"max_delta {max_delta} is larger than the model's max_jump {model.config.max_jump}"
        )
    if config.context + max_delta > frames:
        raise ValueError(
            f"context {config.context} + max_delta {max_delta} exceeds the {frames} frames of "
            "a sequence; lower one of them"
        )
    generator = torch.Generator().manual_seed(config.seed)
    cpu = torch.device("cpu")
    seen_as = "threshold" if binarize == "threshold" else "none"  # deterministic forms only
    x = to_frames(torch.from_numpy(held_out), cpu, seen_as)
    mean_frame, count = torch.zeros(x.shape[2:]), 0  # over every train frame, a group at a time
    for block in sequence_blocks(sequences, sequence_groups(sequences, "train"), "train"):
        for start in range(0, len(block["frames"]), 512):
            chunk = to_frames(torch.from_numpy(block["frames"][start : start + 512]), cpu, seen_as)
            mean_frame += chunk.sum((0, 1))
            count += chunk.shape[0] * chunk.shape[1]
    mean_frame /= max(count, 1)

    deltas = list(range(1, max_delta + 1))
    k = config.context
    sums = {f"{who}_{m}": np.zeros(max_delta) for who in PREDICTORS for m in ("bce", "mse")}
    for start in range(0, len(x), 128):
        batch = x[start : start + 128]
        predicted = model.predict(batch[:, :k], deltas, config.samples, generator).mean(0)
        targets = batch[:, k - 1 + np.array(deltas)]  # b n c h w
        guesses = {
            "model": predicted,
            "copy_last": repeat(batch[:, k - 1], "b c h w -> b n c h w", n=max_delta),
            "mean_frame": repeat(mean_frame, "c h w -> b n c h w", b=len(batch), n=max_delta),
        }
        for who, guess in guesses.items():
            bce, mse = _scores(guess, targets, config.eps)
            sums[f"{who}_bce"] += bce.sum(0).numpy()
            sums[f"{who}_mse"] += mse.sum(0).numpy()
    table_rows = [
        {"delta": d, **{key: float(v[i] / len(x)) for key, v in sums.items()}}
        for i, d in enumerate(deltas)
    ]
    binarized = to_frames(
        torch.from_numpy(held_out), cpu, binarize, torch.Generator().manual_seed(1)
    )
    bound = evaluate(model, binarized, cpu, seed=config.seed)["val_loss"]
    metrics = {
        "split": config.split,
        "sequences": len(x),
        "context": k,
        "samples": config.samples,
        "val_bound": bound,
        "beats_copy_last_from_delta_2": all(
            r["model_bce"] < r["copy_last_bce"] and r["model_mse"] < r["copy_last_mse"]
            for r in table_rows
            if r["delta"] >= 2
        ),
        "beats_mean_frame": all(
            r["model_bce"] < r["mean_frame_bce"] and r["model_mse"] < r["mean_frame_mse"]
            for r in table_rows
        ),
        "per_delta": table_rows,
    }
    for r in table_rows:
        log.info(
            "rollout: Δ=%d  BCE model %.1f copy-last %.1f mean %.1f | MSE model %.4f "
            "copy-last %.4f mean %.4f",
            r["delta"],
            r["model_bce"],
            r["copy_last_bce"],
            r["mean_frame_bce"],
            r["model_mse"],
            r["copy_last_mse"],
            r["mean_frame_mse"],
        )
    (out / "predictions.json").write_text(json.dumps(metrics, indent=2))
    _rollouts_png(model, x, config, generator, out / "rollouts.png")
    return metrics


def _scores(guess: torch.Tensor, target: torch.Tensor, eps: float):
    """Per-sequence, per-Δ BCE (summed over pixels) and MSE (mean over pixels): ``b n`` each."""
    p = guess.clamp(eps, 1 - eps)
    bce = -(target * p.log() + (1 - target) * (1 - p).log())
    return bce.flatten(2).sum(-1), (guess - target).pow(2).flatten(2).mean(-1)


@torch.no_grad()
def _rollouts_png(model, x, config: Config, generator, path: Path) -> None:
    """True frames above sampled futures, per shown sequence (see the module docstring)."""
    k, jump = config.context, config.rollout_jump
    steps = (x.shape[1] - k) // jump
    if steps < 1:
        raise ValueError(f"rollout_jump {jump} leaves no frame to predict after the context")
    shown = x[: config.rollout_sequences]
    futures = model.rollout(shown[:, :k], steps, jump, config.rollout_samples, generator)
    truth = shown[:, [*range(k), *range(k - 1 + jump, k - 1 + jump * steps + 1, jump)]]
    rows = []
    for i in range(len(shown)):
        rows.append(truth[i])
        for s in range(config.rollout_samples):
            rows.append(torch.cat([shown[i, :k], futures[s, i]]))
    images = rearrange(torch.stack(rows), "r n c h w -> (r n) h w c")
    uint8 = (images.clamp(0, 1) * 255).round().byte().numpy()
    save_png(grid(uint8, nrow=k + steps, scale=2), path)
