"""Train-prior stage: one level of a code-shard artifact -> a trained `CodePrior` artifact.

A VQ-VAE-2 with levels ``bottom, top`` gets one prior per level (two steps of this stage, which
the runner trains in parallel): the top prior models the top codes alone, the bottom prior
models the bottom codes given the top codes (`models.prior`). Both read the same cached shards,
so prior experiments never re-encode.

Data: the shards are read with Ray Data (``read_parquet`` -> ``map_batches`` to fixed-shape
int32 arrays, materialized once in the object store) and passed to Ray Train's
``TorchTrainer``; each worker reads its shard of the
``train`` split through ``session.dataset("train")`` with a local shuffle buffer, one epoch
after another until ``train.steps``. The ``val`` split (whole, not sharded) gives the val bits
per code at each checkpoint. ``train.workers: 0`` runs the same loop in the stage's process on
the same Ray Datasets.

The training loop is written out in `train_loop` (AdamW, linear warm-up + cosine decay, clip,
bf16 autocast where the hardware has it). Checkpoints (weights + optimizer + step + history)
every ``checkpoint_every`` steps in the stage's scratch location; a rerun of an interrupted
stage resumes from the last one (it starts a fresh pass over the shuffled data).

Artifact: ``config.json`` + ``model.safetensors`` (`CodePrior`), ``metrics.json`` (history of
loss, bits per code, learning rate and tokens/s; final val bits per code) and the prior's
identity in the manifest metrics: ``level``, ``autoencoder_key`` (of the shards), ``class_names``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.prior import CodePrior, PriorConfig
from pipeline.config import from_dict, run_option, to_dict
from pipeline.stage import Input
from stages.formats.codes import column, open_codes
from stages.training.harness import cosine_lr, resume, save_checkpoint, train_into, use_bf16, where

VERSION = "1"
INPUTS = {"codes": Input(kinds=("encode",))}
DEFAULT_NUM_CPUS = 0  # the Ray task only coordinates; Ray Train workers reserve the CPUs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """The transformer's size and conditioning (see `models.prior.PriorConfig`).

    Args:
        hidden_size: Transformer width.
        layers: Decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention; must divide ``heads``); 0: as many
            as ``heads``. Fewer shrink the KV cache that each sampling step reads.
        mlp_ratio: MLP width as a multiple of hidden_size.
        dropout: Attention dropout.
        class_conditional: Condition on the shards' labels (ignored when they have none).
        class_dropout: Probability of training a row as unconditional (classifier-free guidance).
        patch: (ph, pw) codes per sequence token; [2, 2] takes a quarter of the decoder steps
            to sample a level (see `models.prior`). Must divide the level's grid.
    """

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0
    mlp_ratio: int = 4
    dropout: float = 0.0
    class_conditional: bool = True
    class_dropout: float = 0.1
    patch: list[int] = field(default_factory=lambda: [1, 1])

    def __post_init__(self):
        if len(self.patch) != 2 or min(self.patch) < 1:
            raise ValueError(f"patch: must be two positive sizes [ph, pw], got {self.patch}")
        for name in ("hidden_size", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by heads: {self.heads}"
            )
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise ValueError(f"kv_heads: must divide heads ({self.heads}), got {self.kv_heads}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout: must be in [0, 1), got {self.class_dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and execution options.

    Args:
        steps: Optimizer steps.
        batch_size: Code grids per step per worker.
        lr: Peak learning rate (AdamW, betas 0.9 / 0.95).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        final_lr_fraction: Cosine decay from ``lr`` to ``lr * final_lr_fraction``.
        grad_clip: Clip the global gradient norm (0: off).
        checkpoint_every: Steps between checkpoints (and val evaluations).
        log_every: Steps between logged metric rows.
        shuffle_buffer: Rows in each worker's local shuffle buffer.
        seed: Seed of initialisation, shuffling and class dropout.
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where the hardware has it).
        workers: 0 trains in the stage's own process; N >= 1 uses Ray Train with N DDP workers.
        cpus_per_worker: CPU threads per worker (None: the free CPUs divided among workers).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        val_rows: At most this many val rows are evaluated.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 50
    shuffle_buffer: int = 4096
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    workers: int = 1
    cpus_per_worker: int | None = run_option(None)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    val_rows: int = 5000

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "val_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.workers < 0:
            raise ValueError(f"workers: 0 (in-process) or a positive count, got {self.workers}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError("final_lr_fraction: must be in [0, 1]")


@dataclass(frozen=True)
class Config:
    """Stage options.

    Args:
        level: The code level this prior models (``top``, ``bottom``, ...); the levels above it
            are its context.
        model: Transformer size and conditioning.
        train: Optimisation and execution.
    """

    level: str = "top"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----- the stage ------------------------------------------------------------------------------


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Trains the prior of ``config.level`` on the ``codes`` input; writes the artifact."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # progress is logged
    codes = open_codes(inputs["codes"])
    meta = codes.meta
    prior_config = prior_config_for(meta, config)
    levels = [config.level, *prior_config.context_grids]
    grids = {config.level: prior_config.grid, **prior_config.context_grids}
    # read and convert once; every epoch then streams blocks from the object store (code shards
    # are small: ~100 bytes per image in Parquet, a few hundred as int32 arrays)
    datasets = {
        split: codes.to_ray_dataset(columns=["label", "split", *map(column, levels)])
        .map_batches(
            code_rows,
            fn_kwargs={"split": split, "sizes": {k: h * w for k, (h, w) in grids.items()}},
            batch_format="pyarrow",
            num_cpus=0,  # light; other stages may hold the CPUs
        )
        .materialize()
        for split in ("train", "val")
    }
    n_params = sum(p.numel() for p in CodePrior(prior_config).parameters())
    log.info(
        "train_prior: level %s (%dx%d codes%s), %.2fM parameters, %d steps of %d grids, %s",
        config.level,
        *prior_config.grid,
        "".join(f", given {k}" for k in prior_config.context_grids),
        n_params / 1e6,
        config.train.steps,
        config.train.batch_size,
        where(config.train),
    )
    metrics, history = train_into(
        out,
        _loop,
        {"config": to_dict(config), "prior": to_dict(prior_config)},
        config.train,
        scratch,
        datasets=datasets,
        split=("train",),
    )
    metrics = {
        **metrics,
        "level": config.level,
        "context_levels": list(prior_config.context_grids),
        "autoencoder_key": meta.autoencoder_key,
        "codes_key": codes.artifact.key,
        "class_names": meta.class_names if prior_config.num_classes else [],
        "parameters": n_params,
    }
    (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    return metrics


def check_upstream(config: Config, step, steps: dict) -> None:
    """Before anything runs: the level exists in the autoencoder the shards will come from, and
    ``model.patch`` divides its grid (the same checks as `prior_config_for`, hours earlier)."""
    encode = steps[step.inputs["codes"]]
    autoencoder = steps[encode.inputs["autoencoder"]].config.model
    if hasattr(autoencoder, "grid_shapes"):  # other families are refused by the encode stage
        _check_level(config, autoencoder.grid_shapes())


def _check_level(config: Config, grids: dict) -> list[int]:
    """The level's grid from ``level name -> (h, w)`` (bottom first); ValueError if unusable."""
    if config.level not in grids:
        raise ValueError(
            f"level: the code shards have levels {', '.join(grids)}, not {config.level!r}"
        )
    grid = list(grids[config.level])
    if any(g % p for g, p in zip(grid, config.model.patch, strict=True)):
        raise ValueError(
            f"model.patch: {config.model.patch} does not divide the {config.level} level's "
            f"{grid[0]}x{grid[1]} code grid"
        )
    return grid


def prior_config_for(meta, config: Config) -> PriorConfig:
    """The `PriorConfig` of ``config.level`` for shards described by `meta` (`CodeShardMeta`).

    Raises:
        ValueError: the shards have no such level, or ``model.patch`` does not divide its grid.
    """
    levels = meta.level_names  # bottom first
    grid = _check_level(config, {name: meta.grid_shapes[name] for name in levels})
    above = levels[levels.index(config.level) + 1 :][::-1]  # prefix order: top first
    model = config.model
    classes = len(meta.class_names) if model.class_conditional else 0
    return PriorConfig(
        grid=grid,
        codebook_size=meta.codebook_sizes[config.level],
        context_grids={k: list(meta.grid_shapes[k]) for k in above},
        context_codebook_sizes={k: meta.codebook_sizes[k] for k in above},
        num_classes=classes,
        class_dropout=model.class_dropout,
        hidden_size=model.hidden_size,
        layers=model.layers,
        heads=model.heads,
        kv_heads=model.kv_heads,
        mlp_ratio=model.mlp_ratio,
        dropout=model.dropout,
        patch=list(model.patch),
    )


def code_rows(batch, split: str, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Ray Data batch function: shard rows of one split -> ``label`` and ``n (h w)`` int32 codes."""
    import pyarrow.compute as pc

    batch = batch.filter(pc.equal(batch["split"], split))
    out = {"label": pc.fill_null(batch["label"], -1).to_numpy().astype(np.int64)}
    for level, size in sizes.items():  # codes per grid (a block may hold no rows of `split`)
        flat = batch[column(level)].combine_chunks().flatten().to_numpy()
        out[level] = flat.astype(np.int32).reshape(batch.num_rows, size)
    return out


def _loop(loop_config: dict, session) -> dict:
    """The loop as `stages.training.launch` calls it: rebuild the configs, then train."""
    config = from_dict(Config, loop_config["config"], "")
    prior = PriorConfig(**loop_config["prior"])
    return train_loop(config, prior, session)


# ----- the loop -------------------------------------------------------------------------------


def train_loop(config: Config, prior: PriorConfig, session) -> dict:
    """Trains the prior; checkpoints and reports through `session`. Returns final metrics."""
    train = config.train
    torch.set_num_threads(max(1, session.cpus))
    device = session.device
    bf16 = use_bf16(train.precision, device)
    level = config.level
    torch.manual_seed(train.seed)  # same initial weights on every rank
    model = CodePrior(prior)
    start_step = 0
    resume_dir, state, history = resume(session, model)
    if resume_dir is not None:
        start_step = int(state["step"])
        if session.rank == 0:
            log.info("train_prior: resuming %s from the checkpoint at step %d", level, start_step)
    model.to(device)
    wrapped = session.wrap(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=(0.9, 0.95), weight_decay=train.weight_decay
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.manual_seed(train.seed * 1000 + session.rank + start_step)  # class dropout draws
    val = _collect(session.dataset("val"), train.val_rows) if session.rank == 0 else None
    train_data = session.dataset("train")

    def unpack(batch):
        codes = batch[level].to(device).long().view(-1, *prior.grid)
        context = {
            k: batch[k].to(device).long().view(-1, *g) for k, g in prior.context_grids.items()
        }
        return codes, context, batch["label"].to(device)

    tokens_per_row = prior.length
    running, window_rows, window_start = {"nll": 0.0, "n": 0}, 0, time.perf_counter()
    final_metrics: dict = {}
    step, epoch = start_step, 0
    while step < train.steps:
        batches = 0
        for batch in train_data.iter_torch_batches(
            batch_size=train.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=train.shuffle_buffer,
            local_shuffle_seed=train.seed + 7919 * (start_step + epoch) + session.rank,
        ):
            batches += 1
            lr = cosine_lr(step, train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            codes, context, labels = unpack(batch)
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = wrapped(codes, context, labels)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"prior loss became {loss.item()} at step {step + 1}; "
                    "lower train.lr or check the code shards"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                if train.grad_clip > 0
                else torch.tensor(0.0)
            )
            optimizer.step()
            step += 1
            running["nll"] += float(out["nll"].detach())
            running["n"] += 1
            running["grad_norm"] = float(grad_norm)
            window_rows += len(codes) * session.world_size
            if step % train.log_every == 0 or step == train.steps:
                seconds = time.perf_counter() - window_start
                nll = running["nll"] / running["n"]
                row = {
                    "step": step,
                    "lr": lr,
                    "nll": nll,
                    "bits_per_code": nll / math.log(2),
                    "grad_norm": running["grad_norm"],
                    "tokens_per_s": window_rows * tokens_per_row / seconds,
                }
                history.append(row)
                running, window_rows, window_start = {"nll": 0.0, "n": 0}, 0, time.perf_counter()
                if session.rank == 0:
                    log.info(
                        "train_prior[%s]: step %d/%d %.3f bits/code lr %.2e | %.0f tokens/s",
                        level,
                        step,
                        train.steps,
                        row["bits_per_code"],
                        lr,
                        row["tokens_per_s"],
                    )
            if step % train.checkpoint_every == 0 or step == train.steps:
                final_metrics = _checkpoint(
                    model, optimizer, step, start_step, history, val, unpack, bf16, session
                )
            if step >= train.steps:
                break
        if batches == 0:
            raise ValueError(
                f"the train split has fewer rows per worker than train.batch_size "
                f"({train.batch_size}); lower it"
            )
        epoch += 1
    if start_step >= train.steps and session.rank == 0:  # resumed a finished run
        final_metrics = json.loads((resume_dir / "final_metrics.json").read_text())
        session.report(final_metrics, resume_dir)
    return final_metrics


def _checkpoint(model, optimizer, step, start_step, history, val, unpack, bf16, session) -> dict:
    """Evaluates (rank 0), writes a checkpoint and reports it; returns the reported metrics."""
    metrics = {"step": step}
    if session.rank == 0 and val is not None:
        metrics.update(evaluate(model, val, unpack, bf16))
    if session.rank == 0:
        rates = [r["tokens_per_s"] for r in history[1:]] or [r["tokens_per_s"] for r in history]
        metrics.update(
            {
                "train_bits_per_code": history[-1]["bits_per_code"] if history else None,
                "tokens_per_s": float(np.mean(rates)) if rates else 0.0,
                "resumed_from_step": start_step,
                "bf16": bf16,
                "workers": session.world_size,
            }
        )
        log.info(
            "train_prior: checkpoint at step %d%s",
            step,
            f" (val {metrics['val_bits_per_code']:.3f} bits/code)"
            if "val_bits_per_code" in metrics
            else "",
        )
    state = {"step": step, "optimizer": optimizer.state_dict()}
    save_checkpoint(session, model, state, history, metrics)
    return metrics


def _collect(dataset, limit: int) -> list[dict]:
    """Up to `limit` rows of a Ray Dataset (or shard) as a list of torch batches."""
    batches, rows = [], 0
    for batch in dataset.iter_torch_batches(batch_size=256):
        batches.append(batch)
        rows += len(batch["label"])
        if rows >= limit:
            break
    return batches


@torch.no_grad()
def evaluate(model: CodePrior, batches: list[dict], unpack, bf16: bool) -> dict:
    """Val bits per code (conditional on the labels where the prior uses them)."""
    if not batches:
        return {}
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        codes, context, labels = unpack(batch)
        with torch.autocast(codes.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(codes, context, labels)
        total += float(out["nll"]) * codes.numel()
        count += codes.numel()
    model.train()
    nll = total / count
    return {"val_nll": nll, "val_bits_per_code": nll / math.log(2), "val_codes": count}
