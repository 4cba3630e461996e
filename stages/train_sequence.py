"""Train-sequence stage: a sequence table (Moving MNIST) -> a trained TD-VAE artifact.

The loop is written with the training skeleton (`stages.training.loop`) and runs like every
training loop: in this process (``train.workers: 0``) or as Ray Train's
``train_loop_per_worker`` with N DDP workers (`stages.training.harness.launch`), with
checkpoints (``model.safetensors`` + ``config.json`` + ``state.pt`` + ``history.json``) in the
stage's scratch location, so an interrupted run resumes from its last checkpoint. Training is
in fp32.

With ``pretrain.steps`` > 0 the loop first trains the encoder and decoder as a plain VAE on
single frames (`models.tdvae.FrameVAE`; logged as ``pretrain_*``, val ``val_pretrain_*``), then
runs ``train.steps`` TD-VAE steps with a fresh optimizer and learning-rate schedule; step numbers
count both phases. Pre-training gives the TD-VAE phase a decoder that already draws digits
(figures in docs/results.md).

Data streams: each worker reads its share of the train split a row group at a time, epoch after
epoch in a seeded order, and draws batches from a local shuffle buffer of
``train.shuffle_buffer`` sequences (`stages.formats.image_stream`; the resume guarantee of
docs/pipeline.md, "Streaming reads"); pre-training takes one random frame of each drawn
sequence. Each TD-VAE step draws a batch of sequences; the model draws one (t1, Δ) pair per sequence
(`models.tdvae`). Logged: every loss term, the learning rate, sequences/s. At each checkpoint the
val sequences are scored with a fixed draw of pairs and latent samples: ``val_loss`` is the
negative TD-VAE objective in nats per predicted frame.

Artifact: ``config.json``, ``model.safetensors``, ``metrics.json`` (history and final figures).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from models.tdvae import TDVAE, FrameVAE, TDVAEConfig
from pipeline.config import from_dict, to_dict
from pipeline.stage import Input
from stages.formats import image_stream
from stages.formats.pixels import to_frames, to_unit
from stages.formats.sequences import (
    read_sequence_rows,
    sequence_blocks,
    sequence_groups,
    sequence_table_meta,
)
from stages.metrics.tdvae import PRETRAIN_TERMS, evaluate, evaluate_frames
from stages.training import harness, loop
from stages.training.harness import train_into, where

VERSION = "2"  # 2: streamed epochs of a shuffled order (1 drew sequences with replacement)
INPUTS = {"sequences": Input(kinds=("ingest_sequences",))}
DEFAULT_NUM_CPUS = 0  # the Ray Train workers reserve the CPUs
TERMS = ("loss", "recon", "kl", "belief_t2", "transition", "info_weight")
SCORE = ("val_loss", "min")  # `twostage ls --metrics` ranks by it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Frame-VAE pre-training of the encoder and decoder, before the TD-VAE steps.

    Args:
        steps: Pre-training steps (0: none; the TD-VAE trains from scratch).
        batch_size: Frames per step per worker, drawn from random sequences and positions.
        lr: Constant learning rate (Adam; no gradient clipping).
        reset_decoder_input: Re-initialize the decoder's first linear layer when the TD-VAE
            phase starts. Kept, the frame VAE's latent layout (made for reconstruction alone)
            stays, the latents carry no velocity and the transition cannot predict the
            position (measured in docs/results.md, TD-VAE).
    """

    steps: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    reset_decoder_input: bool = True

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps: must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")


@dataclass(frozen=True)
class SequenceTrainConfig(loop.TrainConfig):
    """The shared training options (`stages.training.loop.TrainConfig`; ``batch_size`` counts
    sequences, Adam, fp32) and the TD-VAE's own.

    Args:
        val_sequences: At most this many val sequences are evaluated (the first in file order).
        shuffle_buffer: Sequences in each worker's local shuffle buffer (memory: this many
            sequences, e.g. 20 MB for 1,024 sequences of 20 32x32 frames).
        binarize: ``none`` keeps grey levels in [0, 1]; ``threshold`` maps pixels above 0.5
            to 1; ``dynamic`` draws every frame's pixels afresh for every batch (val
            sequences: one fixed draw).
    """

    val_sequences: int = 10_000
    shuffle_buffer: int = 2048
    binarize: Literal["none", "threshold", "dynamic"] = "none"


@dataclass(frozen=True)
class Config:
    """Stage options: the model, its frame pre-training and how to train it."""

    model: TDVAEConfig = field(default_factory=TDVAEConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: SequenceTrainConfig = field(default_factory=SequenceTrainConfig)


def worker_requests(config: Config) -> list[dict[str, float]]:
    """What each Ray Train worker asks for, for the runner to check against the nodes."""
    return harness.worker_requests(config.train)


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
        "sequences, %d frame-VAE pre-training steps of %d frames, then %d steps of %d sequences, "
        "%s",
        model.layers,
        model.latent_dim,
        model.max_jump,
        meta.frames,
        config.pretrain.steps,
        config.pretrain.batch_size,
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


def train_loop(config: Config, sequences_ref: dict, session) -> dict:
    """Trains the TD-VAE (after the frame pre-training, if any); checkpoints and reports through
    `session`. Returns final metrics."""
    from pipeline.store import Store

    train, pre = config.train, config.pretrain
    torch.set_num_threads(max(1, session.cpus))
    artifact = Store(sequences_ref["store"]).open(sequences_ref["stage"], sequences_ref["key"])
    train_groups = sequence_groups(artifact, "train")
    if not train_groups:
        raise ValueError("the sequence table has no train split")
    val_frames = read_sequence_rows(
        artifact, "val", train.val_sequences if session.rank == 0 else 0
    )
    val = to_frames(
        torch.from_numpy(val_frames),
        torch.device("cpu"),
        train.binarize,
        torch.Generator().manual_seed(1),
    )

    device = session.device
    torch.manual_seed(train.seed)  # same initial weights on every rank
    model = TDVAE(config.model)
    frame_vae = FrameVAE(model).to(device) if pre.steps else None
    generator = torch.Generator().manual_seed(train.seed * 1000 + session.rank)
    start_step = 0
    resume_dir, state, history = loop.resume(session, model)
    if resume_dir is not None:
        start_step = int(state["step"])
        generator.set_state(state["rng"][0])
        torch.set_rng_state(state["torch_rng"])
        if session.rank == 0:
            log.info("train_sequence: resuming from the checkpoint at step %d", start_step)
    wrapped = session.wrap(model)
    if frame_vae is not None and start_step < pre.steps:
        if state is not None:
            frame_vae.head.load_state_dict(state["frame_head"])
        phase = _Phase("pretrain", frame_vae, PRETRAIN_TERMS, pre.lr, 0.0, state)
    else:
        phase = _Phase("tdvae", model, TERMS, train.lr, train.grad_clip, state)

    total = pre.steps + train.steps
    streams = {  # each phase's batches of sequences, from its first step still to train
        "pretrain": lambda: _batches(
            artifact, train_groups, train, session, pre.batch_size, pre.steps, start_step, 0
        ),
        "tdvae": lambda: _batches(
            artifact,
            train_groups,
            train,
            session,
            train.batch_size,
            train.steps,
            max(0, start_step - pre.steps),
            1,
        ),
    }
    batches = streams[phase.name]()
    window = loop.Window("frames_per_s" if phase.name == "pretrain" else "sequences_per_s")
    final_metrics: dict = {}
    for step in range(start_step, total):
        if step == pre.steps and phase.name == "pretrain":  # the TD-VAE starts afresh
            phase = _Phase("tdvae", model, TERMS, train.lr, train.grad_clip, None)
            window = loop.Window("sequences_per_s")
            batches = streams["tdvae"]()
        sequences = next(batches)
        if phase.name == "pretrain":  # one frame of each sequence
            lr = pre.lr
            frame = torch.randint(sequences.shape[1], (len(sequences),), generator=generator)
            x = to_unit(
                sequences[torch.arange(len(sequences)), frame], device, train.binarize, generator
            )
            frame_vae.train()
            out = frame_vae(x)
            rows = pre.batch_size
        else:
            lr = loop.cosine_lr(step - pre.steps, train)
            x = to_frames(sequences, device, train.binarize, generator)
            model.train()
            out = wrapped(x, generator=generator)
            rows = train.batch_size
        phase.step(out, lr, session.world_size, step)
        if phase.name == "tdvae":
            model.advance()  # the warm-up counts the TD-VAE's optimizer steps

        window.add({k: out[k] for k in phase.terms}, rows * session.world_size)
        done = step + 1
        if loop.due(done, train.log_every, pre.steps, total):
            prefix = "pretrain_" if phase.name == "pretrain" else ""
            history.append(window.row(done, lr, prefix))
            if session.rank == 0:
                _log_progress(history[-1], total)
        if loop.due(done, train.checkpoint_every, pre.steps, total):
            metrics = {"step": done}
            if session.rank == 0:
                if phase.name == "pretrain":
                    metrics.update(evaluate_frames(frame_vae, val, device))
                else:
                    metrics.update(evaluate(model, val, device))
                metrics.update(
                    resumed_from_step=start_step,
                    workers=session.world_size,
                    train_sequences_per_s=loop.mean_rate(history, "sequences_per_s"),
                )
            state = {
                "step": done,
                "optimizer": phase.optimizer.state_dict(),
                "rng": [generator.get_state()],
                "torch_rng": torch.get_rng_state(),
                "phase": phase.name,
            }
            if phase.name == "pretrain":
                state["frame_head"] = frame_vae.head.state_dict()
                if done == pre.steps and pre.reset_decoder_input:
                    _reset_decoder_input(model)  # before the boundary checkpoint: resumable
                    state["torch_rng"] = torch.get_rng_state()
            loop.save_checkpoint(session, model, state, history, metrics)
            if session.rank == 0:
                score = metrics.get("val_loss", metrics.get("val_pretrain_loss"))
                log.info(
                    "train_sequence: checkpoint at step %d (val %s %s nats/frame)",
                    done,
                    "frame VAE loss" if phase.name == "pretrain" else "loss",
                    "n/a" if score is None else f"{score:.2f}",
                )
            final_metrics = metrics
    return loop.resumed_finished(session, start_step, total, resume_dir) or final_metrics


def _batches(artifact, table, train, session, batch_size: int, steps: int, start: int, phase: int):
    """This worker's batches of `batch_size` sequences (uint8 ``b t h w c``) for steps
    `start`..`steps` of one phase, read a row group at a time through the shuffle buffer
    (`stages.formats.image_stream`); each phase walks its own seeded order of epochs."""
    seed = train.seed + 104_729 * phase
    order = image_stream.plan(
        table,
        seed=seed,
        rank=session.rank,
        world=session.world_size,
        rows=batch_size * (steps - start + 1),
        skip_rows=batch_size * start,
    )
    blocks = sequence_blocks(artifact, order, "train")
    shuffle_seed = seed * 1000 + session.rank + 7919 * start
    for batch in image_stream.shuffled_batches(
        blocks, batch_size, train.shuffle_buffer, shuffle_seed
    ):
        yield torch.from_numpy(batch["frames"])
    raise RuntimeError("the training stream ended before the last step")  # plan covers steps


def _reset_decoder_input(model: TDVAE) -> None:
    """Re-initializes the decoder's first linear layer (latents -> features): the TD-VAE phase
    then chooses how latents map to frames, while the pre-trained convolutions keep drawing
    digits (see `PretrainConfig`)."""
    first = next(m for m in model.decoder.net if isinstance(m, torch.nn.Linear))
    first.reset_parameters()
    log.info("train_sequence: frame pre-training done; the decoder's input layer is reset")


class _Phase:
    """One training phase: which module and terms, its gradient clipping (0: off) and its own
    Adam optimizer (the TD-VAE phase starts with fresh moments after the pre-training)."""

    def __init__(self, name: str, module, terms: tuple, lr: float, grad_clip: float, state):
        self.name, self.module, self.terms, self.grad_clip = name, module, terms, grad_clip
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        if state is not None and state.get("phase", "tdvae") == name:
            self.optimizer.load_state_dict(state["optimizer"])

    def step(self, out: dict, lr: float, world_size: int, step: int) -> None:
        """One optimizer step on ``out["loss"]`` (refuses a non-finite loss)."""
        loss = out["loss"]
        loop.check_finite(
            loss,
            step,
            {k: out[k] for k in self.terms},
            f"{self.name} phase; lower the learning rate; the last checkpoint is kept",
        )
        loop.apply_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.name == "pretrain" and world_size > 1:
            # the frame VAE is not DDP-wrapped (it shares modules with the wrapped TD-VAE):
            # average its gradients across the workers here
            for p in self.module.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world_size
        loop.clip_and_step(
            self.optimizer,
            self.module.parameters(),
            self.grad_clip,
            step,
            f"{self.name} phase; lower the learning rate; the last checkpoint is kept",
        )


def _log_progress(row: dict, total: int) -> None:
    if "pretrain_loss" in row:
        log.info(
            "train_sequence: step %d/%d frame VAE pre-training: loss %.2f | recon %.2f kl %.2f | "
            "%.0f frames/s",
            row["step"],
            total,
            row["pretrain_loss"],
            row["pretrain_recon"],
            row["pretrain_kl"],
            row["frames_per_s"],
        )
    else:
        log.info(
            "train_sequence: step %d/%d loss %.2f | recon %.2f kl %.3f log p_B(z2) %.2f "
            "log p_T(z2) %.2f | %.0f seq/s",
            row["step"],
            total,
            row["loss"],
            row["recon"],
            row["kl"],
            row["belief_t2"],
            row["transition"],
            row["sequences_per_s"],
        )
