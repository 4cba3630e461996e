"""MNIST as standard IDX files (raw or gzipped), and the embedded subset the project ships.

``data/mnist_subset`` holds 7,000 real MNIST digits (licence note there), so a fresh machine
needs no network and no data directory.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

EMBEDDED_DIR = Path(__file__).parent / "data" / "mnist_subset"
MNIST_CLASSES = [str(d) for d in range(10)]


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


def find_idx(root: Path, stem: str) -> Path | None:
    """The IDX file `stem` in `root`, raw or gzipped, with ``-idx`` or ``.idx`` in its name."""
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (root / name).is_file():
            return root / name
    return None


def read_mnist_dir(root: Path) -> list[dict]:
    """The pools of an IDX directory: ``train`` from the train files and, when the t10k files
    are there, ``test``. Each: name, split, ids (int64, unique across pools), images
    ``n h w 1`` uint8 and labels."""
    pools, offset = [], 0
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images_path = find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels_path = find_idx(root, f"{prefix}-labels-idx1-ubyte")
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
