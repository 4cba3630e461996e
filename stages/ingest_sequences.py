"""Ingest-sequences stage: digits -> a sequence table (`stages.formats.sequences`) for TD-VAE.

Sources (``source.kind``):

- ``moving_mnist``: bouncing Moving MNIST (`stages.sources.moving_mnist.Bouncing`: ``num_digits``
  digits moving at ``speed`` on a ``canvas``, ``frames`` per sequence);
- ``shifted_mnist``: one digit shifted ``shift`` px per frame with wrap-around
  (`stages.sources.moving_mnist.Shifted`).

Their digits come from the embedded MNIST subset, or from the IDX directory ``source.path``.
The train file's digits are split by ``val_fraction`` with ``seed`` into two disjoint parts:
``train`` sequences draw only from one, ``val`` sequences only from the other.
``source.count`` sequences are written to train and val (``val_fraction`` of them to val), and as
many ``test`` sequences as val ones from the ``t10k`` digits when the directory has them. Row
``i`` (its ``id``) is drawn with seed ``seed * 1_000_003 + i``
(`stages.sources.moving_mnist.sequence_seeds`), stored in the row.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import ConfigError
from pipeline.stage import Input
from stages.formats.sequences import SequenceTable, SequenceTableMeta, write_sequence_table
from stages.sources import moving_mnist
from stages.sources.mnist import EMBEDDED_DIR, read_mnist_dir

VERSION = "2"  # 2: pages carry checksums, for streamed reads
INPUTS: dict[str, Input] = {}
GENERATORS = {"moving_mnist": moving_mnist.Bouncing, "shifted_mnist": moving_mnist.Shifted}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Which sequences, and where their digits come from.

    Args:
        kind: ``moving_mnist`` or ``shifted_mnist``.
        path: An MNIST IDX directory to take the digits from (None: the embedded digits).
        count: Train + val sequences (at the defaults a sequence takes 82 KB, and the stage
            holds them all in memory).
        frames: Frames per sequence.
        canvas: Frame side in pixels.
        num_digits: Digits per sequence (``moving_mnist``).
        digit_size: Digit side on the canvas in pixels, resized bilinearly from MNIST's 28.
        speed: Distance per frame as a fraction of ``canvas - digit_size`` (``moving_mnist``).
        shift: Pixels moved per frame (``shifted_mnist``).
    """

    kind: Literal["moving_mnist", "shifted_mnist"] = "moving_mnist"
    path: str | None = None
    count: int = 20_000
    frames: int = 20
    canvas: int = 64
    num_digits: int = 2
    digit_size: int = 28
    speed: float = 0.1
    shift: int = 1

    def __post_init__(self):
        if self.count < 1:
            raise ConfigError(f"count: must be positive, got {self.count}")
        used = {f.name for f in fields(GENERATORS[self.kind])}
        for f in fields(self):
            if f.name in _GENERATOR_FIELDS - used and getattr(self, f.name) != f.default:
                raise ConfigError(
                    f"{f.name}: not used by source kind {self.kind!r}; remove {f.name}"
                )
        try:
            sequence_generator(self)
        except ValueError as e:  # messages start with the field name, as Source's do
            raise ConfigError(str(e)) from None


_GENERATOR_FIELDS = {f.name for g in GENERATORS.values() for f in fields(g)}


@dataclass(frozen=True)
class Config:
    """Ingest-sequences options.

    Args:
        source: The sequences and their digits.
        val_fraction: Fraction of the train file's digits (and of the sequences) held out as
            the ``val`` split.
        seed: Seed of the digit split and of the sequences.
        limit: Read at most this many digits from each IDX file (quick runs).
        rows_per_file: Rows per Parquet file.
    """

    source: Source = field(default_factory=Source)
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    rows_per_file: int = 50_000

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be positive or null, got {self.limit}")
        if self.rows_per_file < 1:
            raise ConfigError(f"rows_per_file: must be positive, got {self.rows_per_file}")


def sequence_generator(source: Source) -> moving_mnist.Bouncing | moving_mnist.Shifted:
    """The `stages.sources.moving_mnist` generator of `source`, with its parameters."""
    generator = GENERATORS[source.kind]
    return generator(**{f.name: getattr(source, f.name) for f in fields(generator)})


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Draws the train, val and test sequences from their digit pools; writes the table."""
    generator = sequence_generator(config.source)
    pools = _digit_pools(config)
    n_val = int(round(config.val_fraction * config.source.count))
    counts = {
        "train": config.source.count - n_val,
        "val": n_val,
        "test": n_val if "test" in pools else 0,
    }
    parts, start = [], 0
    for split, count in counts.items():
        if count == 0:
            continue
        pool = pools[split]
        if not len(pool["images"]):
            raise ValueError(
                f"no {split} digits to draw {count} {split} sequences from; "
                "raise val_fraction or limit"
            )
        seeds = moving_mnist.sequence_seeds(config.seed, count, start)
        sequences = moving_mnist.generate(generator, pool["images"], seeds)
        labels = pool["labels"][sequences.digits[:, 0]]
        parts.append((np.full(count, split, dtype=object), seeds, labels, sequences.frames))
        start += count
        log.info(
            "ingest_sequences: %d %s %s sequences from %d digits of %s",
            count,
            split,
            generator.name,
            len(pool["images"]),
            pool["name"],
        )

    splits, seeds, labels, frames = (np.concatenate(column) for column in zip(*parts, strict=True))
    meta = SequenceTableMeta(
        frames=generator.frames,
        height=generator.canvas,
        width=generator.canvas,
        channels=1,
        generator=generator.name,
        params=asdict(generator),
        digit_pool=_describe_digit_pool(config, pools),
    )
    table = SequenceTable(
        meta, np.arange(len(seeds), dtype=np.int64), splits, seeds, labels, frames
    )
    files = write_sequence_table(out, table, config.rows_per_file)
    log.info(
        "ingest_sequences: wrote %d %s sequences (%s) of %d frames of %dx%d in %d file(s)",
        len(table),
        generator.name,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        meta.frames,
        meta.height,
        meta.width,
        len(files),
    )
    return {
        "sequences": len(table),
        "splits": counts,
        "frames": meta.frames,
        "height": meta.height,
        "width": meta.width,
        "channels": meta.channels,
        "generator": generator.name,
        "digits": {split: len(pool["images"]) for split, pool in pools.items()},
    }


def _digit_pools(config: Config) -> dict[str, dict]:
    """The digits each split's sequences draw from: the train file's digits split by
    ``val_fraction`` with ``seed`` into disjoint ``train`` and ``val`` parts (as images are);
    the t10k file's, when there is one, for ``test``. Each: images ``n h w``, labels, ids."""
    root = EMBEDDED_DIR if config.source.path is None else Path(config.source.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source.path {str(root)!r} does not exist")
    pools = {}
    for pool in read_mnist_dir(root):
        images, labels, ids = (pool[k][: config.limit] for k in ("images", "labels", "ids"))
        if pool["split"] == "test":
            parts = {"test": np.arange(len(ids))}
        else:
            n_val = int(round(config.val_fraction * len(ids)))
            order = np.random.default_rng(config.seed).permutation(len(ids))
            parts = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
        for split, rows in parts.items():
            pools[split] = {
                "name": pool["name"],
                "images": images[rows, ..., 0],
                "labels": labels[rows].astype(np.int64),
                "ids": ids[rows],
            }
    return pools


def _describe_digit_pool(config: Config, pools: dict[str, dict]) -> str:
    source = (
        "the embedded MNIST subset"
        if config.source.path is None
        else f"the MNIST IDX files in {config.source.path}"
    )
    limit = "" if config.limit is None else f" (first {config.limit})"
    text = (
        f"{source}: train-file digits{limit} split by val_fraction {config.val_fraction} with "
        f"seed {config.seed} into train ({len(pools['train']['ids'])}) and val "
        f"({len(pools['val']['ids'])}) digits"
    )
    if "test" in pools:
        text += f"; test: t10k digits{limit} ({len(pools['test']['ids'])})"
    return text
