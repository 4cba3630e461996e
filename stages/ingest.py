"""Ingest stage: a data source -> an image table (`stages.formats.images`).

Sources (``source.kind``):

- ``embedded``: 7,000 real MNIST digits shipped in ``stages/sources/data/mnist_subset``
  (licence note there), so a fresh machine needs no network and no data directory;
- ``mnist``: a directory of standard IDX files (``train-images-idx3-ubyte[.gz]``, ...), raw or
  gzipped; the ``t10k`` files, when present, become the ``test`` split;
- ``image_folder``: ``<path>/<class name>/*.png|jpg|jpeg`` (classes sorted by name);
- ``parquet``: an existing image table (a file or a directory of Parquet files written by this
  stage, e.g. copied out of another store);
- ``dsprites``: ``source.count`` procedural dSprites images (`stages.sources.dsprites`, 64x64)
  drawn uniformly from the factor grid with ``seed``; the factors are stored as ``factor_*``
  columns and the shape is the class label.

Images of the training pool are split into ``train`` and ``val`` by a seeded permutation. An
optional ``image_size`` pads (centred, zeros) or resizes every image to a square. Unreadable
files of an image folder are counted and listed in the metrics, or stop the stage when
``strict`` is set; an unreadable IDX or Parquet file always stops it, naming the file.
Sequence data (Moving MNIST) has its own stage, `stages.ingest_sequences`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import ConfigError
from pipeline.stage import Input
from stages.formats.images import ImageTable, ImageTableMeta, write_image_table
from stages.sources import dsprites
from stages.sources.mnist import EMBEDDED_DIR, MNIST_CLASSES, read_mnist_dir

VERSION = "1"
INPUTS: dict[str, Input] = {}
# the sequence options the source had before sequence ingest became its own stage, at the only
# values an image source allowed: folded into the keys so stores written before stay cached
RETIRED_OPTIONS = {
    "source": {
        "frames": 20,
        "canvas": 64,
        "num_digits": 2,
        "digit_size": 28,
        "speed": 0.1,
        "shift": 1,
    }
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where the images come from.

    Args:
        kind: ``embedded``, ``mnist``, ``image_folder``, ``parquet`` or ``dsprites``.
        path: Directory or file to read (``mnist``, ``image_folder``, ``parquet``).
        count: Images to generate (``dsprites``).
    """

    kind: Literal["embedded", "mnist", "image_folder", "parquet", "dsprites"] = "embedded"
    path: str | None = None
    count: int = 20_000

    def __post_init__(self):
        if self.kind in ("embedded", "dsprites") and self.path is not None:
            raise ConfigError(f"path: source kind {self.kind!r} reads no files; remove path")
        if self.kind in ("mnist", "image_folder", "parquet") and not self.path:
            raise ConfigError(f"path: required for source kind {self.kind!r}")
        if self.count < 1:
            raise ConfigError(f"count: must be positive, got {self.count}")


@dataclass(frozen=True)
class Config:
    """Ingest options.

    Args:
        source: The data source.
        image_size: Pad or resize every image to ``image_size x image_size`` (None: keep).
        resize: ``pad`` centres smaller images on a zero canvas (MNIST 28 -> 32); ``resize``
            rescales (bilinear).
        channels: Convert to 1 (grey) or 3 (RGB) channels (None: keep the source's).
        val_fraction: Fraction of the training pool held out as the ``val`` split.
        seed: Seed of the train/val permutation.
        limit: Read at most this many images from each source file set (quick runs).
        strict: Stop on the first unreadable image instead of counting it.
        rows_per_file: Rows per Parquet file.
    """

    source: Source = field(default_factory=Source)
    image_size: int | None = None
    resize: Literal["pad", "resize"] = "pad"
    channels: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    strict: bool = False
    rows_per_file: int = 50_000

    def __post_init__(self):
        if self.image_size is not None and not 4 <= self.image_size <= 4096:
            raise ConfigError(f"image_size: must be between 4 and 4096, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels: must be 1, 3 or null, got {self.channels}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be positive or null, got {self.limit}")
        if self.rows_per_file < 1:
            raise ConfigError(f"rows_per_file: must be positive, got {self.rows_per_file}")


# side, channels and classes of the images each source kind writes (before image_size and
# channels change them); kinds whose data decides are not listed
_KNOWN_IMAGES = {
    "embedded": (28, 1, len(MNIST_CLASSES)),
    "mnist": (28, 1, len(MNIST_CLASSES)),
    "dsprites": (64, 1, len(dsprites.SHAPES)),
}


def image_shape(config: Config) -> tuple[int | None, int | None, int | None]:
    """(side, channels, classes) of the image table this step will write, each None where only
    the data can tell (image folders, Parquet tables), for checks before anything runs."""
    side, channels, classes = _KNOWN_IMAGES.get(config.source.kind, (None, None, None))
    return config.image_size or side, config.channels or channels, classes


def fingerprint(config: Config) -> str | None:
    """Sizes and modification times of the source files, so edited data is not served from cache."""
    if config.source.path is None:  # embedded or generated data
        return None
    root = Path(config.source.path).expanduser()
    if not root.exists():
        return None  # may exist only on the worker nodes; checked when the stage runs
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    parts = [
        f"{p.relative_to(root) if p != root else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in paths[:200_000]
    ]
    return "\n".join(parts)


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Reads the source, splits, resizes and writes the image table into `out`."""
    pools, class_names, problems = _read_source(config)
    pool_images, pool_labels, pool_splits, pool_ids, pool_factors = [], [], [], [], []
    for pool in pools:
        images, labels, ids = pool["images"], pool["labels"], pool["ids"]
        factors = pool.get("factors", np.zeros((len(ids), 0), np.int64))
        if config.limit is not None:
            images, labels, ids, factors = (
                images[: config.limit],
                labels[: config.limit],
                ids[: config.limit],
                factors[: config.limit],
            )
        n = len(images)
        if pool["split"] == "train":
            splits = np.full(n, "train", dtype=object)
            n_val = int(round(config.val_fraction * n))
            order = np.random.default_rng(config.seed).permutation(n)
            splits[order[:n_val]] = "val"
        else:
            splits = np.full(n, pool["split"], dtype=object)
        pool_images.extend(images)
        pool_labels.append(np.asarray(labels, np.int64))
        pool_splits.append(splits)
        pool_ids.append(np.asarray(ids, np.int64))
        pool_factors.append(np.asarray(factors, np.int64))
        log.info("ingest: %d images from %s", n, pool["name"])

    if not pool_images:
        raise ValueError(f"source {config.source.kind} {config.source.path or ''}: no images found")
    images = _to_uniform(pool_images, config)
    meta = ImageTableMeta(
        height=images.shape[1],
        width=images.shape[2],
        channels=images.shape[3],
        class_names=class_names,
        **(_DSPRITES_FACTORS if config.source.kind == "dsprites" else {}),
    )
    table = ImageTable(
        meta,
        np.concatenate(pool_ids),
        np.concatenate(pool_labels),
        np.concatenate(pool_splits),
        images,
        np.concatenate(pool_factors),
    )
    files = write_image_table(out, table, config.rows_per_file)
    counts = {s: int(np.sum(table.splits == s)) for s in ("train", "val", "test")}
    labelled = table.labels[table.labels >= 0]
    log.info(
        "ingest: wrote %d images (%s) as %dx%dx%d in %d file(s)",
        len(table),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        meta.height,
        meta.width,
        meta.channels,
        len(files),
    )
    return {
        "images": len(table),
        "splits": counts,
        "height": meta.height,
        "width": meta.width,
        "channels": meta.channels,
        "num_classes": len(class_names),
        "class_counts": np.bincount(labelled, minlength=len(class_names)).tolist(),
        "corrupt": {"count": len(problems), "examples": problems[:20]},
    }


# ----- sources ------------------------------------------------------------------------------


def _read_source(config: Config) -> tuple[list[dict], list[str], list[str]]:
    kind = config.source.kind
    if kind == "embedded":
        return read_mnist_dir(EMBEDDED_DIR), MNIST_CLASSES, []
    if kind == "dsprites":
        return _generate_dsprites(config.source.count, config.seed), list(dsprites.SHAPES), []
    root = Path(config.source.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source.path {str(root)!r} does not exist")
    if kind == "mnist":
        return read_mnist_dir(root), MNIST_CLASSES, []
    if kind == "image_folder":
        return _read_image_folder(root, config.strict)
    return _read_parquet(root, config.strict)


_DSPRITES_FACTORS = {
    "factor_names": list(dsprites.FACTOR_NAMES),
    "factor_sizes": list(dsprites.FACTOR_SIZES),
}


def _generate_dsprites(count: int, seed: int) -> list[dict]:
    images, factors = dsprites.generate(count, seed=seed)
    return [
        {
            "name": f"dsprites ({count} images, seed {seed})",
            "split": "train",
            "images": list(images),
            "labels": factors[:, 0],  # the shape
            "ids": np.arange(count),
            "factors": factors,
        }
    ]


def _read_image_folder(root: Path, strict: bool) -> tuple[list[dict], list[str], list[str]]:
    from PIL import Image

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders (expected <path>/<class>/<image>.png)")
    images, labels, problems = [], [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append(_pil_to_array(im))
            except Exception as e:  # PIL raises many types for broken files
                if strict:
                    raise ValueError(f"{path}: unreadable image ({e})") from e
                problems.append(f"{path.relative_to(root)}: {type(e).__name__}")
                continue
            labels.append(label)
    if problems:
        log.warning("ingest: skipped %d unreadable image(s), e.g. %s", len(problems), problems[0])
    pool = {
        "name": str(root),
        "split": "train",
        "ids": np.arange(len(images)),
        "images": images,
        "labels": labels,
    }
    return [pool], [p.name for p in class_dirs], problems


def _pil_to_array(im) -> np.ndarray:
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else "L")
    array = np.asarray(im, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _read_parquet(root: Path, strict: bool) -> tuple[list[dict], list[str], list[str]]:
    import pyarrow.parquet as pq

    from stages.formats.images import META_KEY, table_from_arrow

    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if not files:
        raise ValueError(f"{root}: no .parquet files")
    pools, class_names = [], []
    for path in files:
        try:
            table = pq.read_table(path)
            meta = ImageTableMeta.from_json(table.schema.metadata[META_KEY])
            data = table_from_arrow(table, meta)
        except Exception as e:
            raise ValueError(f"{path}: not a readable twostage image table ({e})") from e
        class_names = meta.class_names
        for split in ("train", "val", "test"):
            mask = data.splits == split
            if not mask.any():
                continue
            # train and val are re-split by this stage's seed; test stays test
            pools.append(
                {
                    "name": f"{path.name}[{split}]",
                    "split": "test" if split == "test" else "train",
                    "images": list(data.images[mask]),
                    "labels": data.labels[mask],
                    "ids": data.ids[mask],
                }
            )
    return pools, class_names, []


# ----- shaping ------------------------------------------------------------------------------


def _to_uniform(images: list[np.ndarray], config: Config) -> np.ndarray:
    """Brings every image to the same size and channel count; returns uint8 ``n h w c``."""
    channels = config.channels or max(im.shape[2] for im in images)
    size = config.image_size
    shapes = {im.shape[:2] for im in images}
    if size is None and len(shapes) > 1:
        raise ValueError(
            f"images have {len(shapes)} different sizes (e.g. {sorted(shapes)[:3]}); "
            "set image_size to bring them to one"
        )
    out_h, out_w = (size, size) if size else next(iter(shapes))
    out = np.zeros((len(images), out_h, out_w, channels), np.uint8)
    for i, im in enumerate(images):
        im = _convert_channels(im, channels)
        h, w = im.shape[:2]
        if (h, w) != (out_h, out_w):
            if config.resize == "pad":
                if h > out_h or w > out_w:
                    raise ValueError(
                        f"image of {h}x{w} is larger than image_size {size}; "
                        "use resize: resize to scale it down"
                    )
                top, left = (out_h - h) // 2, (out_w - w) // 2
                out[i, top : top + h, left : left + w] = im
                continue
            im = _resize(im, out_h, out_w)
        out[i] = im
    return out


def _convert_channels(im: np.ndarray, channels: int) -> np.ndarray:
    if im.shape[2] == channels:
        return im
    if channels == 3:
        return np.repeat(im, 3, axis=2)
    grey = im[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]


def _resize(im: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(im[..., 0] if im.shape[2] == 1 else im)
    array = np.asarray(pil.resize((w, h), Image.BILINEAR), np.uint8)
    return array[..., None] if array.ndim == 2 else array
