"""The training skeleton: the options and plain functions every training loop is written with.

Each trainable stage writes its loop out once, as one function: learning rate, forward, named
losses, backward, clip, step, log, checkpoint. What every loop does the same way lives here:

- `TrainConfig`: the options every loop shares (a stage's train options extend it with its own);
- `Session`: what a loop may ask of where it runs (`stages.training.harness` gives one in this
  process and one in a Ray Train worker);
- `cosine_lr` and `apply_lr`: the schedule; `check_finite`: stops before a non-finite loss is
  stepped on, naming the loss terms; `Window`: the running means and throughput of a log row;
  `due`: whether a log row or checkpoint falls on a step;
- `save_checkpoint` and `resume`: checkpoints a rerun resumes from, falling back past unloadable
  ones; `resumed_finished`: the result of a rerun whose newest checkpoint is the last step;
  `mean_rate`: the run's mean throughput from its history.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch

from pipeline.config import run_option
from pipeline.store import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and execution options every training loop has.

    Args:
        steps: Optimizer steps.
        batch_size: Examples per step per worker.
        lr: Peak learning rate.
        warmup_steps: Linear warm-up steps.
        final_lr_fraction: Cosine decay from ``lr`` to ``lr * final_lr_fraction``.
        grad_clip: Clip the global gradient norm (0: off).
        checkpoint_every: Steps between checkpoints (and val evaluations).
        log_every: Steps between logged metric rows.
        seed: Seed of initialisation and of the batches' draws.
        workers: 0 trains in the stage's own process; N >= 1 uses Ray Train with N DDP workers.
        cpus_per_worker: CPU threads per worker (None: what one node can give, shared among the
            workers).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        worker_resources: Custom Ray resources each Ray Train worker asks for besides its CPUs
            and GPU, e.g. ``{gpu_like: 1}`` to place the workers on the nodes that have them.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    workers: int = 1
    cpus_per_worker: int | None = run_option(None)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_resources: dict[str, float] = field(default_factory=dict, metadata={"in_key": False})

    # options that must be at least 1 (a stage's train options may add theirs)
    POSITIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "checkpoint_every", "log_every")

    def __post_init__(self):
        for f in fields(self):  # every count and rate, the stage's own options included
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name}: cannot be negative, got {value}")
        for name in self.POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.workers < 0:
            raise ValueError(f"workers: 0 (in-process) or a positive count, got {self.workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker: must be positive, got {self.cpus_per_worker}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU") or amount < 0:
                raise ValueError(
                    f"worker_resources: {name}: {amount}; name custom resources with amounts "
                    ">= 0 (CPUs: cpus_per_worker, GPUs: device)"
                )
        if self.final_lr_fraction > 1:
            raise ValueError("final_lr_fraction: must be in [0, 1]")


class Session(Protocol):
    """Where a loop runs: its rank among the workers, its device and threads, its data and its
    checkpoints. `stages.training.harness` has one for this process and one for Ray Train."""

    rank: int
    world_size: int
    device: torch.device
    cpus: int

    def dataset(self, name: str) -> Any:
        """A Ray Dataset the stage passed in (this worker's shard where it is split)."""

    def checkpoints(self) -> list:
        """The run's checkpoints, newest first (read through `resume`)."""

    def fetch(self, checkpoint) -> Path:
        """The local directory of a checkpoint from `checkpoints`."""

    def set_aside(self, checkpoint) -> None:
        """Keeps an unloadable checkpoint from being tried again."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the session's device, wrapped for DDP where there are several workers."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Reports metrics, with a checkpoint directory to keep (from rank 0) or None."""


# ----- the schedule, the loss, the log --------------------------------------------------------


def cosine_lr(step: int, train) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay to ``lr * final_lr_fraction``.

    Args:
        step: Optimizer steps taken so far.
        train: A train config with ``lr``, ``steps``, ``warmup_steps``, ``final_lr_fraction``.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return train.lr * (train.final_lr_fraction + (1 - train.final_lr_fraction) * cosine)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Sets every parameter group's learning rate to `lr`; returns it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def check_finite(loss: torch.Tensor, step: int, terms: dict, advice: str) -> None:
    """FloatingPointError before a non-finite loss is stepped on: names the step (1-based) and
    every other loss term, then `advice` (what to change, and the last good checkpoint)."""
    if torch.isfinite(loss):
        return
    named = ", ".join(
        f"{k} {float(v.detach() if torch.is_tensor(v) else v):.4g}"
        for k, v in terms.items()
        if k != "loss"
    )
    named = f" ({named})" if named else ""
    raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}{named}; {advice}")


def clip_and_step(optimizer, parameters, grad_clip: float, step: int, advice: str) -> float:
    """Clips the global gradient norm to `grad_clip` (0: no clipping) and steps the optimizer,
    unless a gradient is non-finite while the loss was finite (an overflow in backward, a bad
    custom op): then FloatingPointError before any weight changes, so no checkpoint or artifact
    can hold what that step would have written. Returns the gradient norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(norm):
        raise FloatingPointError(
            f"the gradient norm became {float(norm)} at step {step + 1} with a finite loss; "
            f"the weights were not updated; {advice}"
        )
    optimizer.step()
    return float(norm)


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """FloatingPointError when any weight or buffer of `model` is not finite (never saved)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(
                f"weight {name} is not finite at step {step}; not checkpointed (the last "
                "checkpoint is kept)"
            )


def due(done: int, every: int, *at: int) -> bool:
    """Whether something done every `every` steps (or at the steps `at`) falls on step `done`."""
    return done % every == 0 or done in at


class Window:
    """The loss terms and examples seen since the last log row.

    `add` each step's scalar terms and example count; `row` gives their means, the learning
    rate and the throughput ``<rate>`` (examples per second), then starts a new window.
    """

    def __init__(self, rate: str):
        self.rate = rate
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.examples, self.start = 0, 0, time.perf_counter()

    def add(self, terms: dict, examples: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        self.steps += 1
        self.examples += examples

    def row(self, step: int, lr: float, prefix: str = "") -> dict:
        """``{step, lr, <prefix><term>: mean, <rate>}``; the window starts afresh."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        row = {"step": step, "lr": lr}
        row.update({f"{prefix}{k}": v / max(1, self.steps) for k, v in self.sums.items()})
        row[self.rate] = self.examples / seconds
        self._reset()
        return row


def mean_rate(history: list[dict], key: str) -> float:
    """The mean of a throughput over the history's rows, leaving out the first (warm-up) row
    where there are others."""
    rates = [r[key] for r in history if key in r]
    rates = rates[1:] or rates
    return sum(rates) / len(rates) if rates else 0.0


def resumed_finished(session, start_step: int, steps: int, resume_dir: Path | None) -> dict | None:
    """A rerun whose newest checkpoint is already the last step: that checkpoint's final
    metrics, reported again (rank 0) so the harness finds the result; None otherwise."""
    if start_step < steps or resume_dir is None:
        return None
    metrics = json.loads((resume_dir / "final_metrics.json").read_text())
    if session.rank == 0:
        session.report({**metrics, "step": start_step}, resume_dir)
    _track(session, [], {**metrics, "step": start_step})  # a tracker that missed it gets it
    return metrics


# ----- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(session, model, state: dict, history: list, metrics: dict) -> None:
    """Rank 0 writes a checkpoint, every rank reports it (Ray Train needs all ranks to report).

    The checkpoint holds the model's own files (``model.save``), ``state.pt`` (`state`: step,
    optimizer, RNG), ``history.json`` and ``final_metrics.json`` (`metrics`; the run's result
    when this is the last checkpoint). A session with a ``tracker`` (`pipeline.tracking`) gets
    the history rows since the last checkpoint and `metrics` there too.
    """
    checkpoint_dir = None
    if session.rank == 0:
        check_finite_weights(model, metrics.get("step", 0))
        checkpoint_dir = Path(tempfile.mkdtemp(prefix="twostage-ckpt-"))
        model.save(checkpoint_dir)
        torch.save(state, checkpoint_dir / "state.pt")
        (checkpoint_dir / "history.json").write_text(json.dumps(history))
        (checkpoint_dir / "final_metrics.json").write_text(json.dumps(metrics))
        sums = {p.name: sha256_file(p) for p in sorted(checkpoint_dir.iterdir()) if p.is_file()}
        (checkpoint_dir / CHECKSUMS).write_text(json.dumps(sums, indent=1))  # written last
    session.report(metrics, checkpoint_dir)
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    _track(session, history, metrics)  # after the checkpoint is kept: a tracker may stop us


def _track(session, history: list, metrics: dict) -> None:
    """Hands rank 0's rows and figures to the session's tracker (`pipeline.tracking`), if any."""
    tracker = getattr(session, "tracker", None)
    if tracker is not None and session.rank == 0:
        tracker.rows(history, metrics)


class CheckpointError(RuntimeError):
    """No checkpoint to resume from can be loaded (the message says which file and why)."""


def resume(session, model) -> tuple[Path | None, dict | None, list]:
    """Loads the newest loadable checkpoint into `model`.

    A checkpoint that cannot be loaded (cut short by a crash, altered, missing) is skipped with
    a warning and the one before it is used, so it costs only the work since that one. Once one
    loads, the skipped ones are set aside (in process renamed ``unloadable-<name>``; on Ray
    Train left to its checkpoint manager, which deletes them in turn). When none loads, nothing
    is moved: a rerun meets the same checkpoints and the same message.

    Returns:
        (its directory, its state, its history); (None, None, []) when there is none.

    Raises:
        CheckpointError: There are checkpoints, but none can be loaded; names the newest and
            why it failed.
    """
    failed: list[tuple[str, CheckpointError]] = []
    for checkpoint in session.checkpoints():  # newest first
        try:
            directory = session.fetch(checkpoint)
            state, history = load_checkpoint(directory, model)
        except CheckpointError as e:
            failed.append((checkpoint, e))
            if session.rank == 0:
                log.warning("%s; trying the checkpoint before it", e)
            continue
        for checkpoint, _ in failed:
            session.set_aside(checkpoint)
        _same_on_every_rank(session, int(state["step"]))
        if getattr(session, "tracker", None) is not None:  # its rows are in the log already
            session.tracker.last_step = int(state["step"])
        return directory, state, history
    if failed:
        older = f"; nor can the {len(failed) - 1} older one(s)" if len(failed) > 1 else ""
        raise CheckpointError(f"no checkpoint to resume from can be loaded: {failed[0][1]}{older}")
    return None, None, []


def _same_on_every_rank(session, step: int) -> None:
    """Raises CheckpointError unless every DDP rank resumed from the same step."""
    if session.world_size == 1:
        return
    import torch.distributed as dist

    steps = torch.tensor([step, -step], device=session.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # [largest step, -smallest step]
    if int(steps[0]) != -int(steps[1]):
        raise CheckpointError(
            f"the workers resumed from different checkpoints (steps {-int(steps[1])} to "
            f"{int(steps[0])}): some could not load the newest"
        )


def load_checkpoint(directory: Path, model) -> tuple[dict, list]:
    """Loads a `save_checkpoint` directory's weights into `model`; returns (state, history).
    Every file must match the sha256 its ``CHECKSUMS`` file records (a flipped bit in the
    tensor data would load without complaint otherwise)."""
    from safetensors.torch import load_file

    verify_checkpoint(directory)
    try:
        model.load_state_dict(load_file(directory / "model.safetensors"))
        state = torch.load(directory / "state.pt", weights_only=True)
        history = json.loads((directory / "history.json").read_text())
    except Exception as e:  # truncated, altered or from another model: never train on from it
        error = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{directory.name} cannot be loaded ({error})") from e
    return state, history


CHECKSUMS = "sha256sums.json"  # a checkpoint's file name -> sha256, written after the rest


def verify_checkpoint(directory: Path) -> None:
    """CheckpointError unless every file `CHECKSUMS` lists is in `directory` with its sha256."""
    try:
        sums = json.loads((directory / CHECKSUMS).read_text())
        if not isinstance(sums, dict) or not sums:
            raise ValueError("not a mapping of file name -> sha256")
    except (OSError, ValueError) as e:
        error = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{directory.name} has no readable {CHECKSUMS} ({error})") from e
    for name, digest in sums.items():
        path = directory / str(name)
        if "/" in str(name) or not path.is_file():
            raise CheckpointError(f"{directory.name}: {name} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"{directory.name}: {name} does not match its sha256 (corrupted on disk)"
            )
