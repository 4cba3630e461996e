"""Runs a written-out training loop in this process or on Ray Train.

A trainable stage writes its loop once as ``loop(loop_config: dict, session) -> dict`` with the
skeleton of `stages.training.loop`; the loop rebuilds its typed config from ``loop_config``,
trains, and talks to the outside only through the session (`stages.training.loop.Session`):
``rank``, ``world_size``, ``device``, ``cpus``, ``checkpoints()``, ``wrap(model)`` (DDP under Ray
Train), ``dataset(name)`` (a Ray Dataset passed to `launch`: the whole dataset in-process, this
worker's shard under Ray Train) and ``report(metrics, checkpoint_dir)``. `launch` picks the
session: `LocalSession` (``workers: 0``; checkpoints in
``<scratch>/checkpoint_<step>``) or `RaySession` inside a ``TorchTrainer`` with N workers
(checkpoints through ``ray.train.report``; a rerun with the same ``RunConfig(name,
storage_path)`` resumes). The final checkpoint must hold ``final_metrics.json``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from models.io import MODEL_FILES
from pipeline import cluster, tracking
from pipeline.store import check_in_process, redact, sync_directory, sync_tree
from stages.training.loop import CheckpointError, verify_checkpoint

log = logging.getLogger(__name__)


def launch(
    loop: Callable,
    loop_config: dict,
    *,
    workers: int,
    cpus_per_worker: int | None,
    device: str,
    scratch: str,
    final: Path,
    datasets: dict | None = None,
    split: tuple[str, ...] = (),
    worker_resources: dict[str, float] | None = None,
) -> tuple[Path, dict]:
    """Runs `loop` and returns (directory of the final checkpoint, final metrics).

    Args:
        loop: The stage's loop function (module level, so Ray can ship it by reference).
        loop_config: Plain data the loop rebuilds its config from.
        workers: 0 runs in this process; N >= 1 runs N Ray Train workers (DDP).
        cpus_per_worker: CPU threads per worker (None: what one node can give, shared among
            the workers; `pipeline.cluster.cpus_per_worker`).
        device: ``auto``, ``cpu`` or ``cuda``.
        scratch: The stage's resumable-state location (path or URI).
        final: An empty local directory the final Ray Train checkpoint is copied to.
        datasets: Ray Datasets the loop reads through ``session.dataset(name)``.
        split: Names of the datasets sharded across workers (the others: whole on every one).
        worker_resources: Custom Ray resources each Ray Train worker asks for.
    """
    datasets = datasets or {}
    check_in_process(workers, "this store's scratch", scratch)
    if workers == 0:
        session = LocalSession(Path(scratch), pick_device(device), cpus_per_worker, datasets)
        session.tracker = tracking.for_this_step()
        try:
            metrics = loop(loop_config, session)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{_start_over(scratch)}") from None
        finally:
            if session.tracker is not None:
                session.tracker.close()
        return session.last_checkpoint, metrics
    return _launch_ray_train(
        loop,
        loop_config,
        workers,
        cpus_per_worker,
        device,
        scratch,
        final,
        datasets,
        split,
        worker_resources or {},
    )


def train_into(
    out: Path, loop: Callable, loop_config: dict, train, scratch: str, **data
) -> tuple[dict, list]:
    """`launch`es a loop, copies the final model files into `out`; returns (metrics, history).

    Args:
        out: The stage's output directory (gets ``config.json`` and ``model.safetensors``).
        loop, loop_config, scratch: As for `launch`.
        train: The stage's train config (``workers``, ``cpus_per_worker``, ``device``).
        **data: ``datasets`` and ``split``, as for `launch`.
    """
    with tempfile.TemporaryDirectory(prefix="twostage-final-") as tmp:
        final_dir, metrics = launch(
            loop,
            loop_config,
            workers=train.workers,
            cpus_per_worker=train.cpus_per_worker,
            device=train.device,
            scratch=scratch,
            final=Path(tmp),
            worker_resources=train.worker_resources,
            **data,
        )
        verify_checkpoint(final_dir)  # the artifact gets the weights the run checkpointed
        for name in MODEL_FILES:
            shutil.copyfile(final_dir / name, out / name)
        history = json.loads((final_dir / "history.json").read_text())
    return metrics, history


def worker_requests(train) -> list[dict[str, float]]:
    """The resources each Ray Train worker of a train config asks for, where the config says
    (an explicit ``cpus_per_worker``, ``device: cuda``), for the runner to check against the
    nodes before the step runs; in-process training asks for none."""
    bundle = {
        "CPU": train.cpus_per_worker or 1,
        "GPU": 1 if train.device == "cuda" else 0,
        **train.worker_resources,
    }
    return [bundle] * train.workers


def where(train) -> str:
    """``in-process`` or ``N Ray Train worker(s)``, for the stages' start-up log line."""
    return "in-process" if train.workers == 0 else f"{train.workers} Ray Train worker(s)"


def _launch_ray_train(
    loop,
    loop_config,
    workers,
    cpus_per_worker,
    device,
    scratch,
    final,
    datasets,
    split,
    worker_resources,
):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    needs = {"GPU": 1 if use_gpu else 0, **worker_resources}
    cpus = cpus_per_worker or cluster.cpus_per_worker(workers, needs)
    storage_path, storage_fs = _ray_storage(scratch)
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config={
            "loop": loop,
            "loop_config": loop_config,
            "cpus": cpus,
            "tracking": os.environ.get(tracking.ENV),  # rank 0 logs there
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus, **worker_resources},
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets=datasets or None,
        # one worker reads the datasets directly (a split adds a coordinator actor per epoch)
        dataset_config=DataConfig(datasets_to_split=list(split) if workers > 1 else [])
        if datasets
        else None,
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise RuntimeError(_training_error(e, scratch)) from None
    if result.error is not None:
        raise RuntimeError(_training_error(result.error, scratch))
    result.checkpoint.to_directory(str(final))
    return final, json.loads((final / "final_metrics.json").read_text())


def _ray_train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: run the stage's loop with a Ray session."""
    session = RaySession(config["cpus"])
    if config["tracking"] and session.rank == 0:
        session.tracker = tracking.Tracker(config["tracking"])
    try:
        config["loop"](config["loop_config"], session)
    finally:
        if session.tracker is not None:
            session.tracker.close()
        for download in session.downloads:  # checkpoints copied here to resume from
            shutil.rmtree(download, ignore_errors=True)


def _ray_storage(scratch: str):
    """Ray Train's storage_path (+ filesystem) for the scratch location of this key."""
    if "://" not in scratch:
        Path(scratch).mkdir(parents=True, exist_ok=True)
        return scratch, None
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(scratch)
    return path, fs


def _start_over(scratch: str) -> str:
    """What to do when no checkpoint of a step can be resumed from."""
    return f"; delete {redact(scratch)} to start this step over"


def _training_error(error: BaseException, scratch: str) -> str:
    text, scratch = str(error), redact(scratch)
    match = re.search(r"FloatingPointError: (.*)", text)
    if match:
        return f"{match.group(1)}; checkpoints before it are kept in {scratch}"
    match = re.search(r"CheckpointError: (.*)", text)
    if match:
        return f"{match.group(1)}{_start_over(scratch)}"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    what = lines[-1] if lines else type(error).__name__
    # a lost worker or node, a killed process: the checkpoints in scratch are what a rerun uses
    return f"training failed: {what}; rerun to resume from the last checkpoint in {scratch}"


# ----- sessions: what differs between in-process and Ray Train ------------------------------


class LocalSession:
    """Rank 0 of 1; checkpoints are directories ``<scratch>/checkpoint_<step>``."""

    rank, world_size = 0, 1
    tracker = None  # a `pipeline.tracking.Tracker` when the run tracks its curves

    def __init__(
        self, scratch: Path, device: torch.device, cpus: int | None, datasets: dict | None = None
    ):
        self.scratch, self.device = scratch, device
        self.cpus = cpus or os.cpu_count() or 1
        self.datasets = datasets or {}
        self.last_checkpoint: Path | None = None

    def dataset(self, name: str):
        return self.datasets[name]

    def checkpoints(self) -> list[Path]:
        """The checkpoint directories, newest first."""
        return sorted((p for p in self.scratch.glob("checkpoint_*") if p.is_dir()), reverse=True)

    def fetch(self, checkpoint: Path) -> Path:
        """The local directory of a checkpoint from `checkpoints`: itself."""
        return checkpoint

    def set_aside(self, checkpoint: Path) -> None:
        """Renames an unloadable checkpoint so no later run tries it again."""
        aside = checkpoint.with_name(f"unloadable-{checkpoint.name}")
        copies = 1
        while aside.exists():  # set aside before, by an earlier run
            copies += 1
            aside = checkpoint.with_name(f"unloadable-{checkpoint.name}-{copies}")
        checkpoint.rename(aside)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        target = self.scratch / f"checkpoint_{metrics['step']:08d}"
        staging = self.scratch / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint, staging)
        sync_tree(staging)  # on disk before the rename makes it a checkpoint (e.g. a power cut)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)  # a checkpoint directory is complete or absent
        sync_directory(self.scratch)
        self.last_checkpoint = target
        for old in sorted(self.scratch.glob("checkpoint_*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)


class RaySession:
    """A Ray Train worker: DDP across workers, checkpoints through ``ray.train.report``."""

    tracker = None  # rank 0's `pipeline.tracking.Tracker` when the run tracks its curves

    def __init__(self, cpus: int):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.cpus = cpus
        self.downloads: list[str] = []

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def checkpoints(self) -> list[str]:
        """Storage paths of the run's checkpoints, newest first.

        The newest is the one Ray Train registered last (``ray.train.get_checkpoint``); the
        older ones are its siblings in the run's storage. `report` names checkpoints
        ``checkpoint_<step>_<UTC time>``, so names sort by step, then by when they were written;
        a sibling newer than the registered one (cut off mid-upload) is not listed. The step's
        scratch directory, and everything left in it, is deleted once the step's artifact is
        stored.
        """
        import pyarrow.fs as pafs
        import ray.train

        newest = ray.train.get_checkpoint()
        if newest is None:
            return []
        self._filesystem = newest.filesystem
        parent, name = newest.path.rsplit("/", 1)
        older = [
            e.path
            for e in self._filesystem.get_file_info(pafs.FileSelector(parent))
            if e.type == pafs.FileType.Directory
            and e.base_name.startswith("checkpoint_")
            and e.base_name < name
        ]
        return [newest.path, *sorted(older, reverse=True)]

    def fetch(self, checkpoint: str) -> Path:
        """Downloads a checkpoint from `checkpoints` into a temporary directory of its name."""
        import ray.train

        self.downloads.append(tempfile.mkdtemp(prefix="twostage-resume-"))
        local = Path(self.downloads[-1], checkpoint.rsplit("/", 1)[1])
        try:
            ray.train.Checkpoint(checkpoint, self._filesystem).to_directory(str(local))
        except FileNotFoundError as e:  # registered, but gone from storage
            raise CheckpointError(f"{local.name} cannot be loaded (not in storage: {e})") from e
        return local

    def set_aside(self, checkpoint: str) -> None:
        """Nothing to do: Ray Train's checkpoint manager deletes its checkpoints in turn."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # buffers (codebooks) are kept identical by the quantizer's own all-reduce, not
        # overwritten from rank 0 each step
        return ray.train.torch.prepare_model(
            model,
            parallel_strategy="ddp" if self.world_size > 1 else None,
            parallel_strategy_kwargs={"broadcast_buffers": False},
        )

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        import ray.train

        payload = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if checkpoint is None:
            ray.train.report(payload)
        else:
            now = datetime.datetime.now(datetime.timezone.utc)
            ray.train.report(
                payload,
                checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                # sortable by step, then time (a step can be reported again after a fallback)
                checkpoint_dir_name=f"checkpoint_{metrics['step']:08d}_{now:%Y%m%d-%H%M%S-%f}",
            )


def pick_device(device: str) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device is cuda but no CUDA device is visible to this worker")
        return torch.device("cuda")
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
