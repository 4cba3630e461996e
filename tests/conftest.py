"""Fixtures shared by several test files. The builders they share are in helpers.py."""

import socket
import sys
from pathlib import Path

import pytest

from tests.helpers import CREDENTIALS, SHARED_MNIST, TWO_STAGE_PIPELINE, run_json, write_yaml


@pytest.fixture
def shared_mnist() -> Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/data/mnist is not available")
    return SHARED_MNIST


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_behind():
    """Shuts down the Ray instance a direct call of a stage started in this process (one that
    streams through Ray Data), so the next module starts from none."""
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of this process for tests that call Ray Data directly (a new one, never a
    `ray start` cluster of another test), shut down after the module."""
    import ray

    ray.shutdown()  # one that an earlier test's direct call of a stage started
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny two-stage pipeline (helpers.TWO_STAGE_PIPELINE: MNIST, the tiny VQ-VAE-2, its
    codes, a prior per level, a classifier, samples, evaluation, the report), run once per
    session through the CLI on local Ray in a fresh store.

    Returns:
        The run's directory (its store is ``artifacts`` there) and the run's JSON summary.
        Both are shared: a test that runs further pipelines in that store works on its own
        copy (helpers.copy_run).
    """
    root = tmp_path_factory.mktemp("two_stage_run")
    config = write_yaml(root / "pipeline.yaml", TWO_STAGE_PIPELINE)
    summary = run_json(config, cwd=root, timeout=600)
    assert summary["status"] == "ok", summary
    return root, summary


@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto) on loopback with the bucket ``twostage``."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="twostage")
    yield {
        "port": port,
        "client": client,
        "uri": f"s3://twostage/runs-test?endpoint_override=127.0.0.1:{port}&scheme=http",
    }
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
