"""The image table: the artifact format the ingest stage writes and image-reading stages read.

Parquet files ``images-<split>-00000.parquet``, ... (one set per split; tables written before
the split sets hold all splits in ``images-00000.parquet``, ... and read the same) with one row
per image:

- ``id`` (int64): stable image id, unique within the table;
- ``label`` (int16, nullable): class index, null when unlabelled;
- ``split`` (string): ``train``, ``val`` or ``test``;
- ``image`` (large_binary; plain binary in older tables): raw uint8 pixels, row-major ``h w c``;
- ``factor_<name>`` (int16), only in procedural tables (dSprites): the ground-truth generative
  factors as grid indices, named in the metadata's ``factor_names`` / ``factor_sizes``.

The file metadata key ``twostage.image_table`` holds `ImageTableMeta` as JSON (height, width,
channels, class names, schema version), so plain ``pyarrow.parquet.read_table`` can read and
reshape the pixels without this project installed.

Files are bounded in bytes (`ImageTableWriter`: 256 MB of pixels by default) and row groups
hold at most 8 MB or 2,048 images, so readers stream a table of any size a row group at a time
(`stages.formats.image_stream`); 64-bit offsets keep a single column past 2 GB readable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store import (
    CorruptArtifactError,
    HashedStream,
    NewFile,
    link_or_copy,
    record_written,
    stage_in_store,
)

SCHEMA_VERSION = 1
META_KEY = b"twostage.image_table"
SPLITS = ("train", "val", "test")

ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("label", pa.int16(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.large_binary(), nullable=False),
    ]
)
FILE_BYTES = 256 * 2**20  # pixel bytes per Parquet file
GROUP_BYTES = 8 * 2**20  # pixel bytes per row group: what a reader holds per read
GROUP_ROWS = 2048  # rows per row group, for small images (shuffling works in row groups)


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
        return self.take(self.splits == name)

    def take(self, index) -> ImageTable:
        """The rows of `index` (a mask, indices, or a slice: a slice copies nothing)."""
        return ImageTable(
            self.meta,
            self.ids[index],
            self.labels[index],
            self.splits[index],
            self.images[index],
            self.factors[index],
        )

    def __len__(self) -> int:
        return len(self.ids)


class ImageTableWriter:
    """Writes image rows as they come into bounded Parquet files, one file set per split.

    Memory holds at most one row group per split. `close` returns the file names written.
    """

    def __init__(
        self, out: Path, meta: ImageTableMeta, file_bytes: int = FILE_BYTES, prefix: str = "images"
    ):
        self.out, self.meta, self.file_bytes, self.prefix = Path(out), meta, file_bytes, prefix
        self.image_bytes = meta.height * meta.width * meta.channels
        self.group_rows = group_rows(meta)
        self.schema = table_schema(meta)
        self.rows = 0
        self.names: list[str] = []
        self._pending: dict[str, list[pa.Table]] = {}  # split -> rows not yet in a row group
        self._open: dict[str, tuple[ParquetFile, int]] = {}  # split -> (file, rows)
        self._parts: dict[str, int] = {}
        self._codec: str | None = None  # the pixels' codec, chosen on the first rows written
        self.stored: dict[str, int] = {}  # name -> size of the files `adopt_stored` took

    @property
    def capacity(self) -> int:
        """Rows per file."""
        return max(1, self.file_bytes // self.image_bytes)

    def write(self, table: ImageTable) -> None:
        """Appends the rows of `table` (its images must have the writer's shape)."""
        if table.images.shape[1:] != (self.meta.height, self.meta.width, self.meta.channels):
            raise ValueError(f"images of shape {table.images.shape[1:]} in a table of {self.meta}")
        for split in sorted(set(table.splits.tolist())):
            mask = table.splits == split
            self._pending.setdefault(split, []).append(to_arrow(table, self.schema, mask))
            self._codec = self._codec or pixel_codec(table.images[np.flatnonzero(mask)[:64]])
            self._flush(split, final=False)
        self.rows += len(table)

    def adopt_file(
        self, split: str, path: Path, rows: int, sha256: str | None, keep: bool = False
    ) -> str:
        """Takes `path`, a finished file of `rows` rows of `split` that another process of
        this node wrote (a `ParquetFile`, on the writer's filesystem), as the split's next
        file: moved, or with `keep` linked (`path` stays, e.g. as resumable state); `sha256`,
        when given, is its digest, so the commit need not read it. Returns its name."""
        name = self._next_name(split)
        if not keep:
            Path(path).rename(self.out / name)
        else:
            link_or_copy(path, self.out / name)
        if sha256 is not None:
            record_written(self.out / name, sha256)
        self.rows += rows
        return name

    def adopt_stored(self, split: str, path: str, rows: int, size: int, sha256: str) -> str:
        """Takes `path`, a finished file of `rows` rows of `split` already in the object store
        the table goes to (e.g. under the step's scratch), as the split's next file: the
        commit copies it into the table inside the store. Returns its name."""
        name = self._next_name(split)
        stage_in_store(self.out, name, path, size, sha256)
        self.stored[name] = size
        self.rows += rows
        return name

    def close(self) -> list[str]:
        for split in list(self._pending):
            self._flush(split, final=True)
        for writer, _ in self._open.values():
            writer.close()
        self._open = {}
        if not self.names:  # an empty table still gets one (empty) file with the metadata
            self._writer("train")
            self._open.pop("train")[0].close()
        return sorted(self.names)

    def _flush(self, split: str, final: bool) -> None:
        pending = self._pending.get(split)
        if not pending:
            return
        table = pa.concat_tables(pending)
        full = table.num_rows - table.num_rows % self.group_rows
        cut = table.num_rows if final else full
        start = 0
        while start < cut:
            writer, rows = self._open.get(split) or self._writer(split)
            take = min(cut - start, self.capacity - rows, self.group_rows)
            writer.write_table(table.slice(start, take), row_group_size=self.group_rows)
            start += take
            rows += take
            self._open[split] = (writer, rows)
            if rows >= self.capacity:
                self._open.pop(split)[0].close()
        self._pending[split] = [table.slice(cut)] if cut < table.num_rows else []

    def _writer(self, split: str) -> tuple[ParquetFile, int]:
        name = self._next_name(split)
        writer = ParquetFile(self.out / name, self.schema, self._codec or "snappy")
        self._open[split] = (writer, 0)
        return self._open[split]

    def _next_name(self, split: str) -> str:
        part = self._parts.get(split, 0)
        self._parts[split] = part + 1
        name = f"{self.prefix}-{split}-{part:05d}.parquet"
        self.names.append(name)
        return name


def table_schema(meta: ImageTableMeta) -> pa.Schema:
    """The Arrow schema of an image table with `meta` (its factor columns, and `meta` as the
    file metadata)."""
    schema = ARROW_SCHEMA.with_metadata({META_KEY: meta.to_json()})
    for name in meta.factor_names:
        schema = schema.append(pa.field(f"factor_{name}", pa.int16(), False))
    return schema


def group_rows(meta: ImageTableMeta) -> int:
    """Rows per row group of a table of `meta`'s image size."""
    return max(1, min(GROUP_ROWS, GROUP_BYTES // (meta.height * meta.width * meta.channels)))


def to_arrow(table: ImageTable, schema: pa.Schema, mask: np.ndarray | None = None) -> pa.Table:
    """The rows of `table` (those of `mask`) as an Arrow table of `schema`; the pixels are not
    copied when the selected images are contiguous."""
    mask = np.ones(len(table), bool) if mask is None else mask
    n = int(mask.sum())
    labels = table.labels[mask]
    images = table.images if n == len(table) else table.images[mask]
    pixels = np.ascontiguousarray(images).reshape(-1)
    image_bytes = int(np.prod(table.images.shape[1:]))
    offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int64) * image_bytes)
    columns = [
        _from_numpy(table.ids[mask], pa.int64()),
        _from_numpy(labels, pa.int16(), valid=labels >= 0),
        _strings(table.splits[mask].tolist()),
        pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), n, [None, offsets, pa.py_buffer(pixels)]
        ),
    ]
    columns += [
        _from_numpy(table.factors[mask][:, j], pa.int16())
        for j in range(len(table.meta.factor_names))
    ]
    return pa.Table.from_arrays(columns, schema=schema)


# Columns are built from buffers: ``pa.array`` imports pandas on its first call (when pandas
# is installed, as Ray Data's dependency), a third of a second of CPU in every fresh process
# that writes a table, such as each decode task's worker.
_NUMPY_TYPES = {pa.int16(): np.int16, pa.int64(): np.int64}


def _strings(values: list[str]) -> pa.Array:
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(v) for v in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), data)


def _from_numpy(values: np.ndarray, type: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """`values` as an Arrow array of `type`, null where `valid` is False (ValueError for a
    value the type cannot hold, as ``pa.array`` gives)."""
    dtype = _NUMPY_TYPES[type]
    held = values if valid is None else values[valid]
    if held.size and (held.min() < np.iinfo(dtype).min or held.max() > np.iinfo(dtype).max):
        raise ValueError(f"values from {held.min()} to {held.max()} do not fit in {type}")
    data = pa.py_buffer(np.ascontiguousarray(values, dtype))
    if valid is None or valid.all():
        return pa.Array.from_buffers(type, len(values), [None, data])
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    nulls = len(values) - int(valid.sum())
    return pa.Array.from_buffers(type, len(values), [bitmap, data], null_count=nulls)


def pixel_codec(images: np.ndarray) -> str:
    """``snappy`` when it shrinks a sample of `images` by a tenth (digits, drawings), else
    ``none``: photographs barely compress, and compressing them costs the writer as much time
    as writing them."""
    sample = np.ascontiguousarray(images.reshape(-1)[: 2**20])
    if sample.size == 0:
        return "snappy"
    return "snappy" if pa.compress(sample, "snappy").size < 0.9 * sample.size else "none"


def parquet_writer(
    sink, schema: pa.Schema, pixel_codec: str, page_checksums: bool = True
) -> pq.ParquetWriter:
    """The Parquet writer of every image-table file: `pixel_codec` for the pixels, zstd for the
    rest, no statistics on the pixels, page checksums (off only to measure what they cost)."""
    codecs = {f.name: "zstd" for f in schema}
    return pq.ParquetWriter(
        sink,
        schema,
        compression={**codecs, "image": pixel_codec},
        use_dictionary=["split", "label"],
        # min/max of every 200 KB pixel value cost the writer a fifth of its time, unused
        write_statistics=[f.name for f in schema if f.name != "image"],
        # streamed reads check pages (they skip the file sha256)
        write_page_checksum=page_checksums,
    )


class ParquetFile:
    """One new image-table Parquet file at `path` (`parquet_writer` into a `NewFile`: past the
    page cache, its sha256 computed as it is written; in `filesystem`, an object store's, when
    given), or in memory with ``path=None``: into `buffer` (uint8, e.g. one a process reuses)
    when given, which must hold `file_bound` bytes. `close` returns the sha256; `data` is then
    the file's bytes when in memory."""

    def __init__(
        self,
        path: Path | str | None,
        schema: pa.Schema,
        codec: str,
        buffer: np.ndarray | None = None,
        filesystem=None,
    ):
        if filesystem is not None:
            self.sink = HashedStream(filesystem, str(path))
        elif path is not None:
            self.sink = NewFile(path)
        elif buffer is not None:
            self.sink = pa.FixedSizeBufferWriter(pa.py_buffer(buffer))
        else:
            self.sink = pa.BufferOutputStream()
        self.buffer, self.data = buffer, None
        self.writer = parquet_writer(self.sink, schema, codec)

    def write_table(self, table: pa.Table, row_group_size: int) -> None:
        self.writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> str:
        self.writer.close()
        if isinstance(self.sink, (NewFile, HashedStream)):
            return self.sink.close()
        if self.buffer is not None:
            self.data = self.buffer[: self.sink.tell()]
        else:
            self.data = np.frombuffer(self.sink.getvalue(), np.uint8)
        return hashlib.sha256(self.data).hexdigest()


def file_bound(rows: int, meta: ImageTableMeta) -> int:
    """Bytes that a Parquet file of `rows` images of `meta` cannot exceed: the pixels, snappy's
    worst case growth (1/6), and room for the other columns, page headers and footer."""
    return rows * meta.height * meta.width * meta.channels * 7 // 6 + 256 * rows + (1 << 20)


def write_image_table(
    out: Path, table: ImageTable, file_bytes: int = FILE_BYTES, prefix: str = "images"
) -> list[str]:
    """Writes an in-memory `table` into directory `out`; returns the file names."""
    writer = ImageTableWriter(out, table.meta, file_bytes, prefix)
    writer.write(table)
    return writer.close()


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
    # at most two files read at once: with no CPU reserved, Ray Data would otherwise read every
    # file at the same time, and memory would grow with the dataset (a 256 MB file is ~0.6 GB
    # in a read task; 40 of them ran a 2-core host out of memory)
    return ray.data.read_parquet(
        paths, filesystem=filesystem, columns=columns, num_cpus=0, concurrency=2
    )


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
    """The ``image`` column (large_binary or binary, raw pixels) as uint8 ``n h w c``, without
    copying rows when the column is one chunk."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks != 1:
            chunks = [decode_pixels(c, meta) for c in column.chunks]
            shape = (0, meta.height, meta.width, meta.channels)
            return np.concatenate(chunks) if chunks else np.zeros(shape, np.uint8)
        column = column.chunk(0)
    n = len(column)
    shape = (n, meta.height, meta.width, meta.channels)
    if n == 0:
        return np.zeros(shape, np.uint8)
    pixels = meta.height * meta.width * meta.channels
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], width)[column.offset : column.offset + n + 1]
    if not np.all(np.diff(offsets) == pixels):
        raise ValueError(f"image column holds rows of the wrong size (expected {pixels} bytes)")
    flat = np.frombuffer(column.buffers()[2], np.uint8)
    return flat[offsets[0] : offsets[0] + n * pixels].reshape(shape)
