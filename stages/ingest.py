"""Ingest stage: a data source -> an image table (`stages.tables`) or a sequence table artifact.

Image sources (``source.kind``), written as an image table:

- ``embedded``: 7,000 real MNIST digits shipped in ``stages/data/mnist_subset`` (licence note there),
  so a fresh machine needs no network and no data directory;
- ``mnist``: a directory of standard IDX files (``train-images-idx3-ubyte[.gz]``, ...), raw or
  gzipped; the ``t10k`` files, when present, become the ``test`` split;
- ``image_folder``: ``<path>/<class name>/*.png|jpg|jpeg`` (classes sorted by name);
- ``parquet``: an existing image table (a file or a directory of Parquet files written by this
  stage, e.g. copied out of another store);
- ``dsprites``: ``source.count`` procedural dSprites images (`stages.dsprites`, 64x64) drawn
  uniformly from the factor grid with ``seed``; the factors are stored as ``factor_*`` columns and
  the shape is the class label.

Images of the training pool are split into ``train`` and ``val`` by a seeded permutation. An
optional ``image_size`` pads (centred, zeros) or resizes every image to a square. Unreadable
files of an image folder are counted and listed in the metrics, or stop the stage when
``strict`` is set; an unreadable IDX or Parquet file always stops it, naming the file.

Sequence sources, written as a sequence table (`stages.sequences`) for the TD-VAE stage:

- ``moving_mnist``: bouncing Moving MNIST (`stages.moving_mnist.Bouncing`: ``num_digits``
  digits moving at ``speed`` on a ``canvas``, ``frames`` per sequence);
- ``shifted_mnist``: one digit shifted ``shift`` px per frame with wrap-around
  (`stages.moving_mnist.Shifted`).

Their digits come from the embedded subset, or from the IDX directory ``source.path``. The
train file's digits are split by ``val_fraction`` with ``seed`` into two disjoint parts: ``train``
sequences draw only from one, ``val`` sequences only from the other. ``source.count`` sequences
are written to train and val (``val_fraction`` of them to val), and as many ``test`` sequences as
val ones from the ``t10k`` digits when the directory has them. Row ``i`` (its ``id``) is drawn
with seed ``seed * 1_000_003 + i`` (`stages.moving_mnist.sequence_seeds`), stored in the row.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import ConfigError
from stages import Input, dsprites, moving_mnist
from stages.sequences import SequenceTable, SequenceTableMeta, write_sequence_table
from stages.tables import ImageTable, ImageTableMeta, write_image_table

VERSION = "1"
INPUTS: dict[str, Input] = {}
EMBEDDED_DIR = Path(__file__).parent / "data" / "mnist_subset"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MNIST_CLASSES = [str(d) for d in range(10)]
SEQUENCE_KINDS = {"moving_mnist": moving_mnist.Bouncing, "shifted_mnist": moving_mnist.Shifted}
SEQUENCE_FIELDS = ("frames", "canvas", "num_digits", "digit_size", "speed", "shift")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where the images or sequences come from.

    Args:
        kind: ``embedded``, ``mnist``, ``image_folder``, ``parquet`` or ``dsprites`` (images);
            ``moving_mnist`` or ``shifted_mnist`` (sequences).
        path: Directory or file to read (not used by ``embedded`` and ``dsprites``; optional for
            the sequence kinds: an MNIST IDX directory, else the embedded digits).
        count: Images to generate (``dsprites``) or train + val sequences (sequence kinds; at
            the defaults a sequence takes 82 KB, and ingest holds them all in memory).
        frames: Frames per sequence (sequence kinds).
        canvas: Frame side in pixels (sequence kinds).
        num_digits: Digits per sequence (``moving_mnist``).
        digit_size: Digit side on the canvas in pixels, resized bilinearly from MNIST's 28
            (sequence kinds).
        speed: Distance per frame as a fraction of ``canvas - digit_size`` (``moving_mnist``).
        shift: Pixels moved per frame (``shifted_mnist``).
    """

    kind: Literal[
        "embedded", "mnist", "image_folder", "parquet", "dsprites", "moving_mnist", "shifted_mnist"
    ] = "embedded"
    path: str | None = None
    count: int = 20_000
    frames: int = 20
    canvas: int = 64
    num_digits: int = 2
    digit_size: int = 28
    speed: float = 0.1
    shift: int = 1

    def __post_init__(self):
        if self.kind in ("embedded", "dsprites") and self.path is not None:
            raise ConfigError(f"path: source kind {self.kind!r} reads no files; remove path")
        if self.kind in ("mnist", "image_folder", "parquet") and not self.path:
            raise ConfigError(f"path: required for source kind {self.kind!r}")
        if self.count < 1:
            raise ConfigError(f"count: must be positive, got {self.count}")
        generator = SEQUENCE_KINDS.get(self.kind)
        used = {f.name for f in fields(generator)} if generator else set()
        for name in SEQUENCE_FIELDS:
            if name not in used and getattr(self, name) != _SOURCE_DEFAULTS[name]:
                raise ConfigError(f"{name}: not used by source kind {self.kind!r}; remove {name}")
        if generator:
            try:
                sequence_generator(self)
            except ValueError as e:  # messages start with the field name, as Source's do
                raise ConfigError(str(e)) from None


_SOURCE_DEFAULTS = {f.name: f.default for f in fields(Source)}


def sequence_generator(source: Source) -> moving_mnist.Bouncing | moving_mnist.Shifted:
    """The `stages.moving_mnist` generator of a sequence source, with the source's parameters."""
    generator = SEQUENCE_KINDS[source.kind]
    return generator(**{f.name: getattr(source, f.name) for f in fields(generator)})


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
        if self.source.kind in SEQUENCE_KINDS:
            if self.image_size is not None:
                raise ConfigError(
                    "image_size: sequence sources size their frames with source.canvas; "
                    "remove image_size"
                )
            if self.channels not in (None, 1):
                raise ConfigError("channels: sequence frames are grey; remove channels")


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
    """Reads the source, splits, resizes and writes the image table into `out` (or generates
    and writes the sequence table, for the sequence sources)."""
    if config.source.kind in SEQUENCE_KINDS:
        return _run_sequences(config, out)
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


# ----- sequences ----------------------------------------------------------------------------


def _run_sequences(config: Config, out: Path) -> dict:
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
            "ingest: %d %s %s sequences from %d digits of %s",
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
        "ingest: wrote %d %s sequences (%s) of %d frames of %dx%d in %d file(s)",
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
    for pool in _read_mnist_dir(root):
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


# ----- sources ------------------------------------------------------------------------------


def _read_source(config: Config) -> tuple[list[dict], list[str], list[str]]:
    kind = config.source.kind
    if kind == "embedded":
        return _read_mnist_dir(EMBEDDED_DIR), MNIST_CLASSES, []
    if kind == "dsprites":
        return _generate_dsprites(config.source.count, config.seed), list(dsprites.SHAPES), []
    root = Path(config.source.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source.path {str(root)!r} does not exist")
    if kind == "mnist":
        return _read_mnist_dir(root), MNIST_CLASSES, []
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


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (raw or gzipped) of uint8 data; errors name the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x} is not uint8")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: holds {len(raw) - header} data bytes, header says {expected} (truncated?)"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (root / name).is_file():
            return root / name
    return None


def _read_mnist_dir(root: Path) -> list[dict]:
    pools, offset = [], 0
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if images_path is None:
            if split == "train":
                raise FileNotFoundError(f"{root}: no train-images-idx3-ubyte[.gz] file")
            continue
        if labels_path is None:
            raise FileNotFoundError(f"{root}: {images_path.name} has no matching labels file")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{images_path}: {images.shape} images do not match {labels_path.name} {labels.shape}"
            )
        ids = offset + np.arange(len(images), dtype=np.int64)
        offset += len(images)
        pools.append(
            {
                "name": images_path.name,
                "split": split,
                "ids": ids,
                "images": images[..., None],
                "labels": labels,
            }
        )
    return pools


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

    from stages.tables import META_KEY, table_from_arrow

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
