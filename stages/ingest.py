"""Ingest stage: a data source -> an image table (`stages.formats.images`).

Sources (``source.kind``):

- ``embedded``: 7,000 real MNIST digits shipped in ``stages/sources/data/mnist_subset``
  (licence note there), so a fresh machine needs no network and no data directory;
- ``mnist``: a directory of standard IDX files (``train-images-idx3-ubyte[.gz]``, ...), raw or
  gzipped; the ``t10k`` files, when present, become the ``test`` split;
- ``image_folder``: ``<path>/<class name>/**/*.png|jpg|jpeg`` (classes sorted by name), a local
  folder or a pyarrow URI (``s3://bucket/prefix``); read by Ray tasks spread over the cluster
  (`stages.sources.image_folder.decode_part`) that decode, resize and encode parts of the folder
  as finished Parquet files, stored in order as they come, so no process holds the folder;
  finished parts are kept in the step's scratch, so an interrupted ingest resumes, also under
  a new key once a broken file is fixed;
- ``parquet``: an existing image table (a file or a directory of Parquet files written by this
  stage, e.g. copied out of another store), streamed a row group at a time;
- ``dsprites``: ``source.count`` procedural dSprites images (`stages.sources.dsprites`, 64x64)
  drawn uniformly from the factor grid with ``seed``; the factors are stored as ``factor_*``
  columns and the shape is the class label.

Images of the training pool are split into ``train`` and ``val``: by a seeded permutation for
the in-memory sources (``embedded``, ``mnist``, ``dsprites``), by a seeded hash of each file's
relative path (image folders) or of each id (Parquet tables) for the streamed ones, so the same
data always gives the same splits. An optional ``image_size`` brings every image to a square:
``center_crop`` (the centred square, resized), ``pad`` (centred on zeros) or ``resize``.
Unreadable files of an image folder are counted and listed in the metrics, or stop the stage
when ``strict`` is set; an unreadable IDX or Parquet file always stops it, naming the file.
Every source writes through the bounded writer (`stages.formats.images.ImageTableWriter`).
Sequence data (Moving MNIST) has its own stage, `stages.ingest_sequences`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import ConfigError, run_option
from pipeline.stage import Input
from pipeline.store import SCRATCH, link_or_copy, write_new_file
from stages.formats.images import (
    FILE_BYTES,
    ImageTable,
    ImageTableMeta,
    ImageTableWriter,
    table_from_arrow,
    write_image_table,
)
from stages.sources import dsprites
from stages.sources import image_folder as folder
from stages.sources.mnist import EMBEDDED_DIR, MNIST_CLASSES, read_mnist_dir

VERSION = "1"
INPUTS: dict[str, Input] = {}
PART_BYTES = 128 * 2**20  # pixels per decode task of an image folder: one file of the table
_TAKES = 16  # parts copied at once from another key's scratch
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
    },
    "rows_per_file": 50_000,  # files are bounded in bytes now (file_mb, not in keys)
}
DEFAULT_NUM_CPUS = 0  # an image folder's decode tasks reserve the CPUs; other sources are light

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where the images come from.

    Args:
        kind: ``embedded``, ``mnist``, ``image_folder``, ``parquet`` or ``dsprites``.
        path: Directory or file to read (``mnist``, ``image_folder``, ``parquet``); image
            folders and Parquet tables may be pyarrow URIs (``s3://bucket/prefix``).
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
        image_size: Bring every image to ``image_size x image_size`` (None: keep; an image
            folder's images must then share one size).
        resize: ``center_crop`` crops the centred square and rescales it (bilinear; the
            VQ-VAE-2 recipe for ImageNet and FFHQ); ``pad`` centres smaller images on a zero
            canvas (MNIST 28 -> 32); ``resize`` rescales the whole image (bilinear).
        channels: Convert to 1 (grey) or 3 (RGB) channels (None: keep the source's; an image
            folder is RGB if any of its first 64 images is in colour).
        val_fraction: Fraction of the training pool held out as the ``val`` split.
        seed: Seed of the train/val split.
        limit: Read at most this many images from each source file set (quick runs).
        strict: Stop on the first unreadable image instead of counting it.
        file_mb: Pixel megabytes per Parquet file (row groups hold at most 8 MB each).
        readers: Decode tasks of an image folder in flight at once, queued or running (None:
            twice the cluster's CPUs; each task takes one CPU and one part of the folder).
    """

    source: Source = field(default_factory=Source)
    image_size: int | None = None
    resize: Literal["pad", "resize", "center_crop"] = "pad"
    channels: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    limit: int | None = None
    strict: bool = False
    file_mb: int = run_option(FILE_BYTES // 2**20)
    readers: int | None = run_option(None)

    def __post_init__(self):
        if self.image_size is not None and not 4 <= self.image_size <= 4096:
            raise ConfigError(f"image_size: must be between 4 and 4096, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels: must be 1, 3 or null, got {self.channels}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be positive or null, got {self.limit}")
        if self.file_mb < 1:
            raise ConfigError(f"file_mb: must be positive, got {self.file_mb}")
        if self.readers is not None and self.readers < 1:
            raise ConfigError(f"readers: must be positive or null, got {self.readers}")
        if self.resize == "center_crop" and self.image_size is None:
            raise ConfigError("resize: center_crop needs image_size")


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
    """Sizes and modification times of the source files, so edited data is not served from
    cache; for the streamed sources also the split rule (hashes, not a permutation)."""
    if config.source.path is None or "://" in config.source.path:  # generated, or remote
        return None
    root = Path(config.source.path).expanduser()
    if not root.exists():
        return None  # may exist only on the worker nodes; checked when the stage runs
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    parts = [
        f"{p.relative_to(root) if p != root else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in paths[:200_000]
    ]
    if config.source.kind in ("image_folder", "parquet"):
        parts.insert(0, "split: seeded hash of each path or id")
    return "\n".join(parts)


def run(config: Config, inputs: dict, out: Path, scratch: str) -> dict:
    """Reads the source, splits, resizes and writes the image table into `out`."""
    start = time.perf_counter()
    if config.source.kind == "image_folder":
        tally = _ingest_folder(config, out, scratch)
    elif config.source.kind == "parquet":
        tally = _ingest_parquet(config, out)
    else:
        tally = _ingest_in_memory(config, out)
    return tally.metrics(out, time.perf_counter() - start)


class _Tally:
    """What went into the table, for the log and the metrics."""

    def __init__(self, writer: ImageTableWriter, total: int | None = None):
        self.writer, self.total = writer, total
        self.splits = {s: 0 for s in ("train", "val", "test")}
        self.classes = np.zeros(len(writer.meta.class_names), np.int64)
        self.problems: list[str] = []
        self.ignored = 0
        self.resumed_parts = 0  # parts of an image folder an earlier run stored (any key)
        self.start = self.last_log = time.perf_counter()

    def write(self, table: ImageTable) -> None:
        self.writer.write(table)
        self.count(table.splits, table.labels)

    def count(self, splits: np.ndarray, labels: np.ndarray) -> None:
        """Counts rows stored (by `write`, or as whole files by the writer's `adopt_file`)."""
        for split in self.splits:
            self.splits[split] += int(np.sum(splits == split))
        labelled = labels[labels >= 0]
        self.classes += np.bincount(labelled, minlength=len(self.classes))[: len(self.classes)]
        now = time.perf_counter()
        if now - self.last_log > 10:
            self.last_log = now
            rows = self.writer.rows
            of = f"/{self.total}" if self.total else ""
            log.info("ingest: %d%s images, %.0f img/s", rows, of, rows / (now - self.start))

    def metrics(self, out: Path, seconds: float) -> dict:
        files = self.writer.close()
        meta, rows = self.writer.meta, self.writer.rows
        if rows == 0:
            raise ValueError("no images to write: every image of the source was unreadable")
        size = sum(self.writer.stored.get(f) or (out / f).stat().st_size for f in files)
        log.info(
            "ingest: wrote %d images (%s) as %dx%dx%d in %d file(s), %.1f MB, %.0f img/s",
            rows,
            ", ".join(f"{k} {v}" for k, v in self.splits.items()),
            meta.height,
            meta.width,
            meta.channels,
            len(files),
            size / 1e6,
            rows / max(seconds, 1e-9),
        )
        if self.problems:
            log.warning(
                "ingest: skipped %d unreadable image(s), e.g. %s",
                len(self.problems),
                self.problems[0],
            )
        return {
            "images": rows,
            "splits": self.splits,
            "height": meta.height,
            "width": meta.width,
            "channels": meta.channels,
            "num_classes": len(meta.class_names),
            "class_counts": self.classes.tolist(),
            "corrupt": {"count": len(self.problems), "examples": self.problems[:20]},
            "ignored_files": self.ignored,
            "resumed_parts": self.resumed_parts,
            "files": len(files),
            "bytes": size,
            "pixel_bytes": rows * meta.height * meta.width * meta.channels,
            "seconds": round(seconds, 3),
            "images_per_s": rows / max(seconds, 1e-9),
        }


def _ingest_in_memory(config: Config, out: Path) -> _Tally:
    """The sources that fit in memory (MNIST, the embedded digits, generated dSprites)."""
    pools, class_names = _read_source(config)
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
    images = _to_uniform(pool_images, config)
    meta = ImageTableMeta(
        height=images.shape[1],
        width=images.shape[2],
        channels=images.shape[3],
        class_names=class_names,
        **(_DSPRITES_FACTORS if config.source.kind == "dsprites" else {}),
    )
    tally = _Tally(ImageTableWriter(out, meta, config.file_mb * 2**20))
    tally.write(
        ImageTable(
            meta,
            np.concatenate(pool_ids),
            np.concatenate(pool_labels),
            np.concatenate(pool_splits),
            images,
            np.concatenate(pool_factors),
        )
    )
    return tally


def _ingest_folder(config: Config, out: Path, scratch: str) -> _Tally:
    """An image folder through Ray tasks that decode parts of it into Parquet files; the files
    are stored in the order of the parts (the same folder gives the same files).

    Each finished part is kept in `scratch` (`_PartStore`) until the table is committed, so a
    rerun after an interruption decodes only the parts not yet done."""
    import ray

    from pipeline import cluster

    cluster.ensure_ray()
    fs, root = folder.filesystem(config.source.path)
    rows, classes, ignored = folder.list_images(fs, root, config.seed, config.val_fraction)
    rows = rows[: config.limit] if config.limit is not None else rows
    if not rows:
        raise ValueError(
            f"{config.source.path}: no .png, .jpg or .jpeg images in its class folders"
        )
    height = width = config.image_size
    channels = config.channels
    if height is None or channels is None:
        probed = folder.probe(fs, rows)
        height, width = (height, width) if height else probed[:2]
        channels = channels or probed[2]
    meta = ImageTableMeta(height=height, width=width, channels=channels, class_names=classes)
    tally = _Tally(ImageTableWriter(out, meta, config.file_mb * 2**20), total=len(rows))
    tally.ignored = ignored
    if ignored:
        log.warning("ingest: ignored %d file(s) that are not .png, .jpg or .jpeg", ignored)
    log.info("ingest: %d images in %d classes from %s", len(rows), len(classes), root)

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    window = config.readers or 2 * cpus
    # parts of at most PART_BYTES of pixels (one file; what a task on another node returns),
    # smaller for small folders, so that every CPU gets about eight
    size = min(
        tally.writer.capacity,
        max(1, PART_BYTES // (height * width * channels)),
        max(64, -(-len(rows) // (8 * min(cpus, window)))),
    )
    parts = [rows[i : i + size] for i in range(0, len(rows), size)]
    mode = config.resize if config.image_size else "same"
    task = ray.remote(num_cpus=1)(folder.decode_part)
    min_file_rows = max(1, size // 4)  # smaller splits of a part are gathered by the writer
    kept = _PartStore(scratch, meta)
    options = f"{root} {mode} {min_file_rows} {VERSION} {folder.decoder_version()}"
    tags = [kept.tag(part, options) for part in parts]
    done = kept.stored(tags)
    if done:
        log.info("ingest: resuming: %d of %d parts are stored already", len(done), len(parts))
    # the same images may have been decoded under another key: the folder's fingerprint
    # changed with a broken file fixed (every other part is the same), or with a file added
    # or removed (the parts before it in id order, while the part size stays the same); only
    # files whose modification times are known can be told apart from an edited copy
    known = {i for i, part in enumerate(parts) if all(r["mtime"] is not None for r in part)}
    taken = kept.take_from_others(tags, known - done)
    if taken:
        log.info(
            "ingest: reusing %d part(s) that a run under another key stored (the same files)",
            len(taken),
        )
        done |= taken
    node = ray.get_runtime_context().get_node_id()

    def submit(i: int):
        if i in done:
            return lambda: kept.load(tags[i])
        # tasks write their files into the part store themselves: on an object store from
        # every node, on a local store from this node
        prefix = f"{kept.root}/{tags[i]}"
        if not kept.local:
            return task.remote(parts[i], fs, meta, mode, min_file_rows, remote=(kept.fs, prefix))
        return task.remote(parts[i], fs, meta, mode, min_file_rows, local=(node, prefix))

    for i, part in enumerate(_in_order(submit, len(parts), window)):
        for message, fatal in part["problems"]:
            if fatal or config.strict:
                raise ValueError(message)
        if i not in done:
            part = kept.save(tags[i], part)
        tally.problems += [message for message, _ in part["problems"]]
        for split, count, path, sha256, size in part["files"]:
            if kept.local:
                tally.writer.adopt_file(split, path, count, sha256, keep=True)
            else:
                tally.writer.adopt_stored(split, path, count, size, sha256)
        for table in part["tables"]:
            tally.writer.write(table)
        tally.count(part["splits"], part["labels"])
    tally.resumed_parts = len(done)
    return tally


class _PartStore:
    """Finished parts of an image folder's ingest, kept under the step's scratch until the
    table is committed. On a local store that is the table's filesystem, so a part's file
    joins the table as a hard link; on an object store the decode tasks upload their files
    there themselves, and the commit copies them into the table inside the store (the step's
    node holds only the small files).

    A part is its files ``<tag>-<split>.parquet``, the rows of its smaller splits as
    ``<tag>-rows-<split>-00000.parquet``, and ``<tag>.json``, written last: the files, the
    labels, splits and problems. The tag hashes the part's files (with their sizes and
    modification times) and the table's shape, so a part is reused only for the same images
    decoded the same way: by a rerun of the key, or by another key of the stage whose scratch
    holds it (the folder changed elsewhere, e.g. a broken file was fixed)."""

    def __init__(self, scratch: str, meta: ImageTableMeta):
        import pyarrow.fs as pafs

        self.meta = meta
        self.local = "://" not in scratch
        if self.local:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(scratch) / "parts")
        else:
            self.fs, root = pafs.FileSystem.from_uri(scratch)
            self.root = f"{root.rstrip('/')}/parts"
        self.fs.create_dir(self.root)

    def tag(self, rows: list[dict], options: str) -> str:
        """The part's name: a hash of its files (path, size, modification time), their ids and
        splits, the table's shape and `options` (the folder, the decode's options, the version
        of the code that decodes)."""
        digest = hashlib.sha256(self.meta.to_json() + options.encode())
        for row in rows:
            fields = (row["relpath"], row["id"], row["split"], row["size"], row["mtime"])
            digest.update("".join(f"\0{f}" for f in fields).encode())
        return digest.hexdigest()[:24]

    def stored(self, tags: list[str]) -> set[int]:
        """The indices of the `tags` whose parts are stored whole (the record readable, every
        file of it there at its size); anything less is decoded again. One listing of the part
        store, then one read per stored part: an object store answers each request slowly."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.root, allow_not_found=True)
        sizes = {info.path: info.size for info in self.fs.get_file_info(selector)}
        done = set()
        for i, tag in enumerate(tags):
            if f"{self.root}/{tag}.json" not in sizes:
                continue
            try:
                record = self._record(tag)
                files = {f[2]: f[4] for f in record["files"]}  # path -> size
                files.update({path: sizes.get(path) for path in record["tables"]})
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                continue
            if all(path in sizes and sizes[path] == size for path, size in files.items()):
                done.add(i)
        return done

    def save(self, tag: str, part: dict) -> dict:
        """Stores a decode task's result (files from other nodes written here, the smaller
        splits' rows as files of their own) and returns it as `load` would."""
        files = []
        for split, count, stored, sha256 in part["files"]:
            path = stored
            if not isinstance(stored, str):  # the bytes of a file, from another node
                path = f"{self.root}/{tag}-{split}.parquet"
                Path(path).unlink(missing_ok=True)
                write_new_file(Path(path), stored, sha256)
            files.append((split, count, path, sha256, self.fs.get_file_info(path).size))
        tables = []
        with tempfile.TemporaryDirectory(prefix="twostage-part-") as tmp:
            directory = Path(self.root if self.local else tmp)
            for stale in directory.glob(f"{tag}-rows-*.parquet"):  # an earlier try's
                stale.unlink()
            for table in part["tables"]:  # one split each, a fraction of a file
                for name in write_image_table(directory, table, prefix=f"{tag}-rows"):
                    tables.append(f"{self.root}/{name}")
                    if not self.local:
                        with self.fs.open_output_stream(tables[-1]) as f:
                            f.write((directory / name).read_bytes())
        record = {
            "files": files,
            "tables": tables,
            "splits": part["splits"].tolist(),
            "labels": part["labels"].tolist(),
            "problems": part["problems"],
        }
        self._write_record(tag, record)
        return {**part, "files": files}

    def take_from_others(self, tags: list[str], todo: set[int]) -> set[int]:
        """Of the parts `todo` (indices of `tags`), those stored whole in the part store of
        another key of this stage (`others`), taken into this one; returns their indices."""
        taken: set[int] = set()
        for other in self.others():
            left = sorted(todo - taken)
            if not left:
                break
            found = [left[j] for j in sorted(other.stored([tags[i] for i in left]))]
            # an object store answers each copy slowly: many at once
            with ThreadPoolExecutor(_TAKES) as pool:
                took = pool.map(self._take, [other] * len(found), [tags[i] for i in found])
                taken |= {i for i, ok in zip(found, took, strict=True) if ok}
        return taken

    def others(self) -> list[_PartStore]:
        """The part stores of the stage's other keys: the scratch of a key is
        ``<store>/_scratch/<stage>/<key>`` (`pipeline.store.Store.scratch_uri`), so theirs are
        its siblings. None for a scratch elsewhere (a stage run outside a store)."""
        import copy

        import pyarrow.fs as pafs

        mine = posixpath.dirname(self.root)
        stage_dir = posixpath.dirname(mine)
        if posixpath.basename(posixpath.dirname(stage_dir)) != SCRATCH:
            return []
        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(stage_dir, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.path.rstrip("/") != mine:
                other = copy.copy(self)
                other.root = f"{info.path.rstrip('/')}/parts"
                found.append(other)
        return found

    def _take(self, other: _PartStore, tag: str) -> bool:
        """Part `tag` of `other` (stored whole) copied into this store: hard links on a local
        disk (the files are never changed once written), copies inside an object store. False
        when it is gone meanwhile (`twostage gc`); the next run overwrites what was copied."""
        try:
            record = other._record(tag)
            moved = {}
            for path in [f[2] for f in record["files"]] + list(record["tables"]):
                moved[path] = f"{self.root}/{posixpath.basename(path)}"
                if not self.local:
                    self.fs.copy_file(path, moved[path])
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(moved[path])
                link_or_copy(path, moved[path])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return False
        record["files"] = [[*f[:2], moved[f[2]], *f[3:]] for f in record["files"]]
        record["tables"] = [moved[path] for path in record["tables"]]
        self._write_record(tag, record)
        return True

    def _write_record(self, tag: str, record: dict) -> None:
        """Writes a part's record, last: a part counts as stored once its record is there."""
        if self.local:
            marker = Path(self.root) / f"{tag}.json"
            marker.with_suffix(".tmp").write_text(json.dumps(record))
            marker.with_suffix(".tmp").replace(marker)
        else:  # an object appears whole or not at all
            with self.fs.open_output_stream(f"{self.root}/{tag}.json") as f:
                f.write(json.dumps(record).encode())

    def load(self, tag: str) -> dict:
        import pyarrow.parquet as pq

        record = self._record(tag)
        tables = [pq.read_table(p, filesystem=self.fs) for p in record["tables"]]
        return {
            # a local part's files are hashed again at commit; an object store's are not read
            "files": [
                (f[0], f[1], f[2], None if self.local else f[3], f[4]) for f in record["files"]
            ],
            "tables": [table_from_arrow(table, self.meta) for table in tables],
            "splits": np.asarray(record["splits"], dtype=object),
            "labels": np.asarray(record["labels"], np.int64),
            "problems": [tuple(p) for p in record["problems"]],
        }

    def _record(self, tag: str) -> dict:
        with self.fs.open_input_stream(f"{self.root}/{tag}.json") as f:
            return json.loads(f.read())


def _in_order(submit, count: int, window: int):
    """The results of ``submit(0) ... submit(count - 1)`` (each returns a Ray object ref, or a
    function that gives the result), in that order, with at most `window` submitted and not
    yet taken: Ray runs as many of them at once as there are CPUs free, and memory is bounded
    whatever `count`. Work not yet taken is cancelled when the caller stops early."""
    import ray

    pending: collections.deque = collections.deque()
    submitted = 0
    try:
        while pending or submitted < count:
            while submitted < count and len(pending) < window:
                pending.append(submit(submitted))
                submitted += 1
            head = pending.popleft()
            yield head() if callable(head) else ray.get(head)
    finally:
        refs = [ref for ref in pending if not callable(ref)]
        for ref in refs:
            ray.cancel(ref)
        # taken, so that Ray does not print the errors of tasks that failed meanwhile (a full
        # disk fails them all) as unhandled tracebacks after the stage's own message
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30) if refs else ([], [])
        for ref in ready:
            with contextlib.suppress(Exception):
                ray.get(ref)


def check_upstream(config: Config, step, steps: dict) -> None:
    """A Parquet source must form one image table; checked before any work where the driver
    can see the files (elsewhere when the step runs)."""
    if config.source.kind == "parquet":
        import pyarrow.fs as pafs

        fs, root = folder.filesystem(config.source.path)
        if fs.get_file_info(root).type != pafs.FileType.NotFound:
            _parquet_source(config)


def _parquet_source(config: Config) -> tuple[object, list[str]]:
    """The Parquet files of ``source.path`` (filesystem, paths), checked to form one image
    table: one ``class_names`` and ``schema_version`` in every file's metadata, and no id twice
    across them (a pass over the footers and the id column: 8 bytes a row)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from stages.formats.images import META_KEY

    fs, root = folder.filesystem(config.source.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source.path {str(root)!r} does not exist")
    if info.type == pafs.FileType.File:
        paths = [root]
    else:
        selector = pafs.FileSelector(root, recursive=True)
        paths = sorted(e.path for e in fs.get_file_info(selector) if e.path.endswith(".parquet"))
    if not paths:
        raise ValueError(f"source.path: {root}: no .parquet files")
    first, ids = None, []
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                meta = ImageTableMeta.from_json(parquet.schema_arrow.metadata[META_KEY])
                ids.append(parquet.read(columns=["id"])["id"].to_numpy().astype(np.int64))
        except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as e:
            error = " ".join(f"{type(e).__name__}: {e}".split())
            raise ValueError(
                f"source.path: {path}: not a readable twostage image table ({error})"
            ) from None
        first = first or (path, meta)
        for what in ("class_names", "schema_version"):
            if getattr(meta, what) != getattr(first[1], what):
                raise ValueError(
                    f"source.path: {path}: {what} {getattr(meta, what)!r} differs from "
                    f"{getattr(first[1], what)!r} in {first[0]}; ingest them separately"
                )
    ids = np.sort(np.concatenate(ids))
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        raise ValueError(
            f"source.path: {root}: {len(np.unique(repeated))} id(s) appear in more than one "
            f"row (e.g. {int(repeated[0])}); ids must be unique across the files"
        )
    return fs, paths


def _ingest_parquet(config: Config, out: Path) -> _Tally:
    """An image table's Parquet files, a row group at a time; train and val are split again by
    this step's seed (a hash of each id), test stays test."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.formats.images import META_KEY, table_from_arrow

    fs, paths = _parquet_source(config)
    tally, rows = None, 0
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                source = ImageTableMeta.from_json(parquet.schema_arrow.metadata[META_KEY])
                if tally is None:
                    height = width = config.image_size
                    height, width = (height, width) if height else (source.height, source.width)
                    meta = ImageTableMeta(
                        height, width, config.channels or source.channels, source.class_names
                    )
                    tally = _Tally(ImageTableWriter(out, meta, config.file_mb * 2**20))
                for batch in parquet.iter_batches(batch_size=512):
                    if config.limit is not None and rows >= config.limit:
                        break
                    data = table_from_arrow(pa.Table.from_batches([batch]), source)
                    data = ImageTable(
                        meta,
                        data.ids,
                        data.labels,
                        _resplit(data.ids, data.splits, config),
                        _to_uniform(list(data.images), config, (height, width, meta.channels)),
                    )
                    if config.limit is not None:
                        data = data.take(slice(0, config.limit - rows))
                    tally.write(data)
                    rows += len(data)
        except (OSError, KeyError, TypeError, pa.ArrowException) as e:
            raise ValueError(f"{path}: not a readable twostage image table ({e})") from e
    return tally


def _resplit(ids: np.ndarray, splits: np.ndarray, config: Config) -> np.ndarray:
    """train/val again by a seeded hash of each id; test stays test."""
    out = np.where(splits == "test", "test", "train").astype(object)
    for i, image_id in enumerate(ids.tolist()):
        if out[i] == "train" and folder.unit(config.seed, str(image_id)) < config.val_fraction:
            out[i] = "val"
    return out


# ----- the in-memory sources ---------------------------------------------------------------


def _read_source(config: Config) -> tuple[list[dict], list[str]]:
    kind = config.source.kind
    if kind == "embedded":
        return read_mnist_dir(EMBEDDED_DIR), MNIST_CLASSES
    if kind == "dsprites":
        return _generate_dsprites(config.source.count, config.seed), list(dsprites.SHAPES)
    root = Path(config.source.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"source.path {str(root)!r} does not exist")
    return read_mnist_dir(root), MNIST_CLASSES


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


def _to_uniform(
    images: list[np.ndarray], config: Config, shape: tuple[int, int, int] | None = None
) -> np.ndarray:
    """Brings every image to one size and channel count (`shape`, else the config's, else the
    images' own); returns uint8 ``n h w c``."""
    if shape is None:
        sizes = {im.shape[:2] for im in images}
        if config.image_size is None and len(sizes) > 1:
            raise ValueError(
                f"images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                "set image_size to bring them to one"
            )
        side = config.image_size
        height, width = (side, side) if side else next(iter(sizes))
        shape = (height, width, config.channels or max(im.shape[2] for im in images))
    out = np.zeros((len(images), *shape), np.uint8)
    for i, im in enumerate(images):
        out[i] = folder.shape_image(im, *shape, config.resize)
    return out
