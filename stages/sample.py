"""Sample stage: trained priors + their autoencoder -> new images.

Steps (`sample_codes`, then `run`):

1. check that the priors cover every level of the autoencoder once and were trained on codes of
   this very autoencoder (the shards carry its key; a prior trained on other shards is refused);
2. sample the top level with its prior (KV-cached, one code per step), then each lower level
   given the levels above, with temperature, top-k, top-p and classifier-free guidance;
3. decode the codes with the autoencoder's ``decode_indices``.

Same seed and config give the same codes (one ``torch.Generator`` drives every draw).
Class-conditional priors sample ``per_class`` images for each class in ``classes``;
unconditional ones ``num_samples`` images.

Artifact: ``codes-00000.parquet`` (the sampled codes in the code-shard format, split
``sample``, label = conditioning class), ``images-sample-00000.parquet`` (the decoded images as an
image table, read by the evaluate stage) and ``samples.png`` (one row per class when
conditional).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.families import vqvae2_config
from models.io import MODEL_FILES
from models.prior import check_precision
from models.vqvae2 import VQVAE2
from pipeline.spec import is_stored
from pipeline.stage import Input
from stages.figures.png import grid, save_png
from stages.formats.codes import CodeShardMeta, ShardWriter, codes_table
from stages.formats.images import ImageTable, ImageTableMeta, write_image_table
from stages.sampling.priors import load_priors
from stages.training.harness import pick_device, use_bf16

VERSION = "2"  # 2: codes drawn by inverse CDF (other codes for the same seed than 1)
INPUTS = {
    "autoencoder": Input(kinds=("train_autoencoder",)),
    "priors": Input(kinds=("train_prior",), many=True),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Sampling options.

    Args:
        per_class: Images per class (class-conditional priors).
        classes: Classes to sample (empty: all).
        num_samples: Images to sample (unconditional priors).
        temperature: Softmax temperature (1: the model's distribution; 0: greedy).
        top_k: Keep the k most likely codes at each step (0: all).
        top_p: Keep the smallest set of codes with this much probability (1: all).
        guidance: Classifier-free guidance scale (1: plain conditional sampling; > 1 sharper).
        seed: Seed of every random draw (same seed and config -> same codes).
        batch_size: Grids sampled together.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        precision: Of the matrix products in the priors' decoders: ``fp32``; ``bf16``
            products and KV cache; ``fp16_weights``, fp16 weights times fp32 inputs (x86 CPUs:
            faster for large priors at small batches); ``auto``: bf16 on GPUs with it
            and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32.
        png_per_class: Images per class row in ``samples.png``.
    """

    per_class: int = 10
    classes: list[int] = ()
    num_samples: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16_weights"] = "auto"
    png_per_class: int = 12

    def __post_init__(self):
        for name in ("per_class", "num_samples", "batch_size", "png_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.guidance < 0:
            raise ValueError(f"guidance: must be >= 0, got {self.guidance}")


def check_upstream(config: Config, step, steps: dict) -> None:
    """Before anything runs: every prior was trained on codes of this autoencoder, and the priors
    cover its levels once (the checks `load_priors` makes on the artifacts)."""
    autoencoder = _key_of(step.inputs["autoencoder"], steps)
    levels = []
    for name in step.inputs["priors"]:
        prior = steps[name]
        if prior.artifact is not None:  # stored: its metrics name the shards' autoencoder
            trained_on = prior.artifact.metrics.get("autoencoder_key")
        else:
            trained_on = _key_of(steps[prior.inputs["codes"]].inputs["autoencoder"], steps)
        if trained_on != autoencoder:
            raise ValueError(
                f"inputs.priors: {name} was trained on codes of autoencoder "
                f"{str(trained_on)[:12]}, but inputs.autoencoder is {autoencoder[:12]}; train "
                "the prior on the codes of this autoencoder"
            )
        levels.append(prior.config.level)
    model = steps[step.inputs["autoencoder"]].config.model
    names = getattr(model, "level_names", None)
    if names is not None and sorted(levels) != sorted(names):
        raise ValueError(
            f"inputs.priors: the priors' levels are {', '.join(levels)}; the autoencoder has "
            f"{', '.join(names)}: give one prior per level"
        )


def _key_of(name: str, steps: dict) -> str:
    """The artifact key of an input: a step's, or a stored ``stage/key``'s own."""
    return name.split("/", 1)[1] if is_stored(name) else steps[name].key


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Samples images; writes codes, images and ``samples.png`` into `out`."""
    autoencoder_artifact, prior_artifacts = inputs["autoencoder"], inputs["priors"]
    ae_config = vqvae2_config(
        json.loads(autoencoder_artifact.read_bytes("config.json")), autoencoder_artifact.uri
    )
    device = pick_device(config.device)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if use_bf16(precision, device) else "fp32"
    check_precision(precision, device)  # fp16_weights on a GPU or a non-x86 CPU: one line
    priors, class_names = load_priors(prior_artifacts, autoencoder_artifact, ae_config)
    labels = labels_for(config, class_names)
    start = time.perf_counter()
    codes = sample_codes(priors, labels, config, device, precision)
    sample_seconds = time.perf_counter() - start
    model = VQVAE2.load(autoencoder_artifact.local_dir(*MODEL_FILES)).to(device).eval()
    images = decode(model, codes, config.batch_size, device)
    seconds = time.perf_counter() - start
    tokens = sum(v.numel() for v in codes.values())
    log.info(
        "sample: %d images (%d codes, %s) in %.1fs, %.0f codes/s",
        len(images),
        tokens,
        precision,
        seconds,
        tokens / sample_seconds,
    )

    meta = CodeShardMeta(
        level_names=ae_config.level_names,
        grid_shapes={k: list(v) for k, v in ae_config.grid_shapes().items()},
        codebook_sizes={n: ae_config.codebook_size for n in ae_config.level_names},
        autoencoder_key=autoencoder_artifact.key,
        class_names=class_names,
    )
    ids = np.arange(len(images))
    labels_np = labels.numpy() if labels is not None else np.full(len(ids), -1)
    writer = ShardWriter(out, meta, target_bytes=1 << 30)
    writer.write(
        codes_table(
            meta, ids, labels_np, ["sample"] * len(ids), {k: v.numpy() for k, v in codes.items()}
        )
    )
    writer.close()
    h, w = images.shape[1:3]
    table_meta = ImageTableMeta(
        height=h, width=w, channels=images.shape[3], class_names=class_names
    )
    write_image_table(
        out, ImageTable(table_meta, ids, labels_np, np.array(["sample"] * len(ids)), images)
    )
    _samples_png(images, labels_np, class_names, config, out / "samples.png")
    return {
        "images": len(ids),
        "codes": tokens,
        "seconds": seconds,
        "codes_per_s": tokens / sample_seconds,
        "conditional": bool(class_names),
        "precision": precision,
        "class_names": class_names,
        "autoencoder_key": autoencoder_artifact.key,
        "prior_keys": {lv: a.key for lv, (_, a) in priors.items()},
    }


def labels_for(config: Config, class_names: list[str]) -> torch.Tensor | None:
    """The class of each image to sample (``classes`` x ``per_class``), or None when the
    priors are unconditional."""
    if not class_names:
        return None
    classes = list(config.classes) or list(range(len(class_names)))
    bad = [c for c in classes if not 0 <= c < len(class_names)]
    if bad:
        raise ValueError(f"classes: {bad} out of range; the priors know {len(class_names)} classes")
    return torch.tensor(classes).repeat_interleave(config.per_class)


@torch.no_grad()
def sample_codes(
    priors: dict,
    labels: torch.Tensor | None,
    config: Config,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Samples every level, top first; returns level -> ``n h w`` int64 codes (CPU)."""
    n = len(labels) if labels is not None else config.num_samples
    generator = torch.Generator().manual_seed(config.seed)
    order = sorted(priors, key=lambda lv: len(priors[lv][0].config.context_grids))  # top first
    codes: dict[str, torch.Tensor] = {}
    for level in order:
        prior = priors[level][0].to(device).eval()
        parts = []
        began = time.perf_counter()
        for start in range(0, n, config.batch_size):
            stop = min(n, start + config.batch_size)
            context = {k: codes[k][start:stop].to(device) for k in prior.config.context_grids}
            parts.append(
                prior.sample(
                    stop - start,
                    context=context,
                    labels=labels[start:stop] if labels is not None else None,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    guidance=config.guidance,
                    generator=generator,
                    precision=precision,
                ).cpu()
            )
            log.info(
                "sample: %s level, %d/%d images, %.1fs", level, stop, n, time.perf_counter() - began
            )
        codes[level] = torch.cat(parts)
    return codes


@torch.no_grad()
def decode(
    model: VQVAE2, codes: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> np.ndarray:
    """Codes -> uint8 images ``n h w c``."""
    n = len(next(iter(codes.values())))
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in codes.items()}
        x = model.decode_indices(batch).float().clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def _samples_png(images, labels, class_names, config: Config, path: Path) -> None:
    if class_names:
        rows = [images[labels == c][: config.png_per_class] for c in sorted(set(labels.tolist()))]
        nrow = max(len(r) for r in rows)
        blank = np.full_like(images[:1], 255)
        rows = [np.concatenate([r, blank.repeat(nrow - len(r), 0)]) for r in rows]
        tiles = np.concatenate(rows)
    else:
        tiles, nrow = images[:64], min(8, len(images))
    save_png(grid(tiles, nrow=nrow, scale=2), path)
