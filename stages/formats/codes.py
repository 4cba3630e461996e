"""Code shards: the format the encode stage writes and the prior and sample stages read.

Parquet files ``codes-00000.parquet``, ... under an encode artifact, one row per image:

- ``id`` (int64), ``label`` (int16, nullable), ``split`` (string) as in the image table;
- ``codes_<level>`` (list<uint16>) per level (e.g. ``codes_bottom``, ``codes_top``): the
  row-major ``h w`` code grid of that level.

Every file's metadata key ``twostage.codes`` holds `CodeShardMeta` as JSON: schema version,
level names (bottom first), grid shapes, codebook sizes, the autoencoder artifact key and the
encode precision. Plain ``pyarrow.parquet.read_table`` reads them without this project:
``np.asarray(table["codes_top"][0].as_py()).reshape(meta["grid_shapes"]["top"])``.

`open_codes` is the reader: it verifies every file against the artifact manifest, checks the
schema version and (when asked) the autoencoder key, and offers numpy, torch and Ray Data views.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
META_KEY = b"twostage.codes"
FILE_PREFIX = "codes"


class CodeShardError(ValueError):
    """A code shard set that cannot be used as asked (wrong schema, other autoencoder, ...)."""


@dataclass(frozen=True)
class CodeShardMeta:
    """Metadata stored in every code shard file."""

    level_names: list[str]
    grid_shapes: dict[str, list[int]]
    codebook_sizes: dict[str, int]
    autoencoder_key: str
    precision: str = "fp32"
    class_names: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CodeShardMeta:
        return cls(**json.loads(raw))

    def arrow_schema(self) -> pa.Schema:
        fields = [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", pa.int16(), nullable=True),
            pa.field("split", pa.string(), nullable=False),
        ]
        fields += [
            pa.field(column(n), pa.list_(pa.uint16()), nullable=False) for n in self.level_names
        ]
        return pa.schema(fields, metadata={META_KEY: self.to_json()})


def column(level: str) -> str:
    """The Parquet column holding one level's codes."""
    return f"codes_{level}"


def codes_table(meta: CodeShardMeta, ids, labels, splits, codes: dict[str, np.ndarray]) -> pa.Table:
    """Builds an Arrow table of code rows; ``codes[level]`` is ``n h w`` integers.

    ``ids``, ``labels`` (-1 or null for none) and ``splits`` may be numpy / lists or Arrow
    arrays (passed through without conversion).
    """
    n = len(ids)
    if not isinstance(labels, (pa.Array, pa.ChunkedArray)):
        labels = np.asarray(labels)
        labels = pa.array(labels.astype(np.int16), mask=labels < 0)
    arrays = {
        "id": ids
        if isinstance(ids, (pa.Array, pa.ChunkedArray))
        else pa.array(np.asarray(ids, np.int64)),
        "label": labels,
        "split": splits
        if isinstance(splits, (pa.Array, pa.ChunkedArray))
        else pa.array(list(splits), pa.string()),
    }
    for level in meta.level_names:
        per_row = math.prod(meta.grid_shapes[level])
        grid = np.ascontiguousarray(codes[level], dtype=np.uint16).reshape(n, per_row)
        offsets = pa.array(np.arange(0, (n + 1) * per_row, per_row, dtype=np.int32))
        arrays[column(level)] = pa.ListArray.from_arrays(offsets, pa.array(grid.reshape(-1)))
    return pa.table(arrays, schema=meta.arrow_schema())


class ShardWriter:
    """Writes code rows into ``codes-00000.parquet``, ... rolling over at ``target_bytes``."""

    ROW_GROUP = 65_536

    def __init__(self, out: Path, meta: CodeShardMeta, target_bytes: int):
        self.out, self.meta, self.target = out, meta, target_bytes
        self.files: list[str] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer = None
        self._path: Path | None = None

    def write(self, table: pa.Table) -> None:
        """Buffers rows; writes a row group once about 64k rows are buffered."""
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        if self._writer is None:
            name = f"{FILE_PREFIX}-{len(self.files):05d}.parquet"
            self._path = self.out / name
            self._writer = pq.ParquetWriter(
                self._path,
                self.meta.arrow_schema(),
                compression="zstd",
                use_dictionary=["split", "label"],
            )
            self.files.append(name)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        if self._path.stat().st_size >= self.target:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        self._flush()
        self._close_file()
        if not self.files:  # an empty dataset still gets one (empty) shard with the metadata
            self.write(
                codes_table(
                    self.meta,
                    [],
                    [],
                    [],
                    {n: np.zeros(0, np.uint16) for n in self.meta.level_names},
                )
            )
            self._flush()
            self._close_file()
        return self.files


@dataclass
class CodeDataset:
    """A verified code shard set.

    Attributes:
        meta: The shards' metadata (identical in every file).
        artifact: The encode artifact they belong to.
        files: Shard file names, in order.
    """

    meta: CodeShardMeta
    artifact: object
    files: list[str]

    @property
    def uri(self) -> str:
        return self.artifact.uri

    def paths(self) -> list[str]:
        """File-system paths of the shards (in the store's pyarrow filesystem)."""
        return [self.artifact.fs_path(name) for name in self.files]

    def to_ray_grids(self, split: str, levels: list[str]):
        """A Ray Dataset of one split's rows for training: ``label`` (-1 for none) and one flat
        ``(h w)`` uint16 tensor per level in `levels` (the shards' own type)."""
        sizes = {level: math.prod(self.meta.grid_shapes[level]) for level in levels}
        return self.to_ray_dataset(columns=["label", "split", *map(column, levels)]).map_batches(
            _grid_rows,
            fn_kwargs={"split": split, "sizes": sizes},
            batch_format="pyarrow",
            num_cpus=0,  # light; other stages may hold the CPUs
        )

    def grid_table(self, split: str, levels: list[str]) -> pa.Table:
        """The rows of `to_ray_grids`, read here in one go (for shards small enough to hold)."""
        sizes = {level: math.prod(self.meta.grid_shapes[level]) for level in levels}
        table = self.read_table(columns=["label", "split", *map(column, levels)])
        return _grid_rows(table, split, sizes)

    def read_table(self, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """All rows (of one split) as one Arrow table, read from the verified files."""
        tables = [
            pq.read_table(pa.BufferReader(self.artifact.read_bytes(n)), columns=columns)
            for n in self.files
        ]
        table = pa.concat_tables(tables)
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        return table

    def to_numpy(self, split: str | None = None) -> dict[str, np.ndarray]:
        """``id``, ``label`` (-1 for none), ``split`` and one ``n h w`` uint16 array per level."""
        table = self.read_table(split)
        n = table.num_rows
        out = {
            "id": table["id"].to_numpy(),
            "label": pc.fill_null(table["label"], -1).to_numpy().astype(np.int64),
            "split": np.asarray(table["split"].to_pylist(), dtype=object),
        }
        for level in self.meta.level_names:
            h, w = self.meta.grid_shapes[level]
            flat = table[column(level)].combine_chunks().flatten().to_numpy()
            out[level] = flat.reshape(n, h, w)
        return out

    def to_torch(self, split: str | None = None) -> dict:
        """Like `to_numpy`, with the code grids and labels as int64 torch tensors."""
        import torch

        arrays = self.to_numpy(split)
        result = {
            "id": torch.from_numpy(arrays["id"].copy()),
            "label": torch.from_numpy(arrays["label"]),
        }
        for level in self.meta.level_names:
            result[level] = torch.from_numpy(arrays[level].astype(np.int64))
        return result

    def to_ray_dataset(self, columns: list[str] | None = None):
        """A Ray Dataset over the (verified) shard files, streamed by Ray Data."""
        from stages.formats.images import read_parquet_dataset

        return read_parquet_dataset(self.paths(), self.artifact.store.fs, columns)


def _grid_rows(batch: pa.Table, split: str, sizes: dict[str, int]) -> pa.Table:
    """Ray Data batch function of `CodeDataset.to_ray_grids`. This module is light to import in
    Ray Data's workers (no torch), and the codes are Arrow tensor columns even in a block with
    no rows of `split` (numpy arrays of 0 rows would make Ray Data fall back to pickling)."""
    from ray.data.extensions import ArrowTensorArray

    batch = batch.filter(pc.equal(batch["split"], split))
    out = {"label": pc.fill_null(batch["label"], -1).cast(pa.int64())}
    for level, size in sizes.items():
        flat = batch[column(level)].combine_chunks().flatten().to_numpy()
        out[level] = ArrowTensorArray.from_numpy(
            flat.astype(np.uint16, copy=False).reshape(batch.num_rows, size)
        )
    return pa.table(out)


def open_codes(source, expect_autoencoder: str | None = None, verify: bool = True) -> CodeDataset:
    """Opens a code shard set.

    Args:
        source: An encode `Artifact`, or its URI ``<store>/encode/<key>``; the key may be
            shortened to a unique prefix of at least 4 characters, as ``twostage ls`` shows it.
        expect_autoencoder: Refuse shards encoded by any other autoencoder key (or a key
            prefix of at least 4 characters).
        verify: Check every file's size and sha256 against the manifest first.

    Raises:
        CodeShardError: wrong schema version, another autoencoder, inconsistent files.
        pipeline.store.CorruptArtifactError: a file does not match the manifest (named).
    """
    from pipeline.store import CorruptArtifactError

    if expect_autoencoder is not None and len(expect_autoencoder) < 4:
        raise ValueError(
            f"expect_autoencoder: {expect_autoencoder!r} is too short (give at least 4 characters)"
        )
    artifact = _artifact(source)
    files = sorted(
        n for n in artifact.files if n.startswith(FILE_PREFIX) and n.endswith(".parquet")
    )
    if not files:
        raise CodeShardError(
            f"{artifact.uri}: no {FILE_PREFIX}-*.parquet files; not an encode artifact"
        )
    if verify:
        problems = artifact.verify()
        if problems:
            raise CorruptArtifactError(problems[0])
    meta = None
    for name in files:
        file_meta = _file_meta(artifact, name)
        where = f"{artifact.uri}/{name}"
        if file_meta.schema_version != SCHEMA_VERSION:
            raise CodeShardError(
                f"{where}: code shard schema version {file_meta.schema_version}, this twostage "
                f"reads version {SCHEMA_VERSION}; re-encode with this version"
            )
        if expect_autoencoder and not file_meta.autoencoder_key.startswith(expect_autoencoder):
            raise CodeShardError(
                f"{where}: encoded with autoencoder {file_meta.autoencoder_key[:12]}, expected "
                f"{expect_autoencoder[:12]}; these codes belong to another autoencoder"
            )
        if meta is not None and file_meta != meta:
            raise CodeShardError(f"{where}: metadata differs from the other shards of this set")
        meta = file_meta
    return CodeDataset(meta, artifact, files)


def _file_meta(artifact, name: str) -> CodeShardMeta:
    from pipeline.store import CorruptArtifactError

    try:
        with artifact.store.fs.open_input_file(artifact.fs_path(name)) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid) as e:
        raise CorruptArtifactError(f"{artifact.uri}/{name}: unreadable Parquet ({e})") from e
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CodeShardError(f"{artifact.uri}/{name}: no {META_KEY.decode()} metadata")
    meta = CodeShardMeta.from_json(raw)
    for expected in meta.arrow_schema():  # the columns its metadata promises, e.g. per level
        index = schema.get_field_index(expected.name)
        found = schema.field(index).type if index >= 0 else None
        if found is None or not _same_type(found, expected.type):
            raise CodeShardError(
                f"{artifact.uri}/{name}: column {expected.name} is "
                f"{'missing' if found is None else found}, expected {expected.type}"
            )
    return meta


def _same_type(found: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores a list's item name (Parquet may read it back as another)."""
    if pa.types.is_list(expected):
        return pa.types.is_list(found) and found.value_type.equals(expected.value_type)
    return found.equals(expected)


def _artifact(source):
    if hasattr(source, "manifest"):
        return source
    from pipeline.store import Store, StoreError

    uri = str(source).rstrip("/")
    base, _, query = uri.partition("?")
    parts = base.rsplit("/", 2)
    if len(parts) != 3:
        raise StoreError(f"{uri}: expected <store>/<stage>/<key>")
    root, stage, key = parts
    store = Store(root + (f"?{query}" if query else ""))
    return store.get(stage, key) or store.find(f"{stage}/{key}")  # a full key, else a prefix
