"""Moving MNIST generators (physics, determinism), the sequence table, and ingest of sequences."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, from_dict
from pipeline.store import Store
from stages import ingest_sequences
from stages.formats.sequences import (
    META_KEY,
    SequenceTable,
    SequenceTableMeta,
    read_sequence_table,
    sequence_table_meta,
    write_sequence_table,
)
from stages.sources import mnist, moving_mnist
from tests.helpers import write_idx


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    """The embedded MNIST training digits, uint8 ``n 28 28``."""
    return mnist.read_mnist_dir(mnist.EMBEDDED_DIR)[0]["images"][..., 0]


def _glyph(digit: np.ndarray, size: int) -> np.ndarray:
    if digit.shape == (size, size):
        return digit
    return np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR))


def _fold(x: np.ndarray, free: float) -> np.ndarray:
    """Straight-line coordinates folded into ``[0, free]`` by reflection at both walls."""
    y = np.mod(x, 2 * free)
    return np.where(y > free, 2 * free - y, y)


# ----- bouncing ------------------------------------------------------------------------------


@pytest.mark.parametrize(("canvas", "digit_size", "speed"), [(64, 28, 0.1), (32, 16, 0.45)])
def test_bouncing_digit_stays_inside_and_is_whole(pool, canvas, digit_size, speed):
    params = moving_mnist.Bouncing(
        frames=12, canvas=canvas, num_digits=1, digit_size=digit_size, speed=speed
    )
    sequences = moving_mnist.generate(params, pool, range(30))
    free = canvas - digit_size
    assert sequences.frames.shape == (30, 12, canvas, canvas, 1)
    assert sequences.frames.dtype == np.uint8
    assert sequences.positions.shape == sequences.velocities.shape == (30, 12, 1, 2)
    assert sequences.positions.min() >= 0.0 and sequences.positions.max() <= free
    for i in range(30):
        glyph = _glyph(pool[sequences.digits[i, 0]], digit_size)
        for t in range(12):
            row, column = np.rint(sequences.positions[i, t, 0]).astype(int)
            expected = np.zeros((canvas, canvas), np.uint8)
            expected[row : row + digit_size, column : column + digit_size] = glyph
            np.testing.assert_array_equal(sequences.frames[i, t, ..., 0], expected)
            assert sequences.frames[i, t].sum() == glyph.sum()  # no pixel left the canvas


def test_two_digits_combine_by_max(pool):
    params = moving_mnist.Bouncing(frames=5)
    sequences = moving_mnist.generate(params, pool, [11])
    expected = np.zeros((5, 64, 64), np.uint8)
    for t in range(5):
        for k in range(2):
            row, column = np.rint(sequences.positions[0, t, k]).astype(int)
            window = expected[t, row : row + 28, column : column + 28]
            np.maximum(window, pool[sequences.digits[0, k]], out=window)
    np.testing.assert_array_equal(sequences.frames[0, ..., 0], expected)


def test_bouncing_speed_is_constant_and_motion_is_folded_straight_line(pool):
    params = moving_mnist.Bouncing(frames=40, canvas=48, digit_size=20, speed=0.3)
    sequences = moving_mnist.generate(params, pool, range(20))
    free, step = 28.0, 0.3 * 28.0
    np.testing.assert_allclose(np.linalg.norm(sequences.velocities, axis=-1), step, rtol=1e-12)
    # the distance travelled per frame, unfolded at a wall, is always the speed
    positions, velocities = sequences.positions, sequences.velocities
    moved = positions[:, :-1] + velocities[:, :-1]
    unfolded = np.where(moved < 0, -positions[:, 1:], positions[:, 1:])
    unfolded = np.where(moved > free, 2 * free - unfolded, unfolded)
    displacement = np.linalg.norm(unfolded - positions[:, :-1], axis=-1)
    np.testing.assert_allclose(displacement, step, rtol=1e-9)
    # where no wall is hit, the plain displacement is the speed too
    plain = np.linalg.norm(np.diff(positions, axis=1), axis=-1)
    free_flight = ((moved >= 0) & (moved <= free)).all(axis=-1)
    assert free_flight.any() and not free_flight.all()
    np.testing.assert_allclose(plain[free_flight], step, rtol=1e-9)
    # reference: the first velocity, straight on from the start, folded into the box
    t = np.arange(40)[None, :, None, None]
    straight = positions[:, :1] + t * velocities[:, :1]
    np.testing.assert_allclose(positions, _fold(straight, free), atol=1e-9)


def test_bouncing_reflects_exactly_the_component_that_hits_a_wall(pool):
    params = moving_mnist.Bouncing(frames=30, canvas=40, digit_size=12, speed=0.4)
    sequences = moving_mnist.generate(params, pool, range(20))
    positions, velocities = sequences.positions, sequences.velocities
    hit = (positions[:, :-1] + velocities[:, :-1] < 0) | (
        positions[:, :-1] + velocities[:, :-1] > 28
    )
    before, after = velocities[:, :-1], velocities[:, 1:]
    assert hit.any() and (~hit).any()
    assert (hit[..., 0] & ~hit[..., 1]).any() and (hit[..., 1] & ~hit[..., 0]).any()
    np.testing.assert_array_equal(after[hit], -before[hit])
    np.testing.assert_array_equal(after[~hit], before[~hit])


def test_bouncing_start_and_direction_are_spread(pool):
    sequences = moving_mnist.generate(moving_mnist.Bouncing(frames=2), pool, range(400))
    start = sequences.positions[:, 0].reshape(-1, 2)
    assert start.min() < 2 and start.max() > 34  # uniform over [0, 36]^2
    angles = np.arctan2(*sequences.velocities[:, 0].reshape(-1, 2).T)  # sin = row, cos = column
    assert np.histogram(angles, bins=4, range=(-np.pi, np.pi))[0].min() > 150
    assert len(np.unique(sequences.digits)) > 500


# ----- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [moving_mnist.Bouncing(frames=6), moving_mnist.Shifted(frames=6, canvas=40, shift=3)],
    ids=["bouncing", "shifted"],
)
def test_seed_regenerates_the_sequence(pool, params):
    seeds = moving_mnist.sequence_seeds(7, 5)
    a = moving_mnist.generate(params, pool, seeds)
    b = moving_mnist.generate(params, pool, seeds)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.positions, b.positions)
    one = moving_mnist.generate_one(params, pool, int(seeds[3]))
    assert len(one) == 1 and one.seeds[0] == seeds[3]
    np.testing.assert_array_equal(one.frames[0], a.frames[3])  # independent of the batch
    np.testing.assert_array_equal(one.digits[0], a.digits[3])
    assert all(not np.array_equal(a.frames[0], a.frames[i]) for i in range(1, 5))


def test_sequence_seeds():
    np.testing.assert_array_equal(
        moving_mnist.sequence_seeds(2, 3, start=5), [2_000_011, 2_000_012, 2_000_013]
    )
    assert moving_mnist.sequence_seeds(0, 0).shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        moving_mnist.sequence_seeds(-1, 3)


# ----- shifted -------------------------------------------------------------------------------


def test_shifted_wraps_around(pool):
    params = moving_mnist.Shifted(frames=17, canvas=32, digit_size=16, shift=2)
    sequences = moving_mnist.generate(params, pool, range(20))
    steps = sequences.velocities[:, 0, 0, 1]
    assert set(steps.tolist()) == {-2.0, 2.0}
    np.testing.assert_array_equal(sequences.frames[:, 16], sequences.frames[:, 0])  # 32 / 2
    for i in range(20):
        first = sequences.frames[i, 0, ..., 0]
        assert first.sum() == _glyph(pool[sequences.digits[i, 0]], 16).sum()
        for t in range(17):
            shifted = np.roll(first, int(steps[i]) * t, axis=1)
            np.testing.assert_array_equal(sequences.frames[i, t, ..., 0], shifted)
    assert (sequences.positions[..., 0] == 8).all()  # centred vertically


def test_shifted_digit_crossing_the_right_edge_appears_at_the_left():
    block = np.full((1, 8, 8), 255, np.uint8)
    params = moving_mnist.Shifted(frames=20, canvas=24, digit_size=8, shift=1)
    sequences = moving_mnist.generate(params, block, range(10))
    i = int(np.argmax(sequences.velocities[:, 0, 0, 1] > 0))  # one moving right
    assert sequences.velocities[i, 0, 0, 1] == 1
    for t in range(20):
        frame = sequences.frames[i, t, ..., 0]
        column = int(sequences.positions[i, t, 0, 1])
        on = np.flatnonzero(frame.max(axis=0))
        expected = (column + np.arange(8)) % 24
        np.testing.assert_array_equal(on, np.sort(expected))
        assert frame.sum() == 64 * 255
    crossing = [t for t in range(20) if int(sequences.positions[i, t, 0, 1]) > 16]
    assert crossing  # some frame straddles the right edge: its digit also fills column 0
    assert all(sequences.frames[i, t, :, 0].max() == 255 for t in crossing)
    assert all(sequences.frames[i, t, :, -1].max() == 255 for t in crossing)


def test_generator_parameters_are_checked():
    with pytest.raises(ValueError, match=r"^digit_size: .*canvas \(32 px\)"):
        moving_mnist.Bouncing(canvas=32, digit_size=40)
    with pytest.raises(ValueError, match=r"^frames: must be at least 2"):
        moving_mnist.Shifted(frames=1)
    with pytest.raises(ValueError, match=r"^speed: must be in \[0, 1\]"):
        moving_mnist.Bouncing(speed=1.5)
    with pytest.raises(ValueError, match=r"^shift: must be between 1 and canvas - 1"):
        moving_mnist.Shifted(canvas=32, shift=32)
    with pytest.raises(ValueError, match=r"pool: expected a non-empty uint8"):
        moving_mnist.generate(moving_mnist.Bouncing(), np.zeros((3, 28, 28), np.float32), [0])


# ----- the sequence table --------------------------------------------------------------------


def _commit(tmp_path: Path, write) -> object:
    """Commits the files `write(out)` puts into a staging directory; returns the artifact."""
    store = Store(str(tmp_path / "store"))
    key = f"{abs(hash(str(tmp_path))):064x}"[-64:]
    with store.staging("ingest_sequences", key) as out:
        write(out)
        artifact, _ = store.commit("ingest_sequences", key, out, {"metrics": {}})
    return artifact


def _small_table(n: int = 7) -> SequenceTable:
    rng = np.random.default_rng(0)
    meta = SequenceTableMeta(
        frames=3,
        height=5,
        width=4,
        channels=1,
        generator="bouncing",
        params={"canvas": 5, "speed": 0.1},
        digit_pool="synthetic",
    )
    return SequenceTable(
        meta,
        ids=np.arange(n, dtype=np.int64),
        splits=np.array(["train", "val", "test", "train", "train", "val", "train"][:n], object),
        seeds=np.arange(n, dtype=np.int64) * 10,
        labels=np.array([3, -1, 5, 0, 9, 1, 2][:n]),
        frames=rng.integers(0, 256, (n, 3, 5, 4, 1), dtype=np.uint8),
    )


def test_sequence_table_round_trip(tmp_path):
    table = _small_table()
    artifact = _commit(tmp_path, lambda out: write_sequence_table(out, table, rows_per_file=3))
    assert sorted(artifact.files) == [f"sequences-0000{i}.parquet" for i in range(3)]
    assert sequence_table_meta(artifact) == table.meta
    back = read_sequence_table(artifact)
    assert back.meta == table.meta and len(back) == 7
    for column in ("ids", "splits", "seeds", "labels", "frames"):
        np.testing.assert_array_equal(getattr(back, column), getattr(table, column))
    val = read_sequence_table(artifact, splits=("val",))
    np.testing.assert_array_equal(val.ids, [1, 5])
    np.testing.assert_array_equal(back.split("train").ids, [0, 3, 4, 6])
    np.testing.assert_array_equal(val.frames, table.frames[[1, 5]])
    plain = pq.read_table(artifact.local_path("sequences-00000.parquet"))
    assert plain.column_names == ["id", "split", "seed", "label", "frames"]
    assert plain["label"].to_pylist() == [3, None, 5]


def test_sequence_table_errors_name_the_file(tmp_path):
    table = _small_table(2)

    def write_without_metadata(out):
        pq.write_table(pa.table({"id": [0]}), out / "sequences-00000.parquet")

    artifact = _commit(tmp_path / "a", write_without_metadata)
    with pytest.raises(ValueError, match=r"sequences-00000.parquet: no twostage.sequence_table"):
        read_sequence_table(artifact)
    with pytest.raises(ValueError, match=r"sequences-00000.parquet: no twostage.sequence_table"):
        sequence_table_meta(artifact)

    def write_version_9(out):
        write_sequence_table(out, table)
        arrow = pq.read_table(out / "sequences-00000.parquet")
        meta = json.loads(arrow.schema.metadata[META_KEY]) | {"schema_version": 9}
        arrow = arrow.replace_schema_metadata({META_KEY: json.dumps(meta)})
        pq.write_table(arrow, out / "sequences-00000.parquet")

    artifact = _commit(tmp_path / "b", write_version_9)
    with pytest.raises(
        ValueError, match=r"sequences-00000.parquet: sequence table schema version 9"
    ):
        read_sequence_table(artifact)

    def write_wrong_size(out):
        write_sequence_table(out, table)
        arrow = pq.read_table(out / "sequences-00000.parquet")
        meta = json.loads(arrow.schema.metadata[META_KEY]) | {"frames": 4}
        arrow = arrow.replace_schema_metadata({META_KEY: json.dumps(meta)})
        pq.write_table(arrow, out / "sequences-00000.parquet")

    artifact = _commit(tmp_path / "c", write_wrong_size)
    with pytest.raises(ValueError, match=r"sequences-00000.parquet: frames column .*wrong size"):
        read_sequence_table(artifact)

    artifact = _commit(tmp_path / "d", lambda out: (out / "images-00000.parquet").write_bytes(b""))
    with pytest.raises(ValueError, match=r"holds no sequences-\*.parquet files"):
        read_sequence_table(artifact)


# ----- ingest --------------------------------------------------------------------------------


def _ingest(tmp_path: Path, **kwargs) -> tuple[dict, object, ingest_sequences.Config]:
    """Runs ingest and commits it to a store in tmp_path; returns (metrics, artifact, config)."""
    config = ingest_sequences.Config(
        source=ingest_sequences.Source(**kwargs.pop("source")), **kwargs
    )
    store = Store(str(tmp_path / "store"))
    key = f"{abs(hash(repr(config))):064x}"[-64:]
    with store.staging("ingest_sequences", key) as out:
        metrics = ingest_sequences.run(config, {}, out, str(tmp_path / "scratch"))
        artifact, _ = store.commit("ingest_sequences", key, out, {"metrics": metrics})
    return metrics, artifact, config


@pytest.mark.parametrize(
    ("source", "generator"),
    [
        (
            {"kind": "moving_mnist", "count": 40, "frames": 6, "canvas": 32, "digit_size": 16},
            "bouncing",
        ),
        ({"kind": "shifted_mnist", "count": 40, "frames": 6, "canvas": 28, "shift": 2}, "shifted"),
    ],
)
def test_ingest_writes_a_sequence_table(tmp_path, source, generator):
    metrics, artifact, config = _ingest(
        tmp_path, source=source, val_fraction=0.25, seed=3, rows_per_file=16
    )
    side = source["canvas"]
    assert metrics == {
        "sequences": 50,
        "splits": {"train": 30, "val": 10, "test": 10},
        "frames": 6,
        "height": side,
        "width": side,
        "channels": 1,
        "generator": generator,
        "digits": {"train": 4500, "val": 1500, "test": 1000},
    }
    assert sorted(artifact.files) == [f"sequences-0000{i}.parquet" for i in range(4)]

    # plain pyarrow: the metadata says how to reshape the frames
    plain = pq.read_table(artifact.local_path("sequences-00000.parquet"))
    meta = json.loads(plain.schema.metadata[META_KEY])
    assert (meta["frames"], meta["height"], meta["width"], meta["channels"]) == (6, side, side, 1)
    assert meta["generator"] == generator and meta["params"]["canvas"] == side
    assert ("speed" in meta["params"]) == (generator == "bouncing")
    assert "embedded" in meta["digit_pool"]
    first = np.frombuffer(plain["frames"][0].as_py(), np.uint8).reshape(6, side, side)
    assert first.max() > 0

    table = read_sequence_table(artifact)
    assert table.frames.shape == (50, 6, side, side, 1)
    np.testing.assert_array_equal(table.ids, np.arange(50))
    np.testing.assert_array_equal(table.seeds, moving_mnist.sequence_seeds(3, 50))
    assert [len(table.split(s)) for s in ("train", "val", "test")] == [30, 10, 10]

    # every row regenerates from its stored seed; train, val and test digits are disjoint
    params = moving_mnist.GENERATORS[table.meta.generator](**table.meta.params)
    pools = ingest_sequences._digit_pools(config)
    used = {split: set() for split in pools}
    for i in range(len(table)):
        pool = pools[table.splits[i]]
        again = moving_mnist.generate_one(params, pool["images"], int(table.seeds[i]))
        np.testing.assert_array_equal(again.frames[0], table.frames[i])
        assert table.labels[i] == pool["labels"][again.digits[0, 0]]
        used[table.splits[i]].update(pool["ids"][again.digits[0]].tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"]
    assert not set(pools["train"]["ids"]) & set(pools["val"]["ids"])


def test_ingest_sequences_from_an_idx_dir_without_test_files(tmp_path):
    digits = np.random.default_rng(0).integers(0, 255, (30, 28, 28), dtype=np.uint8)
    (tmp_path / "raw").mkdir()
    write_idx(tmp_path / "raw" / "train-images-idx3-ubyte", digits)
    write_idx(tmp_path / "raw" / "train-labels-idx1-ubyte", np.arange(30, dtype=np.uint8) % 10)
    metrics, artifact, _ = _ingest(
        tmp_path,
        source={"kind": "moving_mnist", "path": str(tmp_path / "raw"), "count": 8, "frames": 3},
        val_fraction=0.5,
    )
    assert metrics["splits"] == {"train": 4, "val": 4, "test": 0}
    assert metrics["digits"] == {"train": 15, "val": 15}
    assert str(tmp_path / "raw") in sequence_table_meta(artifact).digit_pool


BAD = [
    ({"kind": "moving_mnist", "canvas": 32, "digit_size": 40}, {}, "source.digit_size: must be"),
    ({"kind": "moving_mnist", "frames": 1}, {}, "source.frames: must be at least 2"),
    ({"kind": "moving_mnist", "speed": 2.0}, {}, r"source.speed: must be in \[0, 1\]"),
    ({"kind": "shifted_mnist", "shift": 0}, {}, "source.shift: must be between 1"),
    ({"kind": "shifted_mnist", "speed": 0.2}, {}, "source.speed: not used by source kind"),
    ({"kind": "moving_mnist", "shift": 2}, {}, "source.shift: not used by source kind"),
    ({"kind": "embedded"}, {}, "source.kind: must be one of 'moving_mnist'"),
    ({"kind": "moving_mnist"}, {"image_size": 32}, "image_size: unknown key"),
    ({"kind": "moving_mnist"}, {"channels": 3}, "channels: unknown key"),
]


@pytest.mark.parametrize(("source", "extra", "message"), BAD)
def test_bad_sequence_config_names_the_key(source, extra, message):
    with pytest.raises(ConfigError, match=rf"^steps\.data\.{message}"):
        from_dict(ingest_sequences.Config, {"source": source, **extra}, "steps.data")


def test_source_rejects_a_digit_larger_than_the_canvas():
    with pytest.raises(ConfigError, match=r"^digit_size: .*canvas \(32 px\).*got 40"):
        ingest_sequences.Source(kind="moving_mnist", canvas=32, digit_size=40)
