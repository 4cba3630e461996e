"""The sequence table: the artifact format of frame sequences (e.g. Moving MNIST for TD-VAE).

The sequence counterpart of `stages.formats.images`. Parquet files ``sequences-00000.parquet``, ... with
one row per sequence:

- ``id`` (int64): stable sequence id, unique within the table;
- ``split`` (string): ``train``, ``val`` or ``test``;
- ``seed`` (int64): the seed the row was generated from (`stages.sources.moving_mnist.generate_one`
  regenerates it from this seed, the metadata's generator and params, and the split's digits);
- ``label`` (int16, nullable): class of the first digit, null when unknown;
- ``frames`` (binary): raw uint8 pixels, row-major ``t h w c``.

The file metadata key ``twostage.sequence_table`` holds `SequenceTableMeta` as JSON (frames,
height, width, channels, generator name and parameters, the digit pool, schema version), so
plain ``pyarrow.parquet.read_table`` can read and reshape the frames without this project
installed. In memory, frames are uint8 ``n t h w c``.

Stages stream the table a row group (about `ROW_GROUP_BYTES`) at a time with the row-group
tools of `stages.formats.image_stream` (`sequence_groups`, `sequence_blocks`, `read_sequence_rows`);
`read_sequence_table` reads a whole table, for small tables and tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
META_KEY = b"twostage.sequence_table"
SPLITS = ("train", "val", "test")
ROW_GROUP_BYTES = 32 << 20  # frames per Parquet row group (and Arrow chunk), so reads stream

ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("label", pa.int16(), nullable=True),
        pa.field("frames", pa.binary(), nullable=False),
    ]
)


@dataclass(frozen=True)
class SequenceTableMeta:
    """Metadata stored in every sequence-table Parquet file.

    Args:
        frames: Frames per sequence (``t``).
        height: Frame height in pixels.
        width: Frame width in pixels.
        channels: Channels per pixel.
        generator: Name of the generator (`stages.sources.moving_mnist.GENERATORS`), e.g. ``bouncing``.
        params: The generator's parameters (canvas, digit_size, num_digits, speed or shift, ...).
        digit_pool: Which digits the sequences were drawn from, in words.
        schema_version: Version of this format.
    """

    frames: int
    height: int
    width: int
    channels: int
    generator: str
    params: dict = field(default_factory=dict)
    digit_pool: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SequenceTableMeta:
        return cls(**json.loads(raw))

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        """``t h w c`` of one sequence."""
        return (self.frames, self.height, self.width, self.channels)


@dataclass
class SequenceTable:
    """A sequence table in memory. ``frames`` is uint8 ``n t h w c``; ``labels`` uses -1 for none."""

    meta: SequenceTableMeta
    ids: np.ndarray
    splits: np.ndarray
    seeds: np.ndarray
    labels: np.ndarray
    frames: np.ndarray

    def split(self, name: str) -> SequenceTable:
        mask = self.splits == name
        return SequenceTable(
            self.meta,
            self.ids[mask],
            self.splits[mask],
            self.seeds[mask],
            self.labels[mask],
            self.frames[mask],
        )

    def __len__(self) -> int:
        return len(self.ids)


def write_sequence_table(out: Path, table: SequenceTable, rows_per_file: int = 10_000) -> list[str]:
    """Writes `table` as Parquet files into directory `out`; returns the file names.

    Args:
        out: An existing local directory.
        table: The sequences; ``frames`` must have the shape the metadata gives.
        rows_per_file: Sequences per file (row groups hold about `ROW_GROUP_BYTES` of frames).
    """
    meta = table.meta
    if table.frames.dtype != np.uint8 or table.frames.shape[1:] != meta.frame_shape:
        raise ValueError(
            f"frames: expected uint8 n {' '.join(map(str, meta.frame_shape))} as the metadata "
            f"says, got {table.frames.dtype} {table.frames.shape}"
        )
    frames = np.ascontiguousarray(table.frames)
    rows_per_group = max(1, ROW_GROUP_BYTES // int(np.prod(meta.frame_shape)))
    schema = ARROW_SCHEMA.with_metadata({META_KEY: meta.to_json()})
    n = len(table)
    names = []
    for part, start in enumerate(range(0, max(n, 1), rows_per_file)):
        stop = min(start + rows_per_file, n)
        labels = table.labels[start:stop]
        columns = {
            "id": pa.array(table.ids[start:stop], pa.int64()),
            "split": pa.array(table.splits[start:stop].tolist(), pa.string()),
            "seed": pa.array(table.seeds[start:stop], pa.int64()),
            "label": pa.array(labels, pa.int16(), mask=labels < 0),
            "frames": _binary_column(frames[start:stop], rows_per_group),
        }
        name = f"sequences-{part:05d}.parquet"
        pq.write_table(
            pa.table(columns, schema=schema),
            out / name,
            compression="zstd",
            use_dictionary=["split", "label"],
            row_group_size=rows_per_group,
            write_page_checksum=True,  # streamed reads check pages (they skip the file sha256)
        )
        names.append(name)
    return names


def sequence_files(artifact) -> list[str]:
    """The sequence-table Parquet files of an artifact (``sequences-*.parquet``)."""
    return sorted(
        n for n in artifact.files if n.startswith("sequences-") and n.endswith(".parquet")
    )


def sequence_table_meta(artifact) -> SequenceTableMeta:
    """The metadata of a sequence-table artifact, from one Parquet footer (no frame reads)."""
    parts = _parts(artifact)
    with artifact.store.fs.open_input_file(artifact.fs_path(parts[0])) as f:
        metadata = pq.read_metadata(f).metadata
    return _meta(metadata, f"{artifact.uri}/{parts[0]}")


def read_sequence_table(artifact, splits: tuple[str, ...] | None = None) -> SequenceTable:
    """Reads a sequence-table artifact (verifying checksums) into memory.

    Args:
        artifact: A committed `pipeline.store.Artifact` written by the ingest stage.
        splits: Keep only these splits (default: all).
    """
    parts = _parts(artifact)
    pieces, meta = [], None
    for name in parts:
        where = f"{artifact.uri}/{name}"
        table = pq.read_table(pa.BufferReader(artifact.read_bytes(name)))
        file_meta = _meta(table.schema.metadata, where)
        if meta is not None and file_meta != meta:
            raise ValueError(f"{where}: metadata differs from {parts[0]}'s (files of two tables?)")
        meta = file_meta
        if splits is not None:
            table = table.filter(pc.is_in(table["split"], pa.array(list(splits))))
        try:
            pieces.append(sequences_from_arrow(table, meta))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if len(pieces) == 1:
        return pieces[0]
    return SequenceTable(
        meta,
        *(
            np.concatenate([getattr(p, column) for p in pieces])
            for column in ("ids", "splits", "seeds", "labels", "frames")
        ),
    )


def sequence_groups(artifact, split: str) -> list:
    """The row groups of the table that hold rows of `split` (`image_stream.Group`s), in file
    order; Parquet footers only."""
    from stages.formats import image_stream

    return image_stream.groups(artifact, split, _parts(artifact))


def sequence_blocks(artifact, order: list, split: str):
    """The rows of `split` in the row groups `order`, one dict of numpy arrays per group
    (``frames`` uint8 ``n t h w c``, ``id``), read in this process with page checksums checked."""
    from stages.formats import image_stream

    meta = sequence_table_meta(artifact)
    for group in order:
        rows = image_stream.read_group(artifact.store.fs, group, split, ["id", "split", "frames"])
        yield {"frames": decode_frames(rows["frames"], meta), "id": rows["id"].to_numpy()}


def read_sequence_rows(artifact, split: str, limit: int) -> np.ndarray:
    """The frames of the first `limit` sequences of `split` in file order (uint8 ``n t h w c``;
    a fixed, bounded subset: val sequences), read a row group at a time."""
    meta = sequence_table_meta(artifact)
    out = np.empty((0, *meta.frame_shape), np.uint8)
    if limit <= 0:
        return out
    pieces, rows = [], 0
    for block in sequence_blocks(artifact, sequence_groups(artifact, split), split):
        pieces.append(block["frames"][: limit - rows])
        rows += len(pieces[-1])
        if rows >= limit:
            break
    return np.concatenate(pieces) if pieces else out


def sequences_from_arrow(table: pa.Table, meta: SequenceTableMeta) -> SequenceTable:
    """Converts an Arrow sequence table to numpy arrays."""
    return SequenceTable(
        meta=meta,
        ids=table["id"].to_numpy().astype(np.int64),
        splits=np.asarray(table["split"].to_pylist(), dtype=object),
        seeds=table["seed"].to_numpy().astype(np.int64),
        labels=pc.fill_null(table["label"], -1).to_numpy().astype(np.int64),
        frames=decode_frames(table["frames"], meta),
    )


def decode_frames(column, meta: SequenceTableMeta) -> np.ndarray:
    """The ``frames`` column (binary, raw pixels) as uint8 ``n t h w c``."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    size = int(np.prod(meta.frame_shape))
    out = np.empty((len(column), *meta.frame_shape), np.uint8)
    row = 0
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + n + 1]
        if not np.all(np.diff(offsets) == size):
            raise ValueError(
                f"frames column holds rows of the wrong size (expected {size} bytes, "
                f"t h w c = {' '.join(map(str, meta.frame_shape))})"
            )
        flat = np.frombuffer(chunk.buffers()[2], np.uint8)
        out[row : row + n] = flat[offsets[0] : offsets[0] + n * size].reshape(n, *meta.frame_shape)
        row += n
    return out


def _binary_column(frames: np.ndarray, rows_per_chunk: int) -> pa.ChunkedArray:
    """One binary value per row of `frames`, sharing its memory (no per-row byte copies)."""
    flat = frames.reshape(len(frames), int(np.prod(frames.shape[1:])))
    chunks = []
    for start in range(0, len(flat), rows_per_chunk):
        block = flat[start : start + rows_per_chunk]
        offsets = (np.arange(len(block) + 1, dtype=np.int64) * block.shape[1]).astype(np.int32)
        buffers = [None, pa.py_buffer(offsets), pa.py_buffer(block)]
        chunks.append(pa.Array.from_buffers(pa.binary(), len(block), buffers))
    return pa.chunked_array(chunks, pa.binary())


def _parts(artifact) -> list[str]:
    parts = sequence_files(artifact)
    if not parts:
        raise ValueError(
            f"{artifact.uri}: holds no sequences-*.parquet files; is it a sequence table?"
        )
    return parts


def _meta(metadata: dict | None, where: str) -> SequenceTableMeta:
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{where}: no {META_KEY.decode()} metadata; is it a sequence table?")
    version = json.loads(raw).get("schema_version")
    if version != SCHEMA_VERSION:  # checked first: other versions may hold other fields
        raise ValueError(
            f"{where}: sequence table schema version {version}, this twostage reads "
            f"{SCHEMA_VERSION}"
        )
    return SequenceTableMeta.from_json(raw)
