"""Train-prior stage: one level of a code-shard artifact -> a trained `CodePrior` artifact.

A VQ-VAE-2 with levels ``bottom, top`` gets one prior per level (two steps of this stage, which
the runner trains in parallel): the top prior models the top codes alone, the bottom prior
models the bottom codes given the top codes (`models.prior`). Both read the same cached shards,
so prior experiments never re-encode.

Data: the shards become Ray Datasets of fixed-shape uint16 arrays, the shards' own type. Up to
``SMALL_CODES`` bytes of codes are read in the stage's process (``ray.data.from_arrow``); larger
ones are read with Ray Data (``read_parquet`` -> ``map_batches``), materialized once in the
object store when they take at most a quarter of it, else streamed from the Parquet files every
epoch. The datasets go to Ray Train's ``TorchTrainer``; each worker reads its shard of the
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from models.prior import CodePrior, PriorArchitecture, PriorConfig
from pipeline.config import from_dict, to_dict
from pipeline.stage import Input
from stages.formats.codes import CodeShardError, open_codes
from stages.training import harness, loop
from stages.training.harness import train_into, use_bf16, where

VERSION = "1"
INPUTS = {"codes": Input(kinds=("encode",))}
DEFAULT_NUM_CPUS = 0  # the Ray task only coordinates; Ray Train workers reserve the CPUs
# `twostage ls --metrics` ranks priors by SCORE and shows the COMPARE figures beside it
SCORE = ("val_bits_per_code", "min")
COMPARE = ("val_nll", "train_bits_per_code", "tokens_per_s", "parameters", "step")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig(PriorArchitecture):
    """The transformer's architecture (`models.prior.PriorArchitecture`) and its conditioning.

    Args:
        class_conditional: Condition on the shards' labels (ignored when they have none).
    """

    class_conditional: bool = True


@dataclass(frozen=True)
class PriorTrainConfig(loop.TrainConfig):
    """The shared training options (`stages.training.loop.TrainConfig`; ``batch_size`` counts
    code grids, AdamW with betas 0.9 / 0.95) and the prior's own.

    Args:
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where the hardware has it).
        weight_decay: AdamW weight decay.
        shuffle_buffer: Rows in each worker's local shuffle buffer.
        val_rows: At most this many val rows are evaluated.
    """

    batch_size: int = 64
    lr: float = 5e-4
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    weight_decay: float = 0.01
    shuffle_buffer: int = 4096
    val_rows: int = 5000

    POSITIVE = (*loop.TrainConfig.POSITIVE, "shuffle_buffer", "val_rows")


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
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


# ----- the stage ------------------------------------------------------------------------------


SMALL_CODES = 64 << 20  # bytes of codes read in the stage's process rather than by Ray Data


def worker_requests(config: Config) -> list[dict[str, float]]:
    """What each Ray Train worker asks for, for the runner to check against the nodes."""
    return harness.worker_requests(config.train)


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Trains the prior of ``config.level`` on the ``codes`` input; writes the artifact."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # progress is logged
    codes = open_codes(inputs["codes"])
    meta = codes.meta
    prior_config = prior_config_for(meta, config)
    levels = [config.level, *prior_config.context_grids]
    # code shards are small (~100 bytes per image in Parquet, 2 per code as arrays): up to
    # SMALL_CODES bytes they are read here in one go (no read tasks to start); up to a quarter
    # of the object store they are read once by Ray Data and kept there; else every epoch
    # streams them from the Parquet files
    size = _code_bytes(codes, levels)
    datasets = {}
    for split in ("train", "val"):
        if size <= SMALL_CODES:
            datasets[split] = ray.data.from_arrow(codes.grid_table(split, levels))
        elif _fits_object_store(size):
            datasets[split] = codes.to_ray_grids(split, levels).materialize()
        else:
            datasets[split] = codes.to_ray_grids(split, levels)
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
        "autoencoder_weights": codes.artifact.metrics.get("autoencoder_weights"),
        "codes_key": codes.artifact.key,
        "class_names": meta.class_names if prior_config.num_classes else [],
        "parameters": n_params,
    }
    (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    return metrics


def check_upstream(config: Config, step, steps: dict) -> None:
    """Before anything runs: the level exists in the autoencoder the shards will come from, and
    ``model.patch`` divides its grid (the same checks `prior_config_for` makes on the shards;
    on the shards themselves when they are stored already)."""
    encode = steps[step.inputs["codes"]]
    if encode.artifact is not None:
        try:
            prior_config_for(open_codes(encode.artifact, verify=False).meta, config)
        except CodeShardError as e:
            raise ValueError(f"inputs.codes: {e}") from None
        return
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
    architecture = {f.name: getattr(model, f.name) for f in fields(PriorArchitecture)}
    return PriorConfig(
        **architecture,
        grid=grid,
        codebook_size=meta.codebook_sizes[config.level],
        context_grids={k: list(meta.grid_shapes[k]) for k in above},
        context_codebook_sizes={k: meta.codebook_sizes[k] for k in above},
        num_classes=classes,
    )


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
    resume_dir, state, history = loop.resume(session, model)
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
    window = loop.Window("tokens_per_s")
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
            lr = loop.apply_lr(optimizer, loop.cosine_lr(step, train))
            codes, context, labels = unpack(batch)
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = wrapped(codes, context, labels)
            loss = out["loss"]
            loop.check_finite(loss, step, {}, "lower train.lr or check the code shards")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = loop.clip_and_step(
                optimizer, model.parameters(), train.grad_clip, step, "lower train.lr"
            )
            step += 1
            window.add({"nll": out["nll"]}, len(codes) * session.world_size * tokens_per_row)
            if loop.due(step, train.log_every, train.steps):
                row = window.row(step, lr)
                row.update(bits_per_code=row["nll"] / math.log(2), grad_norm=float(grad_norm))
                history.append(row)
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
            if loop.due(step, train.checkpoint_every, train.steps):
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
    return loop.resumed_finished(session, start_step, train.steps, resume_dir) or final_metrics


def _checkpoint(model, optimizer, step, start_step, history, val, unpack, bf16, session) -> dict:
    """Evaluates (rank 0), writes a checkpoint and reports it; returns the reported metrics."""
    metrics = {"step": step}
    if session.rank == 0 and val is not None:
        metrics.update(evaluate(model, val, unpack, bf16))
    if session.rank == 0:
        metrics.update(
            {
                "train_bits_per_code": history[-1]["bits_per_code"] if history else None,
                "tokens_per_s": loop.mean_rate(history, "tokens_per_s"),
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
    loop.save_checkpoint(session, model, state, history, metrics)
    return metrics


def _code_bytes(codes, levels: list[str]) -> int:
    """Bytes of the uint16 code arrays of `levels`, over every row of the shards."""
    rows = codes.artifact.metrics.get("images", 0)  # encode's count of rows in the shards
    return rows * sum(math.prod(codes.meta.grid_shapes[level]) for level in levels) * 2


def _fits_object_store(size: int) -> bool:
    """Whether `size` bytes of codes take at most a quarter of the object store."""
    import ray

    store = ray.available_resources().get("object_store_memory", 0)
    if size > store / 4:
        log.info("train_prior: %.0f MB of codes stream from the shards each epoch", size / 1e6)
        return False
    return True


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
