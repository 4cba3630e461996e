"""Streaming reads of an image table, for training and for any stage that must not hold a table.

A table is a list of row groups (`groups`: file, index, rows of one split; at most 8 MB each,
`stages.formats.images`). Training walks them in a seeded order that changes every epoch;
worker ``r`` of ``w`` takes every ``w``-th group of that order (`plan`), Ray Data tasks read
them (`dataset`), and the loop draws batches at random from a local shuffle buffer that the
stream refills (`shuffled_batches`). A worker so holds a few row groups, the shuffle buffer and
the prefetched blocks, never the table. (The buffer is this module's own: Ray Data's
``local_shuffle_buffer_size`` re-concatenates its buffer for every batch, which costs small
images a tenth of their training speed; this one moves one batch of rows per batch.)

The order depends on (seed, epoch, rank, world size) only. A resumed run plans again and skips
the rows its worker trained on before (``skip_rows``), starting at the row group that holds the
first row not trained on yet: at most one row group plus one shuffle buffer of images around
the interruption is trained on twice or skipped; every other image keeps its place.

`groups`, `plan`, `read_group` and `shuffled_batches` serve any Parquet table with a ``split``
column; `stages.formats.sequences` streams sequence tables with them. This module is light to
import in Ray Data's workers (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import cluster
from pipeline.store import CorruptArtifactError
from stages.formats.images import (
    META_KEY,
    ImageTable,
    ImageTableMeta,
    decode_pixels,
    image_table_meta,
    table_files,
    table_from_arrow,
)


@dataclass(frozen=True)
class Group:
    """One row group of a table file: its path in the store's filesystem, its index and the
    number of its rows in the split it was listed for; or part ``part`` of ``parts``
    contiguous parts of those rows (`plan` cuts groups so when workers outnumber them)."""

    path: str
    index: int
    rows: int
    part: int = 0
    parts: int = 1


def groups(artifact, split: str, files: list[str] | None = None) -> list[Group]:
    """The row groups of `artifact` that hold rows of `split`, in file order.

    Reads Parquet footers only, except for row groups whose statistics do not show a single
    split (tables written before the per-split files), where the ``split`` column is read.

    Args:
        files: The table's files (default: the image table's, `table_files`); any Parquet
            table with a ``split`` column streams the same way (sequence tables do).
    """
    out = []
    for name in table_files(artifact) if files is None else files:
        path = artifact.fs_path(name)
        try:
            with artifact.store.fs.open_input_file(path) as f:
                if f.size() != artifact.files[name]["size"]:
                    artifact.read_bytes(name)  # raises, naming the file and the remedy
                parquet = pq.ParquetFile(f, page_checksum_verification=True)
                for index in range(parquet.metadata.num_row_groups):
                    rows = _split_rows(parquet, index, split)
                    if rows:
                        out.append(Group(path, index, rows))
        except (OSError, pa.ArrowException) as e:
            raise CorruptArtifactError(f"{path}: unreadable Parquet file ({e})") from e
    return out


def _split_rows(parquet: pq.ParquetFile, index: int, split: str) -> int:
    group = parquet.metadata.row_group(index)
    column = parquet.schema_arrow.get_field_index("split")
    stats = group.column(column).statistics
    if stats is not None and stats.has_min_max and stats.min == stats.max:
        return group.num_rows if stats.min == split else 0
    values = parquet.read_row_group(index, columns=["split"])["split"]
    return int(pc.sum(pc.equal(values, split)).as_py() or 0)


def plan(
    table: list[Group], *, seed: int, rank: int, world: int, rows: int, skip_rows: int = 0
) -> list[Group]:
    """The row groups worker `rank` of `world` reads, in order, to yield `rows` rows after the
    first `skip_rows` rows of its sequence (epoch after epoch, each in its own seeded order)."""
    if not table:
        raise ValueError("the split has no rows")
    if len(table) < world:  # a small table: every worker gets a part of each group
        table = [
            Group(g.path, g.index, g.rows * (p + 1) // world - g.rows * p // world, p, world)
            for g in table
            for p in range(world)
        ]
    out, seen, epoch = [], 0, 0
    while seen < skip_rows + rows:
        order = np.random.default_rng([seed, epoch]).permutation(len(table))
        for i in order[rank::world]:
            group = table[i]
            if seen + group.rows > skip_rows:
                out.append(group)
            seen += group.rows
            if seen >= skip_rows + rows:
                break
        epoch += 1
    return out


def read_group(filesystem, group: Group, split: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of `split` in one row group, its pages checked against their checksums; a
    damaged file raises `CorruptArtifactError` naming it."""
    try:
        with filesystem.open_input_file(group.path) as f:
            parquet = pq.ParquetFile(f, page_checksum_verification=True)
            part = parquet.read_row_group(group.index, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise CorruptArtifactError(
            f"{group.path}: row group {group.index} unreadable ({e}); the file is damaged: "
            "delete its artifact and rerun to recompute it"
        ) from e
    part = part.filter(pc.equal(part["split"], split))
    if group.parts > 1:
        n = part.num_rows
        start = n * group.part // group.parts
        part = part.slice(start, n * (group.part + 1) // group.parts - start)
    return part


def dataset(filesystem, table: list[Group], split: str, meta: ImageTableMeta, readers: int = 2):
    """A Ray Dataset of the rows of `split` in the groups `table`, in that order: ``image``
    (uint8 ``h w c`` tensors), ``label`` (-1 for none) and ``id``.

    Args:
        filesystem: The store's pyarrow filesystem.
        readers: Row groups read at once (Ray Data tasks; they reserve no CPU, as the training
            workers hold the CPUs).
    """
    import ray.data

    cluster.ensure_ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the planned order, on every run
    context.enable_progress_bars = False
    items = [{"path": g.path, "index": g.index, "part": g.part, "parts": g.parts} for g in table]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200))).map_batches(
        _read_groups,
        fn_kwargs={"filesystem": filesystem, "split": split, "meta": meta},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        concurrency=readers,
    )


def local_blocks(filesystem, table: list[Group], split: str, meta: ImageTableMeta):
    """What `dataset` yields, read in this process one row group after another (numpy
    ``image``, ``label``, ``id``): for a loop in the stage's own process."""
    for group in table:
        rows = read_group(filesystem, group, split, ["id", "label", "split", "image"])
        yield {
            "image": decode_pixels(rows["image"], meta),
            "label": pc.fill_null(rows["label"], -1).cast(pa.int64()).to_numpy(),
            "id": rows["id"].to_numpy(),
        }


def _read_groups(batch: pa.Table, filesystem, split: str, meta: ImageTableMeta) -> pa.Table:
    """Ray Data batch function of `dataset`: reads the listed row groups."""
    from ray.data.extensions import ArrowTensorArray

    columns = ["id", "label", "split", "image"]
    groups = zip(*(batch[k].to_pylist() for k in ("path", "index", "part", "parts")), strict=True)
    rows = pa.concat_tables(
        read_group(filesystem, Group(path, index, 0, part, parts), split, columns)
        for path, index, part, parts in groups
    )
    return pa.table(
        {
            "image": ArrowTensorArray.from_numpy(decode_pixels(rows["image"], meta)),
            "label": pc.fill_null(rows["label"], -1).cast(pa.int64()),
            "id": rows["id"],
        }
    )


def tables(artifact, split: str, seed: int | None = None):
    """The rows of `split` as one `ImageTable` per row group, read in this process: once in
    file order, or (with `seed`) epoch after epoch, each in its own seeded order, without end.
    For stages that stream a table without Ray Data (statistics, a small classifier)."""
    meta = image_table_meta(artifact)
    table = groups(artifact, split)
    epoch = 0
    while table:
        order = (
            range(len(table))
            if seed is None
            else np.random.default_rng([seed, epoch]).permutation(len(table))
        )
        for i in order:
            yield table_from_arrow(read_group(artifact.store.fs, table[i], split), meta)
        if seed is None:
            return
        epoch += 1


def read_rows(artifact, split: str, limit: int) -> ImageTable:
    """The first `limit` rows of `split` in file order (a fixed, bounded subset: validation
    images, reconstructions), read a row group at a time."""
    meta = image_table_meta(artifact)
    tables, rows = [], 0
    for group in groups(artifact, split):
        if rows >= limit:
            break
        part = read_group(artifact.store.fs, group, split).slice(0, limit - rows)
        tables.append(part.replace_schema_metadata({META_KEY: meta.to_json()}))
        rows += part.num_rows
    if not tables:
        return table_from_arrow(_empty(meta), meta)
    return table_from_arrow(pa.concat_tables(tables, promote_options="default"), meta)


def _empty(meta: ImageTableMeta) -> pa.Table:
    from stages.formats.images import table_schema

    return table_schema(meta).empty_table()


def shuffled_batches(blocks, batch_size: int, capacity: int, seed: int):
    """Batches of `batch_size` rows (dicts of numpy arrays) drawn without replacement from a
    buffer of up to `capacity` rows that `blocks` (dicts of numpy arrays, e.g. Ray Data's
    ``iter_batches(batch_size=None)``) refill; the last rows that do not fill a batch are
    dropped. Each batch costs O(batch_size) copies, whatever the capacity."""
    rng = np.random.default_rng(seed)
    capacity = max(capacity, batch_size)
    buffer: dict[str, np.ndarray] | None = None
    held = 0
    incoming = iter(blocks)
    block, offset = None, 0
    while True:
        while held < capacity:  # refill the free slots from the stream
            if block is None or offset >= len(next(iter(block.values()))):
                block, offset = next(incoming, None), 0
                if block is None:
                    break
                continue
            if buffer is None:
                buffer = {k: np.empty((capacity, *v.shape[1:]), v.dtype) for k, v in block.items()}
            take = min(capacity - held, len(next(iter(block.values()))) - offset)
            for k, v in block.items():
                buffer[k][held : held + take] = v[offset : offset + take]
            held, offset = held + take, offset + take
        if buffer is None or held < batch_size:
            return
        index = rng.choice(held, batch_size, replace=False)
        yield {k: v[index] for k, v in buffer.items()}
        # fill the drawn slots below the new end with the undrawn rows above it
        taken = np.zeros(held, bool)
        taken[index] = True
        end = held - batch_size
        holes = np.flatnonzero(taken[:end])
        movers = end + np.flatnonzero(~taken[end:])
        for v in buffer.values():
            v[holes] = v[movers]
        held = end
