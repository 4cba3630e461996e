"""Image folders: ``<root>/<class>/**/*.png|jpg|jpeg`` on a local disk or any pyarrow filesystem
(``s3://bucket/prefix``), listed, split and decoded without holding the folder in memory.

- `list_images` lists the files (classes: the sub-folders, sorted by name). Each file gets an id
  and its split from hashes of its path relative to the root, so the same folder always gives
  the same ids and splits, whatever the order of listing, and no global permutation is held.
  Files are listed in id order, which is random with respect to class and name: the table
  written in that order needs no further shuffling to be read in random order.
- `decode_part` (a Ray task of the ingest stage, light to import: numpy, PIL, pyarrow) reads,
  decodes, converts and resizes a part of the folder a row group at a time and writes it as
  finished Parquet files: straight into the table's directory on the ingest step's node, as
  bytes returned to it from other nodes, so the pixels cross processes at most once. An
  unreadable file becomes a ``problem`` instead of an error, so the stage decides (count it,
  or stop under ``strict``).
- `shape_image` brings one image to the table's size and channels (``center_crop``, ``pad`` or
  ``resize``); the in-memory sources use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os

import numpy as np
import pyarrow.fs as pafs

from stages.formats.images import (
    ImageTable,
    ImageTableMeta,
    ParquetFile,
    file_bound,
    group_rows,
    pixel_codec,
    table_schema,
    to_arrow,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it) of a local path or a URI such as ``s3://bucket/x``."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    from pathlib import Path

    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def list_images(
    fs: pafs.FileSystem, root: str, seed: int, val_fraction: float
) -> tuple[list[dict], list[str], int]:
    """(rows ``{path, relpath, id, label, split, size, mtime}`` in id order, class names,
    other files).

    ``split`` is ``val`` for a seeded-hash fraction `val_fraction` of the files, else ``train``;
    ``size`` and ``mtime`` (ns, None where the filesystem has none) tell an edited file apart.
    """
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source.path {root!r} does not exist")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{root}: not a folder (expected <path>/<class>/<image>.png)")
    classes = sorted(
        e.base_name
        for e in fs.get_file_info(pafs.FileSelector(root))
        if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")
    )
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected <path>/<class>/<image>.png)")
    rows, others = [], 0
    for label, name in enumerate(classes):
        selector = pafs.FileSelector(f"{root}/{name}", recursive=True)
        for entry in fs.get_file_info(selector):
            if entry.type != pafs.FileType.File or entry.base_name.startswith("."):
                continue
            if not entry.base_name.lower().endswith(IMAGE_SUFFIXES):
                others += 1
                continue
            relpath = entry.path[len(root) :].lstrip("/")
            rows.append(
                {
                    "path": entry.path,
                    "relpath": relpath,
                    "id": _hash(relpath.encode()) >> 1,  # 63 bits: a non-negative int64
                    "label": label,
                    "split": "val" if unit(seed, relpath) < val_fraction else "train",
                    "size": entry.size,
                    "mtime": entry.mtime_ns,
                }
            )
    rows.sort(key=lambda r: r["id"])
    return rows, classes, others


def decoder_version() -> str:
    """The versions of what decodes the images (Pillow and its libjpeg-turbo): a part decoded
    by other versions may hold other pixels."""
    from PIL import __version__, features

    return f"Pillow {__version__} libjpeg-turbo {features.version('libjpeg_turbo')}"


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def unit(seed: int, relpath: str) -> float:
    """A number in [0, 1) fixed by the seed and a path (or any name): the split draw."""
    return _hash(f"{seed}\0{relpath}".encode()) / 2**64


def probe(fs: pafs.FileSystem, rows: list[dict], count: int = 64) -> tuple[int, int, int]:
    """(height, width, channels) the table takes when the config does not say: the size of the
    first readable image (in id order); 3 channels if any of the first `count` readable images
    is in colour, else 1."""
    from PIL import Image

    size, channels, seen = None, 1, 0
    for row in rows:
        try:
            with fs.open_input_file(row["path"]) as f, Image.open(io.BytesIO(f.read())) as im:
                im.load()
                array = to_array(im)
        except Exception:  # counted when the batch functions meet it
            continue
        size = size or array.shape[:2]
        channels = max(channels, 3 if array.shape[2] >= 3 else 1)
        seen += 1
        if seen >= count:
            break
    if size is None:
        raise ValueError(f"none of the {len(rows)} image file(s) is readable")
    return size[0], size[1], channels


def decode_part(
    rows: list[dict],
    fs: pafs.FileSystem,
    meta: ImageTableMeta,
    mode: str,
    min_file_rows: int,
    local: tuple[str, str] | None = None,
    remote: tuple[pafs.FileSystem, str] | None = None,
) -> dict:
    """Decodes `rows` (from `list_images`) into `meta`'s size and channels, a row group at a
    time into one reused buffer (the task's memory is a row group, whatever the part's size);
    returns

    - ``files``: one Parquet file for each split with at least `min_file_rows` rows, as
      ``(split, rows, path, sha256)`` when the task runs on the node of `local` (the ingest
      step's node id and a path prefix there): it wrote the file ``<prefix>-<split>.parquet``
      itself, past the page cache, so the pixels never cross processes; with `remote` (an
      object store's filesystem and a path prefix in it) it uploaded the file there itself,
      from whichever node; elsewhere ``(split, rows, file bytes, sha256)``;
    - ``tables``: the rows of the smaller splits, as `ImageTable`s, for the writer to gather
      into files of a useful size (the val split is a few percent of each part);
    - ``splits``, ``labels``: of every row decoded, for the counts;
    - ``problems``: ``(message, fatal)`` for each file left out (fatal: the stage must stop
      whatever ``strict`` says).
    """
    import ray

    here = local is not None and ray.get_runtime_context().get_node_id() == local[0]
    schema, group = table_schema(meta), group_rows(meta)
    files, tables, problems, splits, labels = [], [], [], [], []
    rows = sorted(rows, key=lambda r: r["split"])  # stable: each split one run, in id order
    for split, run in itertools.groupby(rows, key=lambda r: r["split"]):
        run = list(run)
        if len(run) < min_file_rows:
            table = _decode_rows(run, fs, meta, mode, f"rows-{split}", problems)
            tables.append(table)
            splits.append(table.splits)
            labels.append(table.labels)
            continue
        file, stored_rows = None, 0
        for start in range(0, len(run), group):
            table = _decode_rows(run[start : start + group], fs, meta, mode, "pixels", problems)
            if file is None and len(table):
                codec = pixel_codec(table.images)
                if remote is not None:
                    path = f"{remote[1]}-{split}.parquet"
                    file = ParquetFile(path, schema, codec, filesystem=remote[0])
                elif here:
                    path = f"{local[1]}-{split}.parquet"
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # left by an attempt of this task whose worker died
                    file = ParquetFile(path, schema, codec)
                else:
                    buffer = _reused(f"file-{split}", file_bound(len(run), meta))
                    file = ParquetFile(None, schema, codec, buffer)
            if len(table):
                file.write_table(to_arrow(table, schema), group)
                stored_rows += len(table)
            splits.append(table.splits)
            labels.append(table.labels)
        if file is not None:
            sha256 = file.close()
            stored = path if here or remote is not None else file.data
            files.append((split, stored_rows, stored, sha256))
    # Ray copies the result (views of the reused buffers) into its object store on return
    return {
        "files": files,
        "tables": tables,
        "splits": np.concatenate(splits) if splits else np.zeros(0, object),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "problems": problems,
    }


def _decode_rows(
    rows: list[dict], fs, meta: ImageTableMeta, mode: str, buffer: str, problems: list
) -> ImageTable:
    """`rows` decoded into the reused buffer `buffer`, as a table of the readable ones; the
    others' ``(message, fatal)`` are appended to `problems`."""
    batch = {k: [r[k] for r in rows] for k in ("path", "relpath", "id", "label", "split")}
    shape = (len(rows), meta.height, meta.width, meta.channels)
    pixels = _reused(buffer, int(np.prod(shape))).reshape(shape)
    out = decode_batch(batch, fs, meta.height, meta.width, meta.channels, mode, pixels)
    table = ImageTable(meta, out["id"], out["label"], out["split"], out["image"])
    bad = out["problem"] != ""
    if not bad.any():
        return table
    problems += [(p, bool(f)) for p, f in zip(out["problem"][bad], out["fatal"][bad], strict=True)]
    return table.take(~bad)  # a copy, only for row groups with unreadable files


# per process: the buffers of the last part decoded, reused by the next. Memory fresh from the
# OS costs a page fault per 4 KB touched (on a 2-core VM: seconds per GB, slower than decoding
# the images), so a task that allocated its buffers anew for every part would pay that each time.
_buffers: dict[str, np.ndarray] = {}


def _reused(name: str, size: int) -> np.ndarray:
    """`size` bytes of the process's buffer `name` (its contents are left over)."""
    if name not in _buffers or _buffers[name].size < size:
        _buffers[name] = np.empty(size, np.uint8)
    return _buffers[name][:size]


def decode_batch(
    batch: dict,
    fs: pafs.FileSystem,
    height: int,
    width: int,
    channels: int,
    mode: str,
    images: np.ndarray | None = None,
) -> dict:
    """Files -> ``id, label, split, image (n h w c uint8), problem`` (``problem``: empty, or
    why the file is missing from the table; its image is zeros; ``fatal`` problems stop the
    stage whatever ``strict`` says). `images` (n h w c), when given, receives the pixels."""
    from PIL import Image

    n = len(batch["path"])
    if images is None:
        images = np.zeros((n, height, width, channels), np.uint8)
    problems, fatal = [""] * n, np.zeros(n, bool)
    for i, (path, relpath) in enumerate(zip(batch["path"], batch["relpath"], strict=True)):
        try:
            with fs.open_input_file(path) as f, Image.open(io.BytesIO(f.read())) as im:
                im.load()
                shaped = _shape_in_pil(im, height, width, channels, mode)
                array = to_array(im) if shaped is None else None
        except Exception as e:  # PIL raises many types for broken files
            problems[i] = f"{relpath}: unreadable image ({type(e).__name__}: {e})"
            images[i] = 0
            continue
        if shaped is not None:
            images[i] = shaped
            continue
        try:
            images[i] = shape_image(array, height, width, channels, mode)
        except ValueError as e:
            problems[i], fatal[i] = f"{relpath}: {e}", True
            images[i] = 0
    return {
        "id": np.asarray(batch["id"], np.int64),
        "label": np.asarray(batch["label"], np.int64),
        "split": np.asarray(batch["split"], dtype=object),
        "image": images,
        "problem": np.asarray(problems, dtype=object),
        "fatal": fatal,
    }


def _shape_in_pil(im, height: int, width: int, channels: int, mode: str) -> np.ndarray | None:
    """`shape_image` of ``to_array(im)`` for the common case, an 8-bit image with the target's
    channels to ``center_crop`` or ``resize``, done in PIL: the same pixels, without copying
    the full-size image into numpy first (a fifth of the decode time of a 500x375 JPEG).
    None for every other case."""
    from PIL import Image

    w, h = im.size
    if im.mode != ("L" if channels == 1 else "RGB") or (h, w) == (height, width):
        return None
    if mode == "center_crop":
        top, left, crop_h, crop_w = _center_box(h, w, height, width)
        im = im.crop((left, top, left + crop_w, top + crop_h))
    elif mode != "resize":
        return None
    if im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    array = np.asarray(im, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def to_array(im) -> np.ndarray:
    """A PIL image as uint8 ``h w c`` with 1 (grey) or 3 (RGB) channels: alpha is dropped,
    16- and 32-bit grey is scaled to 8 bits, palettes and CMYK become RGB."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(im).astype(np.int64)
        top = 65535 if im.mode.startswith("I;16") else max(int(array.max()), 1)
        return np.clip(array * 255 // max(top, 1), 0, 255).astype(np.uint8)[..., None]
    if im.mode == "F":
        array = np.asarray(im, np.float32)
        return np.clip(np.rint(array * 255 / max(float(array.max()), 1.0)), 0, 255).astype(
            np.uint8
        )[..., None]
    if im.mode not in ("L", "RGB"):
        im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
    array = np.asarray(im, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def shape_image(array: np.ndarray, height: int, width: int, channels: int, mode: str):
    """`array` (uint8 ``h w c``) with `channels` channels at ``height x width``.

    Modes: ``center_crop`` crops the centred square (or the centred box of the target's aspect)
    then resizes, as the VQ-VAE-2 paper does for ImageNet and FFHQ; ``pad`` centres a smaller
    image on a zero canvas (ValueError for a larger one); ``resize`` rescales, bilinear;
    ``same`` takes only images of the target size (ValueError for others).
    """
    array = convert_channels(array, channels)
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    if mode == "same":
        raise ValueError(
            f"images have different sizes (this one {h}x{w}, the first {height}x{width}); "
            "set image_size to bring them to one"
        )
    if mode == "pad":
        if h > height or w > width:
            raise ValueError(
                f"image of {h}x{w} is larger than image_size {height}; "
                "use resize: center_crop or resize to scale it down"
            )
        out = np.zeros((height, width, channels), np.uint8)
        top, left = (height - h) // 2, (width - w) // 2
        out[top : top + h, left : left + w] = array
        return out
    if mode == "center_crop":
        top, left, crop_h, crop_w = _center_box(h, w, height, width)
        array = array[top : top + crop_h, left : left + crop_w]
        if (crop_h, crop_w) == (height, width):
            return np.ascontiguousarray(array)
    return _resize(array, height, width)


def _center_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the centred box of an ``h x w`` image with the target's aspect."""
    crop_h, crop_w = min(h, w * height // width), min(w, h * width // height)
    return (h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w


def convert_channels(array: np.ndarray, channels: int) -> np.ndarray:
    if array.shape[2] == channels:
        return array
    if channels == 3:
        return np.repeat(array, 3, axis=2)
    grey = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))
    out = np.asarray(pil.resize((width, height), Image.BILINEAR), np.uint8)
    return out[..., None] if out.ndim == 2 else out
