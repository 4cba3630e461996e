"""Encode stage: an image table + a trained autoencoder -> Parquet code shards (`stages.formats.codes`).

Ray Data streams the image table's Parquet files through an actor pool
(``map_batches(Encoder, compute=ActorPoolStrategy(size=actors))``); each actor loads the model
once and maps batches of images to code grids. The stage's task consumes the stream and writes
the shards itself, rolling to a new file at ``shard_mb``, so nothing is ever appended in place:
the files become visible only when the artifact is committed (Ray's own ``write_parquet``
appends and is not atomic). Datasets larger than memory stream through.

The artifact key depends on the autoencoder's key, so retraining stage 1 makes a new shard set
and leaves the old one intact; every file records the autoencoder key it was encoded with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.families import vqvae2_config
from models.vqvae2 import VQVAE2Config
from pipeline import cluster
from pipeline.config import run_option
from pipeline.stage import Input
from stages.formats.codes import CodeShardMeta, ShardWriter, codes_table
from stages.formats.images import (
    ImageTableMeta,
    decode_pixels,
    image_table_meta,
    read_parquet_dataset,
    table_files,
)
from stages.training.harness import pick_device, use_bf16

VERSION = "1"
INPUTS = {
    "images": Input(kinds=("ingest",)),
    "autoencoder": Input(kinds=("train_autoencoder",)),
}
DEFAULT_NUM_CPUS = 0  # the Ray Data actors reserve the CPUs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Encode options.

    Args:
        batch_size: Images per model call.
        actors: Size of the Ray Data actor pool (model replicas).
        cpus_per_actor: CPU threads per actor (None: what one node can give, shared among the
            actors).
        gpus_per_actor: GPUs per actor (1 on GPU clusters; 0 on CPU).
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where fast). Recorded in the
            shard metadata: bf16 and fp32 codes can differ where two codes are nearly tied.
        shard_mb: Target size of one shard file in MB.
        splits: Splits to encode.
    """

    batch_size: int = 512
    actors: int = run_option(1)
    cpus_per_actor: int | None = run_option(None)
    gpus_per_actor: float = run_option(0.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    shard_mb: float = 128.0
    splits: tuple[str, ...] = ("train", "val", "test")

    def __post_init__(self):
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.shard_mb <= 0:
            raise ValueError(f"shard_mb: must be positive, got {self.shard_mb}")
        unknown = set(self.splits) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"splits: unknown split(s) {sorted(unknown)}; use train, val, test")


class Encoder:
    """Ray Data UDF: loads the autoencoder once, maps image batches to code rows.

    Args:
        autoencoder: ``{"store", "stage", "key"}`` of the trained autoencoder artifact.
        table_meta: The image table's metadata (image shape).
        precision: ``bf16`` or ``fp32``.
        threads: torch threads in this actor.
        meta: The shard metadata (level names etc.).
        splits: Keep only rows of these splits.
    """

    def __init__(
        self,
        autoencoder: dict,
        table_meta: ImageTableMeta,
        precision: str,
        threads: int,
        meta: CodeShardMeta,
        splits: list[str],
    ):
        import torch

        from models.vqvae2 import VQVAE2
        from pipeline.store import Store

        self.threads = max(1, threads)
        artifact = Store(autoencoder["store"]).open(autoencoder["stage"], autoencoder["key"])
        artifact.local_path("config.json")  # both files verified against the manifest
        model_dir = artifact.local_path("model.safetensors").parent
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = VQVAE2.load(model_dir, map_location=str(self.device))
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.table_meta, self.bf16, self.meta = table_meta, precision == "bf16", meta
        self.splits = None if set(splits) == {"train", "val", "test"} else list(splits)

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.compute as pc
        import torch

        # Ray Data may call the UDF on another thread than __init__'s, and OpenMP thread counts
        # are per thread: set it where the work runs
        torch.set_num_threads(self.threads)
        if self.splits is not None:
            batch = batch.filter(pc.is_in(batch["split"], pa.array(self.splits)))
        array = decode_pixels(batch["image"], self.table_meta)
        x = torch.from_numpy(array).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            codes = self.model.encode_indices(x)
        return codes_table(
            self.meta,
            batch["id"],
            batch["label"],
            batch["split"],
            {k: v.cpu().numpy() for k, v in codes.items()},
        )


def worker_requests(config: Config) -> list[dict[str, float]]:
    """What each encoder actor asks for where the config says, for the runner to check against
    the nodes before the step runs (`pipeline.stage`)."""
    return [{"CPU": config.cpus_per_actor or 0, "GPU": config.gpus_per_actor}] * config.actors


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Encodes every requested split of ``images`` with ``autoencoder``; writes shards to `out`."""
    import json

    import ray
    import ray.data

    log.disabled = False  # Ray Data's logging set-up disables loggers created before it

    images, autoencoder = inputs["images"], inputs["autoencoder"]
    problems = images.verify()  # never encode from a corrupt table
    if problems:
        from pipeline.store import CorruptArtifactError

        raise CorruptArtifactError(problems[0])
    model_config = vqvae2_config(json.loads(autoencoder.read_bytes("config.json")), autoencoder.uri)
    parts = table_files(images)
    table_meta = image_table_meta(images)
    _check_shapes(model_config, table_meta)
    levels = model_config.level_names
    grid = {name: list(shape) for name, shape in model_config.grid_shapes().items()}
    precision = "bf16" if use_bf16(config.precision, pick_device("auto")) else "fp32"
    meta = CodeShardMeta(
        level_names=levels,
        grid_shapes=grid,
        codebook_sizes={n: model_config.codebook_size for n in levels},
        autoencoder_key=autoencoder.key,
        precision=precision,
        class_names=table_meta.class_names,
    )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # same shards on every rerun
    context.enable_progress_bars = False
    # small blocks (a few thousand images): reading, encoding and writing overlap, and no
    # block ever holds a large part of the dataset (Parquet reads otherwise give one block)
    context.target_max_block_size = 4 * 2**20
    needs = {"GPU": config.gpus_per_actor} if config.gpus_per_actor else None
    room = cluster.cpus_per_worker(1, needs)  # the CPUs one node can give now
    threads = config.cpus_per_actor or max(1, room // config.actors)
    # Ray Data's file listing and read tasks need a CPU of their own: never let the actor pool
    # reserve every free CPU, or the pipeline waits forever (torch threads use the cores anyway)
    reserve = min(float(config.cpus_per_actor or 1), max(0.1, (room - 1) / config.actors))
    ds = read_parquet_dataset(  # light I/O tasks; the encoder actors hold the CPUs
        [images.fs_path(p) for p in parts], images.store.fs, ["id", "label", "split", "image"]
    )
    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={
            "autoencoder": {
                "store": autoencoder.store.spec,
                "stage": autoencoder.stage,
                "key": autoencoder.key,
            },
            "table_meta": table_meta,
            "precision": precision,
            "threads": threads,
            "meta": meta,
            "splits": list(config.splits),
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=reserve,
        num_gpus=config.gpus_per_actor,
    )
    writer = ShardWriter(out, meta, int(config.shard_mb * 2**20))
    start, last_log = time.perf_counter(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.write(batch)
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log.info("encode: %d images, %.0f img/s", writer.rows, writer.rows / (last_log - start))
    files = writer.close()
    seconds = time.perf_counter() - start
    total_bytes = sum((out / f).stat().st_size for f in files)
    log.info(
        "encode: %d images in %.1fs (%.0f img/s) -> %d shard(s), %.1f bytes/image",
        writer.rows,
        seconds,
        writer.rows / seconds,
        len(files),
        total_bytes / max(writer.rows, 1),
    )
    return {
        "images": writer.rows,
        "files": len(files),
        "bytes": total_bytes,
        "bytes_per_image": total_bytes / max(writer.rows, 1),
        "seconds": seconds,
        "images_per_s": writer.rows / seconds if seconds else 0.0,
        "precision": precision,
        "levels": levels,
        "grid_shapes": grid,
        "autoencoder_key": autoencoder.key,
        # the weights themselves: a reader can tell codes of weights no longer stored
        "autoencoder_weights": autoencoder.files["model.safetensors"]["sha256"],
    }


def _check_shapes(model: VQVAE2Config, table: ImageTableMeta) -> None:
    if (table.height, table.width) != (model.image_size, model.image_size):
        raise ValueError(
            f"the autoencoder takes {model.image_size}x{model.image_size} images but the "
            f"image table holds {table.height}x{table.width}; encode the table it was trained on"
        )
    if table.channels != model.in_channels:
        raise ValueError(
            f"the autoencoder takes {model.in_channels} channel(s), the images have {table.channels}"
        )
