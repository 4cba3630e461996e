"""Train-sequence stage: a sequence table (Moving MNIST) -> a trained TD-VAE artifact.

The loop is written out like the train-autoencoder stage's and runs the same way: in this
process (``train.workers: 0``) or as Ray Train's ``train_loop_per_worker`` with N DDP workers
(`stages.training.launch`), with the same checkpoints (``model.safetensors`` + ``config.json`` +
``state.pt`` + ``history.json``) in the stage's scratch location, so an interrupted run resumes
from its last checkpoint. ``train`` takes the train-autoencoder stage's options
(`stages.train_autoencoder.TrainConfig`); ``batch_size`` counts sequences, ``val_images`` the
val sequences evaluated, and ``binarize: dynamic`` draws every frame's pixels afresh per batch;
training is in fp32 (``precision`` and ``channels_last`` are not used).

Each step draws a batch of sequences; the model draws one (t1, Δ) pair per sequence
(`models.tdvae`). Logged: every loss term, the learning rate, sequences/s. At each checkpoint the
val sequences are scored with a fixed draw of pairs and latent samples: ``val_loss`` is the
negative TD-VAE objective in nats per predicted frame.

Artifact: ``config.json``, ``model.safetensors``, ``metrics.json`` (history and final figures).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from models.tdvae import TDVAE, TDVAEConfig
from pipeline.config import from_dict, to_dict
from stages import Input
from stages.sequences import read_sequence_table, sequence_table_meta
from stages.train_autoencoder import TrainConfig, to_unit
from stages.training import cosine_lr, load_checkpoint, save_checkpoint, train_into, where

VERSION = "1"
INPUTS = {"sequences": Input(kinds=("ingest",))}
DEFAULT_NUM_CPUS = 0  # the Ray Train workers reserve the CPUs
TERMS = ("loss", "recon", "kl", "belief_t2", "transition", "info_weight")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Stage options: the model and how to train it."""

    model: TDVAEConfig = field(default_factory=TDVAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Trains a TD-VAE on the ``sequences`` input; writes the artifact files into `out`."""
    artifact = inputs["sequences"]
    meta = sequence_table_meta(artifact)
    model = config.model
    if (meta.height, meta.width, meta.channels) != (
        model.image_size,
        model.image_size,
        model.in_channels,
    ):
        raise ValueError(
            f"the sequences' frames are {meta.height}x{meta.width}x{meta.channels} but the model "
            f"expects {model.image_size}x{model.image_size}x{model.in_channels}; set "
            f"model.image_size: {meta.height} and model.in_channels: {meta.channels}"
        )
    if meta.frames < 2:
        raise ValueError(f"{artifact.uri}: sequences of {meta.frames} frame(s); TD-VAE needs 2+")
    log.info(
        "train_sequence: TD-VAE (%d layer(s) of %d latents, jumps up to %d) on %d-frame "
        "sequences, %d steps of %d sequences, %s",
        model.layers,
        model.latent_dim,
        model.max_jump,
        meta.frames,
        config.train.steps,
        config.train.batch_size,
        where(config.train),
    )
    ref = {"store": artifact.store.spec, "stage": artifact.stage, "key": artifact.key}
    metrics, history = train_into(
        out, _loop, {"config": to_dict(config), "sequences": ref}, config.train, scratch
    )
    (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    return metrics


def _loop(loop_config: dict, session) -> dict:
    """The loop as `stages.training.launch` calls it: rebuild the config, then train."""
    config = from_dict(Config, loop_config["config"], "")
    return train_loop(config, loop_config["sequences"], session)


def to_frames(
    batch: torch.Tensor, device: torch.device, binarize: str, generator=None
) -> torch.Tensor:
    """uint8 ``b t h w c`` -> float ``b t c h w`` in [0, 1] (binarized as `to_unit` does)."""
    t = batch.shape[1]
    x = to_unit(rearrange(batch, "b t h w c -> (b t) h w c"), device, binarize, generator)
    return rearrange(x, "(b t) c h w -> b t c h w", t=t)


def train_loop(config: Config, sequences_ref: dict, session) -> dict:
    """Trains the TD-VAE; checkpoints and reports through `session`. Returns final metrics."""
    from pipeline.store import Store

    train = config.train
    torch.set_num_threads(max(1, session.cpus))
    artifact = Store(sequences_ref["store"]).open(sequences_ref["stage"], sequences_ref["key"])
    table = read_sequence_table(artifact, splits=("train", "val"))
    train_frames = torch.from_numpy(table.frames[table.splits == "train"])
    val_frames = torch.from_numpy(table.frames[table.splits == "val"][: train.val_images])
    if len(train_frames) == 0:
        raise ValueError("the sequence table has no train split")
    train_frames = train_frames[session.rank :: session.world_size]
    val = to_frames(
        val_frames, torch.device("cpu"), train.binarize, torch.Generator().manual_seed(1)
    )

    device = session.device
    torch.manual_seed(train.seed)  # same initial weights on every rank
    model = TDVAE(config.model)
    generator = torch.Generator().manual_seed(train.seed * 1000 + session.rank)
    start_step, history, state = 0, [], None
    resume_dir = session.latest_checkpoint()
    if resume_dir is not None:
        state, history = load_checkpoint(resume_dir, model)
        start_step = int(state["step"])
        generator.set_state(state["rng"][0])
        torch.set_rng_state(state["torch_rng"])
        if session.rank == 0:
            log.info("train_sequence: resuming from the checkpoint at step %d", start_step)
    wrapped = session.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    running: dict[str, float] = {}
    window_start, window_rows = time.perf_counter(), 0
    final_metrics: dict = {}
    for step in range(start_step, train.steps):
        lr = cosine_lr(step, train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(train_frames), (train.batch_size,), generator=generator)
        x = to_frames(train_frames[index], device, train.binarize, generator)
        model.train()
        out = wrapped(x, generator=generator)
        loss = out["loss"]
        if not torch.isfinite(loss):
            named = ", ".join(f"{k} {float(out[k]):.4g}" for k in TERMS[1:])
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step + 1} ({named}); lower train.lr; "
                f"the last checkpoint is kept"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        model.advance()  # the warm-up counts optimizer steps

        for k in TERMS:
            running[k] = running.get(k, 0.0) + float(out[k].detach())
        running["_n"] = running.get("_n", 0) + 1
        window_rows += train.batch_size * session.world_size
        done = step + 1
        if done % train.log_every == 0 or done == train.steps:
            n = running.pop("_n")
            row = {"step": done, "lr": lr, **{k: v / n for k, v in running.items()}}
            row["sequences_per_s"] = window_rows / (time.perf_counter() - window_start)
            history.append(row)
            running, window_start, window_rows = {}, time.perf_counter(), 0
            if session.rank == 0:
                log.info(
                    "train_sequence: step %d/%d loss %.2f | recon %.2f kl %.3f log p_B(z2) %.2f "
                    "log p_T(z2) %.2f | %.0f seq/s",
                    done,
                    train.steps,
                    row["loss"],
                    row["recon"],
                    row["kl"],
                    row["belief_t2"],
                    row["transition"],
                    row["sequences_per_s"],
                )
        if done % train.checkpoint_every == 0 or done == train.steps:
            metrics = {"step": done}
            if session.rank == 0:
                metrics.update(evaluate(model, val, device))
                rates = [r["sequences_per_s"] for r in history[1:]] or [
                    r["sequences_per_s"] for r in history
                ]
                metrics.update(
                    resumed_from_step=start_step,
                    workers=session.world_size,
                    train_sequences_per_s=float(np.mean(rates)) if rates else 0.0,
                )
            state = {
                "step": done,
                "optimizer": optimizer.state_dict(),
                "rng": [generator.get_state()],
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(session, model, state, history, metrics)
            if session.rank == 0:
                log.info(
                    "train_sequence: checkpoint at step %d (val loss %s nats/frame)",
                    done,
                    f"{metrics['val_loss']:.2f}" if "val_loss" in metrics else "n/a",
                )
            final_metrics = metrics
    if start_step >= train.steps and session.rank == 0:  # resumed a finished run
        final_metrics = json.loads((resume_dir / "final_metrics.json").read_text())
        session.report(final_metrics, resume_dir)
    return final_metrics


@torch.no_grad()
def evaluate(
    model: TDVAE, frames: torch.Tensor, device: torch.device, draws: int = 4, seed: int = 0
) -> dict:
    """Val loss terms (``val_<term>``) averaged over `draws` draws of one (t1, Δ) pair per
    sequence, with fixed pairs and latent samples (the global RNG is restored afterwards).
    ``val_loss`` is the negative objective with weight 1 on every term, warm-up or not."""
    if len(frames) == 0:
        return {}
    model.eval()
    sums = dict.fromkeys(TERMS[1:-1], 0.0)  # the unweighted terms
    pairs = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(draws):
            for start in range(0, len(frames), 256):
                x = frames[start : start + 256].to(device)
                out = model(x, generator=pairs)
                for k in sums:
                    sums[k] += float(out[k]) * len(x)
    model.train()
    metrics = {f"val_{k}": v / (draws * len(frames)) for k, v in sums.items()}
    metrics["val_loss"] = (
        metrics["val_recon"]
        + metrics["val_kl"]
        + metrics["val_belief_t2"]
        - metrics["val_transition"]
    )
    return metrics
