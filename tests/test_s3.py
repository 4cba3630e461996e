"""The artifact store on S3: an S3-compatible server (moto) on loopback, started by the test."""

import json
import tempfile
from pathlib import Path

import pytest

from pipeline.store import CorruptArtifactError, Store
from stages.formats.images import read_image_table
from tests.helpers import (
    CREDENTIALS,
    REPO,
    cli_env,
    noise_folder_with_a_late_broken_file,
    run_json,
    twostage,
)

pytestmark = pytest.mark.slow


def test_pipeline_on_s3_store_writes_reads_and_caches(s3_server, aws_env, tmp_path):
    env = cli_env(**CREDENTIALS)
    args = (
        REPO / "configs/smoke.yaml",
        "--store",
        s3_server["uri"],
        "--set",
        "steps.data.limit=400",
    )
    first = run_json(*args, cwd=tmp_path, env=env)
    assert first["status"] == "ok", first
    assert [s["status"] for s in first["stages"]] == ["ran", "ran"]
    assert first["stages"][0]["uri"].startswith("s3://twostage/runs-test/ingest/")
    assert not (tmp_path / "artifacts").exists()  # nothing went to the local default

    second = run_json(*args, cwd=tmp_path, env=env)
    assert [s["status"] for s in second["stages"]] == ["cached", "cached"]

    # the objects are really in the bucket, manifest beside the attempt prefix
    listed = s3_server["client"].list_objects_v2(Bucket="twostage", Prefix="runs-test/ingest/")
    names = [o["Key"] for o in listed["Contents"]]
    assert any(n.endswith("/_MANIFEST.json") for n in names)
    assert any(n.endswith("/images-train-00000.parquet") for n in names)

    store = Store(s3_server["uri"])
    (ingest,) = store.list("ingest")
    table = read_image_table(ingest)
    assert len(table) == 800  # 400 train pool + 400 test
    out = twostage("verify", "--all", "--store", s3_server["uri"], cwd=tmp_path, env=env, check=0)
    assert out.stdout.count("ok ") == 2

    # corrupt one object in the bucket: verify and readers name it
    manifest = ingest.manifest
    key = f"runs-test/ingest/{ingest.key}/{manifest['data_dir']}/images-train-00000.parquet"
    body = bytearray(s3_server["client"].get_object(Bucket="twostage", Key=key)["Body"].read())
    body[len(body) // 3] ^= 0x10
    s3_server["client"].put_object(Bucket="twostage", Key=key, Body=bytes(body))
    bad = twostage(
        "verify", ingest.key[:8], "--store", s3_server["uri"], cwd=tmp_path, env=env, check=1
    )
    assert "images-train-00000.parquet" in bad.stdout
    with pytest.raises(CorruptArtifactError, match="images-train-00000.parquet"):
        read_image_table(store.open("ingest", ingest.key))
    listing = json.loads(
        twostage("ls", "--json", "--store", s3_server["uri"], cwd=tmp_path, env=env, check=0).stdout
    )
    assert {row["stage"] for row in listing} == {"ingest", "image_stats"}


def test_credentials_in_the_store_uri_are_never_written(s3_server, tmp_path):
    secret = "Zq7SECRETvalue9"  # moto takes any credentials; these are the only ones given
    uri = s3_server["uri"].replace("s3://", f"s3://testing:{secret}@").replace("runs-test", "creds")
    env = {k: v for k, v in cli_env().items() if not k.startswith("AWS_")}
    env.update(AWS_DEFAULT_REGION="us-east-1", TWOSTAGE_CACHE=str(tmp_path / "cache"))
    config = tmp_path / "p.yaml"
    config.write_text(
        "name: creds\ntracking: tensorboard\nsteps:\n"
        "  data: {stage: ingest, source: {kind: embedded}, image_size: 32, limit: 200}\n"
        "  stats: {stage: image_stats, inputs: {images: data}}\n"
    )
    proc = twostage("run", config, "--store", uri, "--json", cwd=tmp_path, env=env, check=0)
    assert {s["status"] for s in json.loads(proc.stdout)["stages"]} == {"ran"}  # it worked
    in_process = tmp_path / "bad.yaml"  # refused with a message naming the store
    in_process.write_text(
        "name: creds\nsteps:\n  data: {stage: ingest, source: {kind: embedded}, image_size: 32}\n"
        "  ae: {stage: train_autoencoder, inputs: {images: data}, train: {workers: 0},\n"
        "       model: {in_channels: 1}}\n"
    )
    refused = twostage("run", in_process, "--store", uri, cwd=tmp_path, env=env, check=2)
    assert "s3://***@twostage/creds" in refused.stderr
    shown = twostage("ls", "--store", uri, cwd=tmp_path, env=env, check=0)
    for out in (proc, refused, shown):
        assert secret not in out.stdout + out.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".yaml"]
    assert any(p.name == "run.json" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    client = s3_server["client"]
    objects = client.list_objects_v2(Bucket="twostage", Prefix="creds/")["Contents"]
    assert len(objects) > 4
    for obj in objects:
        body = client.get_object(Bucket="twostage", Key=obj["Key"])["Body"].read()
        assert secret.encode() not in body, obj["Key"]


def test_two_writers_of_one_key_on_s3_one_wins_the_other_reads_its_artifact(
    s3_server, aws_env, tmp_path, monkeypatch
):
    import threading

    import pipeline.store as store_module

    uri = s3_server["uri"].replace("runs-test", "race")
    barrier = threading.Barrier(2, timeout=60)
    put = store_module._put_if_absent

    def at_the_barrier(*args):  # both have uploaded and found no manifest: now both put one
        barrier.wait()
        return put(*args)

    monkeypatch.setattr(store_module, "_put_if_absent", at_the_barrier)
    results = {}

    def commit(writer: str) -> None:
        store = Store(uri)
        staged = tmp_path / writer
        staged.mkdir()
        (staged / "weights.bin").write_bytes(writer.encode() * 1000)
        results[writer] = store.commit("demo", "f" * 64, staged, {"metrics": {"by": writer}})

    threads = [threading.Thread(target=commit, args=(w,)) for w in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(won for _, won in results.values()) == [False, True]  # exactly one wins
    winner = next(w for w, (_, won) in results.items() if won)
    for artifact, _ in results.values():  # the loser holds the winner's artifact
        assert artifact.metrics == {"by": winner}
        assert artifact.read_bytes("weights.bin") == winner.encode() * 1000
    stored = Store(uri).open("demo", "f" * 64)
    assert stored.metrics == {"by": winner} and stored.verify() == []
    listed = s3_server["client"].list_objects_v2(Bucket="twostage", Prefix="race/demo/")
    attempts = {o["Key"].split("/")[3] for o in listed["Contents"]} - {"_MANIFEST.json", ""}
    assert attempts == {stored.manifest["data_dir"]}  # the loser's upload is gone


def test_priors_of_weights_that_changed_under_their_autoencoder_key_are_refused(s3_server, aws_env):
    """What a lost race could do before commits were atomic: another writer's manifest for the
    autoencoder's key names other weights. Priors record the weights their codes came from."""
    from pipeline.store import MANIFEST
    from stages.formats.codes import CodeShardError
    from stages.sampling.priors import check_prior_of, weights_of

    store = Store(s3_server["uri"].replace("runs-test", "lineage"))

    def commit(stage: str, key: str, files: dict, metrics: dict):
        staged = Path(tempfile.mkdtemp())
        for name, data in files.items():
            (staged / name).write_bytes(data)
        return store.commit(stage, key, staged, {"metrics": metrics})[0]

    autoencoder = commit("train_autoencoder", "a" * 64, {"model.safetensors": b"one"}, {})
    prior = commit(
        "train_prior",
        "b" * 64,
        {"model.safetensors": b"prior"},
        {"autoencoder_key": "a" * 64, "autoencoder_weights": weights_of(autoencoder)},
    )
    check_prior_of(prior, autoencoder, "the decoder")  # the weights it was made from
    other = commit("train_autoencoder", "c" * 64, {"model.safetensors": b"two"}, {})
    manifest = {**other.manifest, "key": "a" * 64}  # the other writer's upload and manifest
    client = s3_server["client"]
    client.copy_object(
        Bucket="twostage",
        CopySource=f"twostage/lineage/train_autoencoder/{'c' * 64}/{other.manifest['data_dir']}"
        "/model.safetensors",
        Key=f"lineage/train_autoencoder/{'a' * 64}/{other.manifest['data_dir']}/model.safetensors",
    )
    client.put_object(
        Bucket="twostage",
        Key=f"lineage/train_autoencoder/{'a' * 64}/{MANIFEST}",
        Body=json.dumps(manifest).encode(),
    )
    changed = store.open("train_autoencoder", "a" * 64)
    assert changed.verify() == []  # intact, but not the weights the prior's codes came from
    with pytest.raises(CodeShardError, match="trained on codes of other weights of autoencoder"):
        check_prior_of(prior, changed, "the decoder")


def test_an_image_folder_ingest_on_s3_resumes_from_the_parts_in_its_scratch(
    s3_server, tmp_path, ray_local
):
    """On an S3 store the decode tasks upload their parts into the step's scratch in the
    bucket, and the step's node keeps only the small files; a run stopped part-way (strict,
    on a broken file) goes on from there, under the new key that fixing the file gives (its
    parts copied inside the bucket); the commit copies the parts into the table inside the
    store. The files are those of a local store, and the new key's scratch goes once
    committed."""
    import numpy as np
    from PIL import Image

    from stages import ingest

    root = tmp_path / "images"
    rng, bad = noise_folder_with_a_late_broken_file(root)
    source = ingest.Source(kind="image_folder", path=str(root))
    config = ingest.Config(source=source, readers=2, strict=True)
    # credentials in the URI: the Ray workers of this test were started without them
    store = Store(s3_server["uri"].replace("s3://", "s3://testing:testing@"))
    key = "5" * 64
    with store.staging("ingest", key) as out, pytest.raises(ValueError, match="unreadable"):
        ingest.run(config, {}, out, store.scratch_uri("ingest", key))

    def scratch(key=key) -> list[str]:
        prefix = f"runs-test/_scratch/ingest/{key}/parts/"
        listed = s3_server["client"].list_objects_v2(Bucket="twostage", Prefix=prefix)
        return [o["Key"][len(prefix) :] for o in listed.get("Contents", [])]

    records = [name for name in scratch() if name.endswith(".json")]
    assert len(records) >= 3 and sum(n.endswith("-train.parquet") for n in scratch()) >= 3

    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / bad)
    fixed = "6" * 64  # the folder's fingerprint changed with the file, and so the key
    with store.staging("ingest", fixed) as out:
        metrics = ingest.run(config, {}, out, store.scratch_uri("ingest", fixed))
        assert not list(out.glob("images-train-*"))  # in the bucket, not here
        artifact, _ = store.commit("ingest", fixed, out, {"metrics": metrics})
    store.remove_scratch("ingest", fixed)
    assert metrics["resumed_parts"] == len(records) and metrics["images"] == 301
    assert artifact.verify() == [] and scratch(fixed) == [] and len(scratch()) > len(records)

    local = Store(str(tmp_path / "local"))
    with local.staging("ingest", key) as out:
        fresh_metrics = ingest.run(config, {}, out, local.scratch_uri("ingest", key))
        fresh, _ = local.commit("ingest", key, out, {"metrics": fresh_metrics})
    assert {n: e["sha256"] for n, e in artifact.files.items()} == {
        n: e["sha256"] for n, e in fresh.files.items()
    }
    assert metrics["bytes"] == fresh_metrics["bytes"]
    assert read_image_table(artifact).images.sum() == read_image_table(fresh).images.sum()
