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
