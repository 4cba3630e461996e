"""Train-autoencoder stage: an image table -> a trained autoencoder artifact.

``model.family`` picks the model (`models.families`): ``vqvae2`` (the default; codes for the
prior), or one of the classic families ``autoencoder``, ``denoising``, ``sparse``, ``ksparse``,
``contractive``, ``vae``, ``beta_vae``, ``cvae``. VQ-VAE-2 sees images in [-1, 1]; the other
families see [0, 1], optionally binarized (``train.binarize``) for Bernoulli likelihoods.

Data streams (`stages.formats.image_stream`): each worker reads its share of the train split's
row groups through Ray Data, in a seeded order that changes every epoch, and draws batches
through a local shuffle buffer of ``train.shuffle_buffer`` images; in-process training streams
the same plan, reading its row groups in its own process (no Ray Data pipeline to start for a
loop that holds the CPUs anyway). No process holds the table: memory grows with the batch, not the dataset. The
val figures use the first ``train.val_images`` images of the val split (fixed, bounded).

The training loop (`train_loop`) is written out once and runs either in this process
(``train.workers: 0``) or as Ray Train's ``train_loop_per_worker`` under a ``TorchTrainer`` with
N DDP workers (``train.workers: N``, the default 1); `stages.training.launch` picks the
session object handed to it (rank, device, checkpoint I/O, reporting).

Checkpoints (``model.safetensors`` + ``config.json`` + ``state.pt`` with optimizer, step, RNG
and metric history) are written every ``checkpoint_every`` steps into the stage's scratch
location, through Ray Train when it runs there (``RunConfig(name, storage_path)``). A rerun of an
interrupted stage resumes from the last checkpoint, at the place in the data where it stopped
(give or take one row group and one shuffle buffer of images). A non-finite loss stops training with an
error naming the step; checkpoints written before it are kept.

Artifact: ``config.json``, ``model.safetensors``, ``metrics.json`` (loss terms, per-level
perplexity and codebook usage over training; val MSE, PSNR and per-level usage at the end) and
``reconstructions.png`` (val originals above their reconstructions).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.families import ModelConfig, build, is_quantized
from models.families import load as load_model
from models.vqvae2 import VQVAE2, VQVAE2Config
from pipeline.config import from_dict, to_dict
from pipeline.stage import Input
from stages.figures.png import grid, save_png
from stages.formats import image_stream
from stages.formats.images import image_table_meta
from stages.formats.pixels import to_signed, to_uint8, to_unit
from stages.training import harness, loop
from stages.training.harness import train_into, use_bf16, where

VERSION = "2"  # 2: streamed epochs of a shuffled order (1 drew batches with replacement)
INPUTS = {"images": Input(kinds=("ingest",))}
DEFAULT_NUM_CPUS = 0  # the Ray task only coordinates; Ray Train workers reserve the CPUs
SCORE = ("val_mse", "min")  # `twostage ls --metrics` ranks by it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderTrainConfig(loop.TrainConfig):
    """The shared training options (`stages.training.loop.TrainConfig`; ``batch_size`` counts
    images, Adam) and the autoencoders' own.

    Args:
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where the hardware has fast
            bf16: CUDA with bf16, CPUs with AVX512-BF16 or AMX).
        channels_last: Use the channels-last memory format (faster convolutions on CPU and GPU).
        val_images: At most this many val images are evaluated (held in memory on rank 0).
        shuffle_buffer: Images in each worker's local shuffle buffer (memory: this many
            images; the default 4,096 is 4 MB at 32px grey, 800 MB at 256px RGB).
        binarize: For the non-quantized families: ``none`` keeps grey levels in [0, 1];
            ``threshold`` maps pixels above 0.5 to 1; ``dynamic`` draws each pixel as 1 with
            its intensity as probability, afresh for every batch (val images: one fixed draw).
    """

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    val_images: int = 10_000
    shuffle_buffer: int = 4096
    binarize: Literal["none", "threshold", "dynamic"] = "none"


@dataclass(frozen=True)
class Config:
    """Stage options: the model and how to train it."""

    model: ModelConfig = field(default_factory=VQVAE2Config)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)


# ----- the stage ------------------------------------------------------------------------------


def worker_requests(config: Config) -> list[dict[str, float]]:
    """What each Ray Train worker asks for, for the runner to check against the nodes."""
    return harness.worker_requests(config.train)


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Trains the autoencoder on the ``images`` input; writes the artifact files into `out`."""
    artifact = inputs["images"]
    meta = _check_images(config, artifact)
    log.info(
        "train_autoencoder: %s, %d steps of %d images, %s",
        _describe(config.model),
        config.train.steps,
        config.train.batch_size,
        where(config.train),
    )
    images_ref = {"store": artifact.store.spec, "stage": artifact.stage, "key": artifact.key}
    metrics, history = train_into(
        out, _loop, {"config": to_dict(config), "images": images_ref}, config.train, scratch
    )
    model = load_model(out)
    table = image_stream.read_rows(artifact, "val", 24)
    if len(table) == 0:
        table = image_stream.read_rows(artifact, "train", 24)
    _reconstructions(model, table, config.train.binarize, out / "reconstructions.png")
    metrics = {**metrics, "image_shape": [meta.height, meta.width, meta.channels]}
    (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    return metrics


def _describe(model) -> str:
    if model.family != "vqvae2":
        return f"{model.family} autoencoder, {model.latent_dim} latent dims"
    grids = ", ".join(f"{k} {h}x{w}" for k, (h, w) in model.grid_shapes().items())
    return f"VQ-VAE-2 {model.levels} level(s) ({grids}), {model.codebook_size} codes"


def check_upstream(config: Config, step, steps: dict) -> None:
    """Before anything runs: the model takes the images its ingest step will write, where that
    step tells (its stage's ``image_shape(config)``; the same checks as `_check_images`)."""
    upstream = steps[step.inputs["images"]]
    image_shape = getattr(upstream.module, "image_shape", None)
    if image_shape is not None:
        _check_shape(config.model, *image_shape(upstream.config))


def _check_images(config: Config, artifact):
    meta = image_table_meta(artifact)
    if meta.height != meta.width:
        raise ValueError(
            f"the images are {meta.height}x{meta.width}; the autoencoders take square images: "
            "set the ingest step's image_size"
        )
    _check_shape(config.model, meta.height, meta.channels, len(meta.class_names))
    return meta


def _check_shape(model, side: int | None, channels: int | None, classes: int | None) -> None:
    """ValueError naming the option to change when `model` cannot take square images of `side`
    pixels, `channels` and `classes` (None: not known yet)."""
    if side is not None and side != model.image_size:
        raise ValueError(
            f"model.image_size is {model.image_size} but the images are {side}x{side}; "
            f"set the ingest step's image_size: {model.image_size} (pads 28 -> 32) or "
            f"model.image_size: {side}"
        )
    if channels is not None and channels != model.in_channels:
        raise ValueError(
            f"model.in_channels is {model.in_channels} but the images have {channels} "
            f"channel(s); set model.in_channels: {channels} or the ingest step's channels"
        )
    if model.family == "cvae" and classes is not None and classes != model.num_classes:
        raise ValueError(
            f"model.num_classes is {model.num_classes} but the images have {classes} classes; "
            f"set model.num_classes: {classes}"
        )


def _loop(loop_config: dict, session) -> dict:
    """The loop as `stages.training.launch` calls it: rebuild the config, then train."""
    config = from_dict(Config, loop_config["config"], "")
    return train_loop(config, loop_config["images"], session)


# ----- the loop -------------------------------------------------------------------------------


def train_loop(config: Config, images_ref: dict, session) -> dict:
    """Trains a VQ-VAE-2; checkpoints and reports through `session`. Returns final metrics."""
    from pipeline.store import Store

    train = config.train
    torch.set_num_threads(max(1, session.cpus))
    artifact = Store(images_ref["store"]).open(images_ref["stage"], images_ref["key"])
    train_groups = image_stream.groups(artifact, "train")
    if not train_groups:
        raise ValueError("the image table has no train split")
    val = image_stream.read_rows(artifact, "val", train.val_images if session.rank == 0 else 0)
    val_images = torch.from_numpy(val.images)
    val_labels = torch.from_numpy(val.labels.astype(np.int64))

    device = session.device
    bf16 = use_bf16(train.precision, device)
    torch.manual_seed(train.seed)  # same initial weights on every rank
    model = build(config.model)
    quantized = is_quantized(model)
    if not quantized:  # the val images' one binarization, the same at every evaluation
        val_images = to_unit(
            val_images, torch.device("cpu"), train.binarize, torch.Generator().manual_seed(1)
        )
    generator = torch.Generator().manual_seed(train.seed * 1000 + session.rank)
    start_step = 0
    resume_dir, state, history = loop.resume(session, model)
    if resume_dir is not None:
        start_step = int(state["step"])
        generator.set_state(state["rng"][session.rank % len(state["rng"])])
        if session.rank == 0:
            log.info("train_autoencoder: resuming from the checkpoint at step %d", start_step)
    if train.channels_last and quantized:
        model = model.to(memory_format=torch.channels_last)
    wrapped = session.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    batches = _train_batches(artifact, train_groups, train, session, start_step)
    window = loop.Window("images_per_s")
    last_good = start_step if resume_dir is not None else None
    final_metrics = {}
    for step in range(start_step, train.steps):
        lr = loop.apply_lr(optimizer, loop.cosine_lr(step, train))
        batch = next(batches)
        images, labels = batch["image"], batch["label"]
        if config.model.family == "cvae" and bool((labels < 0).any()):
            raise ValueError("model.family cvae needs a label for every training image")
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if quantized:
                out = wrapped(to_signed(images, device, train.channels_last))
            else:
                x = to_unit(images, device, train.binarize, generator)
                out = wrapped(x, labels.to(device))
        terms = {k: v for k, v in out.items() if not torch.is_tensor(v) or v.ndim == 0}
        loss = out["loss"]
        loop.check_finite(
            loss,
            step,
            terms,
            f"last good checkpoint: {'none yet' if last_good is None else f'step {last_good}'}; "
            "lower train.lr or check the input data",
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.clip_and_step(
            optimizer,
            model.parameters(),
            train.grad_clip,
            step,
            f"last good checkpoint: {'none yet' if last_good is None else f'step {last_good}'}",
        )
        if hasattr(model, "advance"):  # capacity-controlled beta-VAE: C grows per optimizer step
            model.advance()

        window.add(terms, train.batch_size * session.world_size)
        done = step + 1
        if loop.due(done, train.log_every, train.steps):
            history.append(window.row(done, lr))
            if session.rank == 0:
                _log_row(history[-1], config, terms)
        if loop.due(done, train.checkpoint_every, train.steps):
            metrics = {"step": done}
            if session.rank == 0 and quantized:
                metrics.update(evaluate(model, val_images, device, bf16, train.channels_last))
            elif session.rank == 0:
                metrics.update(evaluate_continuous(model, val_images, val_labels, device))
            if done == train.steps:
                metrics["resumed_from_step"] = start_step
                metrics["bf16"] = bf16
                metrics["workers"] = session.world_size
                metrics["train_images_per_s"] = loop.mean_rate(history, "images_per_s")
            state = {
                "step": done,
                "optimizer": optimizer.state_dict(),
                "rng": [generator.get_state()],
            }
            loop.save_checkpoint(session, model, state, history, metrics)
            last_good = done
            if session.rank == 0:
                log.info(
                    "train_autoencoder: checkpoint at step %d%s",
                    done,
                    f" (val mse {metrics['val_mse']:.5f})" if "val_mse" in metrics else "",
                )
            final_metrics = metrics
    return loop.resumed_finished(session, start_step, train.steps, resume_dir) or final_metrics


def _train_batches(artifact, table: list, train: AutoencoderTrainConfig, session, start_step: int):
    """This worker's training batches from `start_step` on (`stages.formats.image_stream`)."""
    rows = train.batch_size * (train.steps - start_step + 1)
    order = image_stream.plan(
        table,
        seed=train.seed,
        rank=session.rank,
        world=session.world_size,
        rows=rows,
        skip_rows=train.batch_size * start_step,
    )
    meta = image_table_meta(artifact)
    if session.world_size > 1 or not isinstance(session, harness.LocalSession):
        data = image_stream.dataset(artifact.store.fs, order, "train", meta)
        blocks = data.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    else:  # in process: the same plan read here, without a Ray Data pipeline to start
        blocks = image_stream.local_blocks(artifact.store.fs, order, "train", meta)
    seed = train.seed * 1000 + session.rank + 7919 * start_step
    for batch in image_stream.shuffled_batches(
        blocks, train.batch_size, train.shuffle_buffer, seed
    ):
        yield {k: torch.from_numpy(v) for k, v in batch.items()}
    raise RuntimeError("the training stream ended before the last step")  # plan covers steps


def _log_row(row: dict, config: Config, terms: dict) -> None:
    if config.model.family == "vqvae2":
        detail = " ".join(
            f"{lv} ppl {row[f'perplexity/{lv}']:.0f}" for lv in config.model.level_names
        )
    else:
        detail = " ".join(f"{k} {row[k]:.4g}" for k in terms if k not in ("loss", "recon"))
    log.info(
        "train_autoencoder: step %d/%d loss %.4f recon %.4f | %s | %.0f img/s",
        row["step"],
        config.train.steps,
        row["loss"],
        row["recon"],
        detail,
        row["images_per_s"],
    )


@torch.no_grad()
def evaluate(
    model: VQVAE2,
    images: torch.Tensor,
    device: torch.device,
    bf16: bool,
    channels_last: bool,
    batch_size: int = 256,
) -> dict:
    """Val MSE and PSNR in [0, 1] pixel units; per-level codebook usage and perplexity."""
    if len(images) == 0:
        return {}
    model.eval()
    sq_err, pixels = 0.0, 0
    counts = {
        name: torch.zeros(model.config.codebook_size, dtype=torch.long)
        for name in model.config.level_names
    }
    for start in range(0, len(images), batch_size):
        x = to_signed(images[start : start + batch_size], device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            codes = model.encode_indices(x)
            x_hat = model.decode_indices(codes).float().clamp(-1, 1)
        sq_err += float(((x_hat - x) / 2).pow(2).sum())
        pixels += x.numel()
        for name, idx in codes.items():
            counts[name] += torch.bincount(
                idx.flatten().cpu(), minlength=model.config.codebook_size
            )
    mse = sq_err / pixels
    metrics = {"val_mse": mse, "val_psnr": 10 * math.log10(1 / max(mse, 1e-12))}
    for name, c in counts.items():
        p = c.double() / c.sum()
        metrics[f"val_usage/{name}"] = float((c > 0).double().mean())
        metrics[f"val_perplexity/{name}"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    model.train()
    return metrics


@torch.no_grad()
def evaluate_continuous(
    model, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int = 256
) -> dict:
    """Val figures of a non-quantized family on ``b c h w`` inputs in [0, 1].

    ``val_<term>``: each loss term's mean over the val images (for VAEs ``val_recon + val_kl`` is
    the negative ELBO in nats, reported as ``val_neg_elbo``); ``val_mse`` and ``val_psnr`` of
    ``decode(encode(x))`` in [0, 1] pixel units; ``val_active_units``: latent dimensions whose
    code varies across the val images with variance above 0.01 (Burda et al. 2016).
    """
    if len(images) == 0:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    sq_err, codes = 0.0, []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        out = model(x, y)
        for k, v in out.items():
            if torch.is_tensor(v) and v.ndim == 0:
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
        z = model.encode(x, y)
        codes.append(z.float().cpu())
        sq_err += float((model.decode(z, y).float() - x).pow(2).sum())
    mse = sq_err / images.numel()
    metrics = {f"val_{k}": v / len(images) for k, v in sums.items()}
    if "val_kl" in metrics:
        metrics["val_neg_elbo"] = metrics["val_recon"] + metrics["val_kl"]
    variance = torch.cat(codes).var(0)
    metrics.update(
        val_mse=mse,
        val_psnr=10 * math.log10(1 / max(mse, 1e-12)),
        val_active_units=int((variance > 0.01).sum()),
    )
    model.train()
    return metrics


@torch.no_grad()
def _reconstructions(model, table, binarize: str, path: Path) -> None:
    """Writes originals above reconstructions, 12 per row (24 images)."""
    model.eval()
    images = torch.from_numpy(table.images[:24])
    if is_quantized(model):
        x = to_signed(images, torch.device("cpu"), False)
        x_hat = model.decode_indices(model.encode_indices(x)).clamp(-1, 1)
        x, x_hat = (x + 1) / 2, (x_hat + 1) / 2
    else:
        x = to_unit(images, torch.device("cpu"), binarize, torch.Generator().manual_seed(1))
        labels = torch.from_numpy(table.labels[:24].astype(np.int64))
        x_hat = model.decode(model.encode(x, labels), labels).clamp(0, 1)
    originals, recon = to_uint8(x), to_uint8(x_hat)
    rows = []
    for start in range(0, len(images), 12):
        rows += [originals[start : start + 12], recon[start : start + 12]]
    save_png(grid(np.concatenate(rows), nrow=12, scale=2), path)
