"""The artifact store on S3: an S3-compatible server (moto) on loopback, started by the test."""

import json

import pytest

from pipeline.store import CorruptArtifactError, Store
from stages.formats.images import read_image_table
from tests.helpers import CREDENTIALS, REPO, cli_env, run_json, twostage

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
