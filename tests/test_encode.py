"""Encode stage and code shards: plain-pyarrow readability, exact codes, lineage, integrity."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.vqvae2 import VQVAE2
from pipeline.store import CorruptArtifactError, Store
from stages.formats.codes import CodeShardError, open_codes
from stages.formats.images import read_image_table
from tests.helpers import (
    REPO,
    TWO_STAGE_BASE,
    copy_run,
    run_json,
    steps_by_name,
    twostage,
    write_yaml,
)

# the two-stage pipeline's stage 1 (data, the tiny VQ-VAE-2, its codes) on its own
PIPELINE = "name: enc\nray: {num_cpus: 2}\n" + TWO_STAGE_BASE


@pytest.fixture(scope="module")
def encoded(two_stage_run, tmp_path_factory):
    """The session's two-stage run (its stage 1 is `PIPELINE`'s steps) copied, then `PIPELINE`
    run again in that store, then a third time with a retrained autoencoder (more steps) whose
    encode keeps only train and val: some of the table's batches hold only test rows, so they
    encode to no rows. That encode's actor is killed mid-stream (`_run_killing_an_encoder`)."""
    run_root, summary = two_stage_run
    tmp = copy_run(run_root, tmp_path_factory.mktemp("encode") / "run")
    store = Store(str(tmp / "artifacts"))
    first = {  # the session run's stage 1, located in this copy
        name: {**step, "uri": store.uri_of(step["stage"], step["key"])}
        for name, step in steps_by_name(summary).items()
        if name in ("data", "vqvae", "codes")
    }
    config = write_yaml(tmp / "enc.yaml", PIPELINE)
    again = run_json(config, cwd=tmp, timeout=600)
    retrained, killed = _run_killing_an_encoder(
        config,
        tmp,
        "steps.vqvae.train.steps=40",
        "steps.codes.splits=[train, val]",
        "steps.codes.batch_size=2",  # a stream long enough to kill its actor mid-way
    )
    assert retrained["status"] == "ok", retrained
    return {
        "killed": killed,
        "tmp": tmp,
        "config": config,
        "first": first,
        "again": steps_by_name(again),
        "retrained": steps_by_name(retrained),
        "store": store,
    }


@pytest.mark.slow
def test_plain_pyarrow_reads_a_shard_and_its_metadata(encoded):
    artifact = encoded["store"].open("encode", encoded["first"]["codes"]["key"])
    path = artifact.local_path("codes-00000.parquet")
    script = f"""
import json, sys
import numpy as np, pyarrow.parquet as pq
t = pq.read_table({str(path)!r})
meta = json.loads(t.schema.metadata[b"twostage.codes"])
row = t.slice(0, 1).to_pylist()[0]
grid = np.asarray(row["codes_bottom"], dtype=np.uint16).reshape(meta["grid_shapes"]["bottom"])
assert not any(m.split(".")[0] in ("pipeline", "stages", "models") for m in sys.modules)
print(json.dumps({{"rows": t.num_rows, "columns": t.column_names, "meta": meta,
                  "id": row["id"], "bottom": grid.tolist(), "top": row["codes_top"]}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rows"] == 800
    assert out["columns"] == ["id", "label", "split", "codes_bottom", "codes_top"]
    meta = out["meta"]
    assert meta["level_names"] == ["bottom", "top"]
    assert meta["grid_shapes"] == {"bottom": [8, 8], "top": [4, 4]}
    assert meta["codebook_sizes"] == {"bottom": 32, "top": 32}
    assert meta["autoencoder_key"] == encoded["first"]["vqvae"]["key"]
    assert meta["schema_version"] == 1 and meta["precision"] == "fp32"

    # the decoded grid equals encode_indices of that very image
    store = encoded["store"]
    model_dir = (
        store.open("train_autoencoder", encoded["first"]["vqvae"]["key"])
        .local_path("config.json")
        .parent
    )
    model = VQVAE2.load(model_dir).eval()
    table = read_image_table(store.open("ingest", encoded["first"]["data"]["key"]))
    image = table.images[table.ids == out["id"]]
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 127.5 - 1
    codes = model.encode_indices(x)
    assert codes["bottom"][0].tolist() == out["bottom"]
    assert codes["top"][0].flatten().tolist() == out["top"]


@pytest.mark.slow
def _encoder_actors() -> list[int]:
    """Pids of Ray Data's encode actors on this machine (their process title names Encoder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"Encoder" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _run_killing_an_encoder(config: Path, cwd: Path, *overrides: str) -> tuple[dict, int | None]:
    """``twostage run`` whose encode actor is SIGKILLed once it has run for a second; returns
    the run's summary and the killed pid (None if no actor showed up while the run went on)."""
    import os
    import signal
    import time

    from tests.helpers import cli_env

    sets = [arg for o in overrides for arg in ("--set", o)]
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), *sets, "--json"],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed, seen_at, deadline = None, None, time.time() + 300
    while killed is None and time.time() < deadline and run.poll() is None:
        actors = _encoder_actors()
        seen_at = seen_at or (time.time() if actors else None)
        if actors and time.time() - seen_at > 1.0:  # it has loaded its model: encoding
            os.kill(actors[0], signal.SIGKILL)
            killed = actors[0]
        time.sleep(0.05)
    out, err = run.communicate(timeout=600)
    try:
        return json.loads(out), killed
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON on stdout (exit {run.returncode}):\n{err[-3000:]}") from None


def test_open_codes_views(encoded):
    dataset = open_codes(encoded["store"].open("encode", encoded["first"]["codes"]["key"]))
    arrays = dataset.to_numpy()
    assert arrays["bottom"].shape == (800, 8, 8) and arrays["top"].shape == (800, 4, 4)
    assert arrays["bottom"].dtype == np.uint16 and arrays["bottom"].max() < 32
    assert sorted(set(arrays["split"].tolist())) == ["test", "train", "val"]
    # the retrained autoencoder's shards: train and val only, in the table's order
    rows = open_codes(
        encoded["store"].open("encode", encoded["retrained"]["codes"]["key"])
    ).to_numpy()
    assert sorted(set(rows["split"].tolist())) == ["train", "val"]
    assert np.array_equal(rows["id"], arrays["id"][arrays["split"] != "test"])
    val = dataset.to_torch("val")
    assert val["bottom"].dtype == torch.int64 and len(val["label"]) == 40
    # by URI as well, also with the key shortened as `twostage ls` shows it
    uri = encoded["first"]["codes"]["uri"]
    assert open_codes(uri).meta == dataset.meta
    assert open_codes(uri[: uri.rindex("/") + 13]).meta == dataset.meta
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert dataset.to_ray_dataset().count() == 800
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_rerun_is_cached_and_retraining_makes_new_shards(encoded, tmp_path):
    assert encoded["again"]["codes"]["status"] == "cached"
    old, new = encoded["first"]["codes"]["key"], encoded["retrained"]["codes"]["key"]
    assert encoded["retrained"]["vqvae"]["status"] == "ran"
    assert encoded["retrained"]["codes"]["status"] == "ran" and new != old
    store = encoded["store"]
    assert store.open("encode", old).verify() == []  # the old shard set is intact
    listing = json.loads(twostage("ls", "encode", "--json", cwd=encoded["tmp"], check=0).stdout)
    by_key = {row["key"]: row["inputs"]["autoencoder"] for row in listing}
    assert by_key == {
        old: encoded["first"]["vqvae"]["key"],
        new: encoded["retrained"]["vqvae"]["key"],
    }
    text = twostage("ls", "encode", cwd=encoded["tmp"], check=0).stdout
    assert f"autoencoder=train_autoencoder/{encoded['first']['vqvae']['key'][:12]}" in text
    # shards of one autoencoder are refused where another is expected
    with pytest.raises(CodeShardError, match=r"codes-00000.parquet: encoded with autoencoder"):
        open_codes(
            store.open("encode", old), expect_autoencoder=encoded["retrained"]["vqvae"]["key"]
        )
    assert open_codes(
        store.open("encode", new), expect_autoencoder=encoded["retrained"]["vqvae"]["key"]
    )
    with pytest.raises(CodeShardError, match=r"encoded with autoencoder"):  # prefixes too
        open_codes(
            store.open("encode", old), expect_autoencoder=encoded["retrained"]["vqvae"]["key"][:12]
        )
    assert open_codes(
        store.open("encode", new), expect_autoencoder=encoded["retrained"]["vqvae"]["key"][:12]
    )


def _copy_artifact(store: Store, key: str, tmp_path: Path) -> Store:
    import shutil

    target = Store(str(tmp_path / "copy"))
    shutil.copytree(store.dir_of("encode", key), Path(target.dir_of("encode", key)))
    return target


@pytest.mark.slow
def test_bit_flip_and_truncation_are_detected_naming_the_file(encoded, tmp_path):
    key = encoded["first"]["codes"]["key"]
    copy = _copy_artifact(encoded["store"], key, tmp_path)
    path = Path(copy.dir_of("encode", key)) / "codes-00000.parquet"
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x04
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptArtifactError, match=r"codes-00000.parquet: sha256 does not match"):
        open_codes(copy.open("encode", key))
    path.write_bytes(original[:-50])
    with pytest.raises(CorruptArtifactError, match=r"codes-00000.parquet: size .* does not match"):
        open_codes(copy.open("encode", key))


def test_demo_pipeline_includes_encode():
    raw = yaml.safe_load((REPO / "configs/mnist_vqvae2.yaml").read_text())
    steps = raw["steps"]
    encode = [s for s in steps.values() if s["stage"] == "encode"]
    assert len(encode) == 1 and encode[0]["inputs"]["autoencoder"] in steps


@pytest.mark.parametrize("change", ["drop codes_top", "codes_top as int32"])
def test_shard_whose_columns_miss_its_metadata_is_refused(tmp_path, change):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.formats.codes import CodeShardMeta, codes_table

    meta = CodeShardMeta(
        level_names=["bottom", "top"],
        grid_shapes={"bottom": [2, 2], "top": [1, 1]},
        codebook_sizes={"bottom": 8, "top": 8},
        autoencoder_key="a" * 64,
    )
    codes = {"bottom": np.zeros((2, 2, 2)), "top": np.ones((2, 1, 1))}
    table = codes_table(meta, [0, 1], [0, 1], ["train", "val"], codes)
    if change == "drop codes_top":
        table, expected = table.drop(["codes_top"]), "missing"
    else:
        top = pa.array([[1], [1]], pa.list_(pa.int32()))
        table, expected = table.set_column(4, "codes_top", top), "list<element: int32>"
    staged = tmp_path / "staged"
    staged.mkdir()
    pq.write_table(
        table.replace_schema_metadata(meta.arrow_schema().metadata), staged / "codes-00000.parquet"
    )
    artifact, _ = Store(str(tmp_path / "store")).commit("encode", "b" * 64, staged, {})
    with pytest.raises(CodeShardError) as info:
        open_codes(artifact)
    assert str(info.value).endswith(
        f"codes-00000.parquet: column codes_top is {expected}, expected list<item: uint16>"
    )


def test_prior_training_rows_keep_the_shards_uint16():
    """The rows train_prior reads (`to_ray_grids`) hold codes as uint16, as stored."""
    import pyarrow as pa

    from stages.formats.codes import _grid_rows

    batch = pa.table(
        {
            "label": pa.array([1, None, 2], pa.int16()),
            "split": ["train", "val", "train"],
            "codes_top": pa.array([[1, 2], [3, 4], [65535, 0]], pa.list_(pa.uint16())),
        }
    )
    rows = _grid_rows(batch, "train", {"top": 2})
    top = rows["top"].combine_chunks().to_numpy()
    assert top.dtype == np.uint16 and top.tolist() == [[1, 2], [65535, 0]]
    assert rows["label"].to_pylist() == [1, 2]


@pytest.mark.slow
def test_a_killed_encode_actor_leaves_each_image_once_in_the_shards(encoded):
    assert encoded["killed"] is not None, "no encode actor to kill while the step ran"
    codes = encoded["retrained"]["codes"]
    assert codes["status"] == "ran"  # Ray Data restarted the actor and retried its batches
    ids = open_codes(encoded["store"].open("encode", codes["key"])).to_numpy()["id"]
    table = read_image_table(encoded["store"].open("ingest", encoded["first"]["data"]["key"]))
    expected = table.ids[table.splits != "test"]
    assert len(ids) == len(np.unique(ids))  # no image twice
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))  # and none missing
