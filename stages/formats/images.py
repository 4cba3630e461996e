"""The image table: the artifact format the ingest stage writes and image-reading stages read.

Parquet files ``images-00000.parquet``, ... with one row per image:

- ``id`` (int64): stable image id, unique within the table;
- ``label`` (int16, nullable): class index, null when unlabelled;
- ``split`` (string): ``train``, ``val`` or ``test``;
- ``image`` (binary): raw uint8 pixels, row-major ``h w c``;
- ``factor_<name>`` (int16), only in procedural tables (dSprites): the ground-truth generative
  factors as grid indices, named in the metadata's ``factor_names`` / ``factor_sizes``.

The file metadata key ``twostage.image_table`` holds `ImageTableMeta` as JSON (height, width,
channels, class names, schema version), so plain ``pyarrow.parquet.read_table`` can read and
reshape the pixels without this project installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store import CorruptArtifactError

SCHEMA_VERSION = 1
META_KEY = b"twostage.image_table"
SPLITS = ("train", "val", "test")

ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("label", pa.int16(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
    ]
)


@dataclass(frozen=True)
class ImageTableMeta:
    """Metadata stored in every image-table Parquet file."""

    height: int
    width: int
    channels: int
    class_names: list[str] = field(default_factory=list)
    factor_names: list[str] = field(default_factory=list)
    factor_sizes: list[int] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ImageTableMeta:
        data = json.loads(raw)
        return cls(**data)


@dataclass
class ImageTable:
    """An image table in memory. ``images`` is uint8 ``n h w c``; ``labels`` uses -1 for none;
    ``factors`` is int ``n k`` (k = ``len(meta.factor_names)``; ``n 0`` when there are none)."""

    meta: ImageTableMeta
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    images: np.ndarray
    factors: np.ndarray | None = None

    def __post_init__(self):
        if self.factors is None:
            self.factors = np.zeros((len(self.ids), 0), np.int64)

    def split(self, name: str) -> ImageTable:
        mask = self.splits == name
        return ImageTable(
            self.meta,
            self.ids[mask],
            self.labels[mask],
            self.splits[mask],
            self.images[mask],
            self.factors[mask],
        )

    def __len__(self) -> int:
        return len(self.ids)


def write_image_table(
    out: Path, table: ImageTable, rows_per_file: int = 50_000, prefix: str = "images"
) -> list[str]:
    """Writes `table` as Parquet files into directory `out`; returns the file names."""
    meta = table.meta
    n = len(table)
    names = []
    for part, start in enumerate(range(0, max(n, 1), rows_per_file)):
        stop = min(start + rows_per_file, n)
        labels = table.labels[start:stop]
        pixels = np.ascontiguousarray(table.images[start:stop]).reshape(stop - start, -1)
        columns = {
            "id": pa.array(table.ids[start:stop], pa.int64()),
            "label": pa.array(labels, pa.int16(), mask=labels < 0),
            "split": pa.array(table.splits[start:stop].tolist(), pa.string()),
            "image": pa.array([row.tobytes() for row in pixels], pa.binary()),
        }
        schema = ARROW_SCHEMA
        for j, name in enumerate(meta.factor_names):
            columns[f"factor_{name}"] = pa.array(table.factors[start:stop, j], pa.int16())
            schema = schema.append(pa.field(f"factor_{name}", pa.int16(), nullable=False))
        arrow = pa.table(columns, schema=schema.with_metadata({META_KEY: meta.to_json()}))
        name = f"{prefix}-{part:05d}.parquet"
        pq.write_table(
            arrow,
            out / name,
            compression="zstd",
            use_dictionary=["split", "label"],
            row_group_size=4096,
        )  # row groups small enough to stream
        names.append(name)
    return names


def table_files(artifact) -> list[str]:
    """The image-table Parquet files of an artifact (``images-*.parquet``)."""
    return sorted(n for n in artifact.files if n.startswith("images-") and n.endswith(".parquet"))


def read_parquet_dataset(paths: list[str], filesystem, columns: list[str] | None = None):
    """``ray.data.read_parquet`` whose tasks reserve no CPU (reading is light I/O).

    Ray 2.60's default (V2) Parquet read lists files in a task that always reserves one CPU.
    When the pipeline's other stages hold every CPU, that task waits for one, and the stage with
    it; so the V1 read is used, which honours ``num_cpus=0`` for all of its tasks.
    """
    import logging

    import ray.data

    ray.data.DataContext.get_current().use_datasource_v2 = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-read estimates otherwise
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns, num_cpus=0)


def image_table_meta(artifact) -> ImageTableMeta:
    """The metadata of an image-table artifact, from one Parquet footer (no pixel reads)."""
    parts = table_files(artifact)
    if not parts:
        raise ValueError(f"{artifact.uri}: holds no Parquet files; is it an image table?")
    path = artifact.fs_path(parts[0])
    try:
        with artifact.store.fs.open_input_file(path) as f:
            size = f.size()
            raw = (pq.read_metadata(f).metadata or {}).get(META_KEY)
    except (OSError, pa.ArrowException) as e:
        artifact.read_bytes(parts[0])  # names a truncated or altered file with its remedy
        raise CorruptArtifactError(f"{path}: unreadable Parquet footer ({e})") from e
    if size != artifact.files[parts[0]]["size"]:
        artifact.read_bytes(parts[0])  # raises, naming the file
    if raw is None:
        raise ValueError(f"{artifact.uri}/{parts[0]}: no {META_KEY.decode()} metadata")
    return ImageTableMeta.from_json(raw)


def read_image_table(artifact, splits: tuple[str, ...] | None = None) -> ImageTable:
    """Reads an image-table artifact (verifying checksums) into memory.

    Args:
        artifact: A committed `pipeline.store.Artifact` written by the ingest stage.
        splits: Keep only these splits (default: all).
    """
    parts = table_files(artifact)
    if not parts:
        raise ValueError(f"{artifact.uri}: holds no Parquet files; is it an image table?")
    tables, meta = [], None
    for name in parts:
        table = pq.read_table(pa.BufferReader(artifact.read_bytes(name)))
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise ValueError(f"{artifact.uri}/{name}: no {META_KEY.decode()} metadata")
        meta = ImageTableMeta.from_json(raw)
        if meta.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"{artifact.uri}/{name}: image table schema version {meta.schema_version}, "
                f"this twostage reads {SCHEMA_VERSION}"
            )
        if splits is not None:
            table = table.filter(pc.is_in(table["split"], pa.array(list(splits))))
        tables.append(table)
    return table_from_arrow(pa.concat_tables(tables), meta)


def table_from_arrow(table: pa.Table, meta: ImageTableMeta) -> ImageTable:
    """Converts an Arrow image table to numpy arrays."""
    images = decode_pixels(table["image"], meta)
    labels = pc.fill_null(table["label"], -1).to_numpy().astype(np.int64)
    factors = np.stack(
        [table[f"factor_{name}"].to_numpy().astype(np.int64) for name in meta.factor_names]
        or [np.zeros(len(table), np.int64)],
        axis=1,
    )[:, : len(meta.factor_names)]
    return ImageTable(
        meta=meta,
        ids=table["id"].to_numpy().astype(np.int64),
        labels=labels,
        splits=np.asarray(table["split"].to_pylist(), dtype=object),
        images=images,
        factors=factors,
    )


def decode_pixels(column, meta: ImageTableMeta) -> np.ndarray:
    """The ``image`` column (binary, raw pixels) as uint8 ``n h w c`` without copying rows."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    shape = (n, meta.height, meta.width, meta.channels)
    if n == 0:
        return np.zeros(shape, np.uint8)
    pixels = meta.height * meta.width * meta.channels
    offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + n + 1]
    if not np.all(np.diff(offsets) == pixels):
        raise ValueError(f"image column holds rows of the wrong size (expected {pixels} bytes)")
    flat = np.frombuffer(column.buffers()[2], np.uint8)
    return flat[offsets[0] : offsets[0] + n * pixels].reshape(shape)
