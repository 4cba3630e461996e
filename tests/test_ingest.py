"""Ingest stage, run directly (no Ray): every source, the split, resizing, corrupt inputs."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.store import Store
from stages import ingest
from stages.formats.images import META_KEY, read_image_table
from tests.helpers import noise_folder_with_a_late_broken_file, write_idx


def _ingest(tmp_path: Path, **kwargs) -> tuple[dict, object]:
    """Runs ingest and commits it to a store in tmp_path as the runner does (the key covers
    the source's fingerprint; the scratch goes on commit); returns (metrics, artifact)."""
    source = kwargs.pop("source", {"kind": "embedded"})
    config = ingest.Config(source=ingest.Source(**source), **kwargs)
    store = Store(str(tmp_path / "store"))
    digest = hashlib.sha256(f"{config!r}{ingest.fingerprint(config)}".encode())
    key = digest.hexdigest()
    with store.staging("ingest", key) as out:
        metrics = ingest.run(config, {}, out, store.scratch_uri("ingest", key))
        artifact, _ = store.commit("ingest", key, out, {"metrics": metrics})
    store.remove_scratch("ingest", key)
    return metrics, artifact


def test_embedded_source(tmp_path):
    metrics, artifact = _ingest(tmp_path, image_size=32)
    assert metrics["images"] == 7000
    assert metrics["splits"] == {"train": 5400, "val": 600, "test": 1000}
    assert metrics["class_counts"] == [700] * 10
    table = read_image_table(artifact)
    assert table.images.shape == (7000, 32, 32, 1)
    assert len(set(table.ids.tolist())) == 7000
    # 28 -> 32 pads two zero pixels on every side and keeps the digit intact
    assert table.images[:, :2].max() == 0 and table.images[:, -2:].max() == 0
    assert table.images[:, 2:30, 2:30].max() == 255


def test_plain_pyarrow_reads_the_table(tmp_path):
    _, artifact = _ingest(tmp_path, limit=50)
    path = artifact.local_path("images-train-00000.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["id", "label", "split", "image"]
    assert set(table["split"].to_pylist()) == {"train"}  # one file set per split
    whole = pq.read_table(Path(path).parent)  # the directory: every split
    assert sorted(set(whole["split"].to_pylist())) == ["test", "train", "val"]
    import json

    meta = json.loads(table.schema.metadata[META_KEY])
    assert (meta["height"], meta["width"], meta["channels"]) == (28, 28, 1)
    first = np.frombuffer(table["image"][0].as_py(), np.uint8).reshape(28, 28)
    assert first.max() > 0


def test_split_is_deterministic_by_seed(tmp_path):
    _, a = _ingest(tmp_path / "a", seed=3)
    _, b = _ingest(tmp_path / "b", seed=3)
    _, c = _ingest(tmp_path / "c", seed=4)
    ta, tb, tc = (read_image_table(x) for x in (a, b, c))
    val = lambda t: set(t.ids[t.splits == "val"].tolist())  # noqa: E731
    assert val(ta) == val(tb)
    assert val(ta) != val(tc)
    assert len(val(ta)) == len(val(tc)) == 600


def test_mnist_idx_from_shared(tmp_path, shared_mnist):
    metrics, artifact = _ingest(
        tmp_path, source={"kind": "mnist", "path": str(shared_mnist)}, image_size=32
    )
    assert metrics["splits"] == {"train": 54000, "val": 6000, "test": 10000}
    table = read_image_table(artifact, splits=("test",))
    assert len(table) == 10000 and table.ids.min() == 60000


def test_mnist_raw_idx_and_truncated_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (20, 28, 28), dtype=np.uint8)
    (tmp_path / "raw").mkdir()
    write_idx(tmp_path / "raw" / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "raw" / "train-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)
    metrics, artifact = _ingest(
        tmp_path, source={"kind": "mnist", "path": str(tmp_path / "raw")}, val_fraction=0.0
    )
    table = read_image_table(artifact)
    np.testing.assert_array_equal(table.images[..., 0], images)

    bad = tmp_path / "bad"
    bad.mkdir()
    data = gzip.compress(open(tmp_path / "raw" / "train-images-idx3-ubyte", "rb").read()[:-100])
    (bad / "train-images-idx3-ubyte.gz").write_bytes(data)
    write_idx(bad / "train-labels-idx1-ubyte.gz", np.zeros(20, np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: holds .*truncated"):
        _ingest(tmp_path, source={"kind": "mnist", "path": str(bad)})
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"garbage, not gzip at all")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: unreadable IDX"):
        _ingest(tmp_path, source={"kind": "mnist", "path": str(bad)})


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, mode in (("cat", "RGB"), ("dog", "L")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            shape = (20, 24, 3) if mode == "RGB" else (20, 24)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                root / name / f"{i}.{'png' if i % 2 else 'jpg'}"
            )
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG this is not a png")
    return root


def test_image_folder_counts_corrupt_files(tmp_path, ray_local):
    root = _image_folder(tmp_path / "images")
    metrics, artifact = _ingest(
        tmp_path,
        source={"kind": "image_folder", "path": str(root)},
        image_size=16,
        resize="resize",
        val_fraction=0.0,
    )
    assert metrics["images"] == 6
    assert metrics["corrupt"]["count"] == 1
    assert "dog/broken.png" in metrics["corrupt"]["examples"][0]
    table = read_image_table(artifact)
    assert table.meta.class_names == ["cat", "dog"]
    assert table.images.shape == (6, 16, 16, 3)
    assert sorted(table.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert artifact.manifest["metrics"]["corrupt"]["count"] == 1


def test_image_folder_strict_stops_on_corrupt_file(tmp_path, ray_local):
    root = _image_folder(tmp_path / "images")
    with pytest.raises(ValueError, match=r"broken.png: unreadable image"):
        _ingest(
            tmp_path,
            source={"kind": "image_folder", "path": str(root)},
            strict=True,
            image_size=16,
            resize="resize",
        )


def test_image_folder_mixed_sizes_need_image_size(tmp_path, ray_local):
    root = _image_folder(tmp_path / "images")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "cat" / "small.png")
    with pytest.raises(ValueError, match=r"different sizes .*; set image_size"):
        _ingest(tmp_path, source={"kind": "image_folder", "path": str(root)})
    with pytest.raises(ValueError, match="larger than image_size"):
        _ingest(tmp_path, source={"kind": "image_folder", "path": str(root)}, image_size=16)


def test_parquet_source_round_trip(tmp_path):
    _, first = _ingest(tmp_path / "one", limit=100, val_fraction=0.2, channels=3)
    path = Path(first.local_path("images-train-00000.parquet")).parent  # the table's files
    _, second = _ingest(
        tmp_path / "two", source={"kind": "parquet", "path": str(path)}, val_fraction=0.2
    )
    a, b = read_image_table(first), read_image_table(second)
    order_a, order_b = np.argsort(a.ids), np.argsort(b.ids)
    np.testing.assert_array_equal(a.ids[order_a], b.ids[order_b])
    np.testing.assert_array_equal(a.images[order_a], b.images[order_b])
    assert b.images.shape[-1] == 3


def test_missing_source_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ingest(tmp_path, source={"kind": "mnist", "path": str(tmp_path / "nope")})


def _awkward_folder(root: Path) -> Path:
    """Every kind of file a real folder holds: sizes and modes that differ (grey, RGBA, 16-bit
    PNG, palette), a truncated JPEG, a text file named .jpg, and a file that is no image."""
    rng = np.random.default_rng(1)
    (root / "a").mkdir(parents=True)
    (root / "b" / "nested").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a" / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / "a" / "grey.png")
    rgba = rng.integers(0, 255, (50, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "b" / "rgba.png")
    deep = np.full((24, 24), 65535, np.uint16)
    Image.fromarray(deep).save(root / "b" / "nested" / "deep.png")  # 16-bit grey, all white
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).convert("P").save(
        root / "b" / "palette.png"
    )
    full = (root / "a" / "rgb.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "b" / "text.jpg").write_text("not an image")
    (root / "b" / "notes.txt").write_text("a file that is no image is ignored")
    return root


def test_image_folder_mixed_sizes_modes_and_broken_files(tmp_path, ray_local):
    root = _awkward_folder(tmp_path / "images")
    metrics, artifact = _ingest(
        tmp_path,
        source={"kind": "image_folder", "path": str(root)},
        image_size=32,
        resize="center_crop",
        val_fraction=0.0,
    )
    assert metrics["images"] == 5 and metrics["channels"] == 3  # colour among them: RGB
    assert metrics["corrupt"]["count"] == 2 and metrics["ignored_files"] == 1
    assert sorted(e.split(":")[0] for e in metrics["corrupt"]["examples"]) == [
        "a/truncated.jpg",
        "b/text.jpg",
    ]
    table = read_image_table(artifact)
    assert table.images.shape == (5, 32, 32, 3)
    deep = table.images[np.argmax(table.images.reshape(5, -1).min(1))]
    assert deep.min() == 255  # 16-bit white stays white, not clipped to another level
    # strict: the first unreadable file stops the stage, naming it, before anything is stored
    with pytest.raises(ValueError, match=r"(truncated|text)\.jpg: unreadable image"):
        _ingest(
            tmp_path / "strict",
            source={"kind": "image_folder", "path": str(root)},
            image_size=32,
            resize="center_crop",
            strict=True,
        )
    assert not (tmp_path / "strict" / "store" / "ingest").exists() or not any(
        (tmp_path / "strict" / "store" / "ingest").iterdir()
    )


def test_image_folder_splits_by_path_hash_and_center_crops(tmp_path, ray_local):
    root = tmp_path / "images"
    for label in ("x", "y"):
        (root / label).mkdir(parents=True)
        for i in range(40):
            wide = np.zeros((20, 40), np.uint8)
            wide[:, 10:30] = 200  # the centred square is bright, the sides black
            Image.fromarray(wide).save(root / label / f"{i}.png")
    source = {"kind": "image_folder", "path": str(root)}
    metrics, a = _ingest(tmp_path / "a", source=source, image_size=10, resize="center_crop")
    _, b = _ingest(tmp_path / "b", source=source, image_size=10, resize="center_crop")
    ta, tb = read_image_table(a), read_image_table(b)
    assert metrics["splits"]["val"] == int((ta.splits == "val").sum()) > 0
    assert dict(zip(ta.ids, ta.splits, strict=True)) == dict(zip(tb.ids, tb.splits, strict=True))
    assert ta.images.min() == 200 and ta.meta.channels == 1  # only the centre, grey
    # one more file leaves every other image's id and split as they were
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(root / "x" / "new.png")
    _, c = _ingest(tmp_path / "c", source=source, image_size=10, resize="center_crop")
    tc = read_image_table(c)
    before = dict(zip(ta.ids, ta.splits, strict=True))
    after = dict(zip(tc.ids, tc.splits, strict=True))
    assert len(after) == 81 and all(after[i] == s for i, s in before.items())


def test_image_folder_in_parts_gives_the_same_files_every_run(tmp_path, ray_local):
    """Decode tasks return finished Parquet files (one per part, in part order); the val rows
    of every part are gathered into one file; the pixels are the source's, uncompressed."""
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    pixels = {}
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(150):
            image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noise: no compression
            Image.fromarray(image).save(root / label / f"{i}.png")
            pixels[f"{label}/{i}.png"] = image
    source = {"kind": "image_folder", "path": str(root)}
    runs = [_ingest(tmp_path / r, source=source, readers=2, val_fraction=0.1) for r in "xy"]
    (metrics, a), (_, b) = runs
    files = sorted(a.files)
    assert [n for n in files if "train" in n] == [f"images-train-{i:05d}.parquet" for i in range(5)]
    assert [n for n in files if "val" in n] == ["images-val-00000.parquet"]
    assert {n: e["sha256"] for n, e in a.files.items()} == {
        n: e["sha256"] for n, e in b.files.items()
    }
    parquet = pq.ParquetFile(a.local_path("images-train-00000.parquet"))
    assert parquet.metadata.row_group(0).column(3).compression == "UNCOMPRESSED"
    table = read_image_table(a)
    assert metrics["images"] == len(table) == 300 and len(set(table.ids.tolist())) == 300
    assert metrics["splits"] == {
        s: int((table.splits == s).sum()) for s in ("train", "val", "test")
    }
    from stages.sources.image_folder import _hash

    by_id = {_hash(rel.encode()) >> 1: image for rel, image in pixels.items()}
    assert all(
        np.array_equal(by_id[i], image) for i, image in zip(table.ids, table.images, strict=True)
    )


def test_decode_part_writes_the_same_file_on_the_ingest_node_and_off_it(tmp_path, ray_local):
    """On the ingest step's node a decode task writes its file into the table's directory; on
    any other node it returns the file's bytes. Both are the same file, with the same sha256."""
    import hashlib

    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray

    from stages.formats.images import ImageTableMeta
    from stages.sources.image_folder import decode_part, list_images

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(100):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    fs = pafs.LocalFileSystem()
    rows, classes, _ = list_images(fs, str(root), seed=0, val_fraction=0.0)
    meta = ImageTableMeta(height=8, width=8, channels=1, class_names=classes)
    task = ray.remote(decode_part)
    here = (ray.get_runtime_context().get_node_id(), str(tmp_path / "part"))
    elsewhere = ("another node", str(tmp_path / "part"))
    written, returned = ray.get(
        [task.remote(rows, fs, meta, "same", 1, w) for w in (here, elsewhere)]
    )
    [(split, count, path, sha256)] = written["files"]
    [(_, _, data, same_sha256)] = returned["files"]
    assert (split, count) == ("train", 100) and path == str(tmp_path / "part-train.parquet")
    assert Path(path).read_bytes() == bytes(data) and sha256 == same_sha256
    assert sha256 == hashlib.sha256(data).hexdigest()
    table = pq.read_table(path)
    assert table.num_rows == 100 and table.schema.field("image").type == pa.large_binary()


@pytest.mark.parametrize("mode", ["center_crop", "resize"])
@pytest.mark.parametrize("pil_mode", ["L", "RGB"])
def test_cropping_and_resizing_in_pil_gives_the_pixels_of_the_numpy_path(mode, pil_mode):
    """The fast path of decoding (crop and resize in PIL) matches `shape_image` exactly."""
    from stages.sources.image_folder import _shape_in_pil, shape_image, to_array

    rng = np.random.default_rng(3)
    channels = 1 if pil_mode == "L" else 3
    for w, h in [(50, 37), (37, 50), (64, 32), (32, 32), (20, 40), (33, 33)]:
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, pil_mode)
        fast = _shape_in_pil(im, 32, 32, channels, mode)
        expected = shape_image(to_array(im), 32, 32, channels, mode)
        if (h, w) == (32, 32):
            assert fast is None  # nothing to do: the plain path takes it
        else:
            assert fast.shape == expected.shape and np.array_equal(fast, expected)
    assert _shape_in_pil(Image.new("RGBA", (40, 40)), 32, 32, 3, mode) is None
    assert _shape_in_pil(Image.new("RGB", (40, 40)), 32, 32, 3, "pad") is None


def test_an_interrupted_image_folder_ingest_decodes_only_the_parts_not_yet_stored(
    tmp_path, ray_local
):
    """A run stopped part-way (here: strict, on a broken file) leaves its finished parts in
    the step's scratch. Fixing the file changes the folder's fingerprint and so the step's
    key; the rerun, under the new key, takes the parts from the old key's scratch, decodes
    only the rest and writes the same files as a run that was never stopped. (On an S3
    store: tests/test_s3.py.)"""
    root = tmp_path / "images"
    rng, bad = noise_folder_with_a_late_broken_file(root)
    source = {"kind": "image_folder", "path": str(root)}
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="unreadable image"):
        _ingest(run, source=source, readers=2, strict=True)
    scratch = run / "store" / "_scratch" / "ingest"
    (old_key,) = [p.name for p in scratch.iterdir()]
    stored = sorted((scratch / old_key / "parts").glob("*.json"))
    assert len(stored) >= 3  # the parts before the broken file's
    # a part that lost a file, and one whose record is cut short, are decoded again
    stored[0].with_name(f"{stored[0].stem}-train.parquet").unlink()
    stored[-1].write_text('{"files": [')
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / bad)
    metrics, resumed = _ingest(run, source=source, readers=2, strict=True)
    assert resumed.key != old_key
    assert metrics["resumed_parts"] == len(stored) - 2 and metrics["images"] == 301
    # the new key's scratch went on commit; the old key's stays for `twostage gc`
    assert [p.name for p in scratch.iterdir()] == [old_key]
    fresh_metrics, fresh = _ingest(tmp_path / "fresh", source=source, readers=2, strict=True)
    assert fresh_metrics["resumed_parts"] == 0
    assert {n: e["sha256"] for n, e in resumed.files.items()} == {
        n: e["sha256"] for n, e in fresh.files.items()
    }
    assert read_image_table(resumed).images.sum() == read_image_table(fresh).images.sum()


def test_image_folder_empty_folder_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        _ingest(tmp_path, source={"kind": "image_folder", "path": str(tmp_path / "empty")})
    (tmp_path / "empty" / "cats").mkdir()
    (tmp_path / "empty" / "cats" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no \.png, \.jpg or \.jpeg images"):
        _ingest(tmp_path, source={"kind": "image_folder", "path": str(tmp_path / "empty")})
