"""The bounded image-table writer, the 64-bit pixel column, and the streamed reads training uses:
row-group plans per worker and epoch, resume positions, Ray Data reads of a committed table."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store import Store
from stages.formats import image_stream
from stages.formats.images import (
    META_KEY,
    ImageTable,
    ImageTableMeta,
    decode_pixels,
    read_image_table,
    table_from_arrow,
    write_image_table,
)


def _table(n: int, side: int = 16, channels: int = 3, seed: int = 0) -> ImageTable:
    rng = np.random.default_rng(seed)
    splits = rng.choice(np.array(["train", "val", "test"], dtype=object), n, p=[0.8, 0.1, 0.1])
    return ImageTable(
        ImageTableMeta(side, side, channels, ["a", "b", "c"]),
        np.arange(n, dtype=np.int64) * 7,
        rng.integers(-1, 3, n),
        splits,
        rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8),
    )


def _commit(tmp_path, table: ImageTable, file_bytes: int):
    store = Store(str(tmp_path / "store"))
    with store.staging("ingest", "e" * 64) as out:
        write_image_table(out, table, file_bytes)
        artifact, _ = store.commit("ingest", "e" * 64, out, {"metrics": {}})
    return artifact


def test_writer_bounds_files_and_row_groups_and_plain_pyarrow_reads_them(tmp_path):
    table = _table(3000)
    names = write_image_table(tmp_path, table, file_bytes=1_000_000)  # 1,300 images per file
    assert len([n for n in names if "-train-" in n]) == 2  # 2,400 train images
    for name in names:
        parquet = pq.ParquetFile(tmp_path / name)
        split = name.split("-")[1]
        assert set(parquet.read(columns=["split"])["split"].to_pylist()) == {split}
        assert parquet.metadata.num_rows * 16 * 16 * 3 <= 1_000_000
        assert parquet.schema_arrow.field("image").type == pa.large_binary()
    whole = pq.read_table(tmp_path)  # plain pyarrow: the directory is the table
    assert whole.num_rows == 3000
    meta = ImageTableMeta.from_json(whole.schema.metadata[META_KEY])
    back = table_from_arrow(whole, meta)
    order = np.argsort(back.ids)
    np.testing.assert_array_equal(back.images[order], table.images)
    np.testing.assert_array_equal(back.labels[order], table.labels)
    assert (back.splits[order] == table.splits).all()


def test_tables_written_with_32_bit_offsets_still_decode():
    table = _table(5)
    column = pa.array([row.tobytes() for row in table.images], pa.binary())
    np.testing.assert_array_equal(decode_pixels(column, table.meta), table.images)
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2)])  # several chunks
    np.testing.assert_array_equal(decode_pixels(chunked, table.meta), table.images)
    with pytest.raises(ValueError, match="wrong size"):
        decode_pixels(pa.array([b"xx"], pa.binary()), table.meta)


def test_plan_covers_every_row_group_once_per_epoch_and_resumes_in_place():
    groups = [image_stream.Group(f"f{i // 4}", i % 4, 100) for i in range(10)]
    epoch = sum(g.rows for g in groups)
    # two workers, two epochs: each group once per epoch across the workers
    plans = [image_stream.plan(groups, seed=3, rank=r, world=2, rows=epoch) for r in range(2)]
    first = [g for p in plans for g in p[:5]]
    assert sorted((g.path, g.index) for g in first) == sorted((g.path, g.index) for g in groups)
    assert image_stream.plan(groups, seed=3, rank=0, world=2, rows=epoch) == plans[0]  # fixed
    assert image_stream.plan(groups, seed=4, rank=0, world=2, rows=epoch) != plans[0]
    # a new order every epoch
    one = image_stream.plan(groups, seed=3, rank=0, world=1, rows=2 * epoch)
    assert one[:10] != one[10:20] and sorted(one[:10], key=str) == sorted(one[10:20], key=str)
    # a resume after 1,234 rows starts at the group that holds row 1,234 of the same sequence
    resumed = image_stream.plan(groups, seed=3, rank=0, world=1, rows=500, skip_rows=1234)
    assert resumed[0] == one[12] and resumed[:5] == one[12:17]
    # more workers than groups: each worker reads a part of every group, all rows once
    parts = [image_stream.plan(groups, seed=0, rank=r, world=20, rows=50) for r in range(20)]
    assert all(len(p) == 10 and {g.rows for g in p} == {5} for p in parts)  # one epoch each
    assert len({(g.path, g.index, g.part) for p in parts for g in p}) == 200  # each part once


def test_groups_and_read_rows_of_a_committed_table(tmp_path):
    table = _table(3000)
    artifact = _commit(tmp_path, table, 1_000_000)
    train = image_stream.groups(artifact, "train")
    assert sum(g.rows for g in train) == int((table.splits == "train").sum())
    assert all(g.rows <= 2048 for g in train)
    val = image_stream.read_rows(artifact, "val", 50)
    assert len(val) == 50 and set(val.splits) == {"val"}
    expected = {int(i): img for i, img in zip(table.ids, table.images, strict=True)}
    assert all((expected[int(i)] == img).all() for i, img in zip(val.ids, val.images, strict=True))
    assert len(image_stream.read_rows(artifact, "val", 10**6)) == int((table.splits == "val").sum())
    assert len(image_stream.read_rows(artifact, "sample", 10)) == 0


@pytest.mark.slow
def test_ray_data_stream_yields_each_planned_row_once(tmp_path, ray_local):
    table = _table(3000)
    artifact = _commit(tmp_path, table, 1_000_000)
    train = image_stream.groups(artifact, "train")
    order = image_stream.plan(train, seed=0, rank=0, world=1, rows=sum(g.rows for g in train))
    ds = image_stream.dataset(artifact.store.fs, order, "train", table.meta)
    ids, seen = [], {}
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        ids += batch["id"].tolist()
        seen.update(zip(batch["id"].tolist(), batch["image"], strict=True))
    assert sorted(ids) == sorted(table.ids[table.splits == "train"].tolist())  # once each
    local = image_stream.local_blocks(artifact.store.fs, order, "train", table.meta)
    assert np.concatenate([b["id"] for b in local]).tolist() == ids  # the same rows, in order
    expected = {int(i): img for i, img in zip(table.ids, table.images, strict=True)}
    assert all((expected[i] == img).all() for i, img in seen.items())
    assert read_image_table(artifact).images.shape == (3000, 16, 16, 3)
    # a part of a group: its slice of the group's rows of the split
    whole = image_stream.read_group(artifact.store.fs, train[0], "train")
    halves = [
        image_stream.read_group(
            artifact.store.fs, image_stream.Group(g.path, g.index, 0, p, 2), "train"
        )
        for g, p in ((train[0], 0), (train[0], 1))
    ]
    assert halves[0]["id"].to_pylist() + halves[1]["id"].to_pylist() == whole["id"].to_pylist()


def test_shuffled_batches_draw_each_row_once_from_a_bounded_buffer():
    blocks = [
        {"id": np.arange(i, i + 100), "x": np.arange(i, i + 100) * 2} for i in range(0, 1000, 100)
    ]
    batches = list(image_stream.shuffled_batches(iter(blocks), 32, 200, seed=1))
    ids = np.concatenate([b["id"] for b in batches])
    assert len(batches) == 1000 // 32 and len(set(ids.tolist())) == len(ids)  # no repeats
    assert all((b["x"] == 2 * b["id"]).all() for b in batches)  # columns stay aligned
    assert ids[:32].max() < 200  # the first batch comes from the first 200 rows
    assert not (np.diff(ids) > 0).all()  # shuffled
    again = list(image_stream.shuffled_batches(iter(blocks), 32, 200, seed=1))
    assert all((a["id"] == b["id"]).all() for a, b in zip(batches, again, strict=True))


def test_table_rows_keep_null_labels_and_refuse_labels_past_int16():
    """`to_arrow` builds its columns from buffers: null labels stay null, and a label the
    int16 column cannot hold is an error, not a wrapped value."""
    from stages.formats.images import ImageTable, ImageTableMeta, table_schema, to_arrow

    meta = ImageTableMeta(height=2, width=2, channels=1, class_names=["a", "b"])
    splits = np.array(["train", "val", "train"], dtype=object)
    table = ImageTable(
        meta, np.arange(3), np.array([1, -1, 0]), splits, np.zeros((3, 2, 2, 1), np.uint8)
    )
    rows = to_arrow(table, table_schema(meta), np.array([False, True, True]))
    rows.validate(full=True)
    assert rows.column("label").to_pylist() == [None, 0]
    assert rows.column("split").to_pylist() == ["val", "train"]
    assert (
        rows.column("id").to_pylist() == [1, 2] and rows.column("image").type == pa.large_binary()
    )
    table.labels[0] = 40_000
    with pytest.raises(ValueError, match="do not fit in int16"):
        to_arrow(table, table_schema(meta))
