"""Several Ray nodes (ray.cluster_utils.Cluster), the cluster launcher config and submit script."""

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.spec import parse_pipeline
from tests.helpers import REPO, cli_env


@pytest.fixture
def two_node_cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # node processes import the test stages
    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_stages_run_on_more_than_one_node(two_node_cluster, tmp_path):
    import ray

    from pipeline.runner import run_pipeline

    raw = {
        "name": "multinode",
        "store": str(tmp_path / "store"),
        "runs_dir": str(tmp_path / "runs"),
        "steps": {
            "data": {"stage": "ingest", "limit": 500, "resources": {"custom": {"node_a": 1}}},
            "stats": {
                "stage": "image_stats",
                "inputs": {"images": "data"},
                "resources": {"custom": {"node_b": 1}},
            },
            "a": {
                "stage": "tests.plugin_stages.sleepy",
                "seconds": 1,
                "tag": "a",
                "resources": {"custom": {"node_a": 1}},
            },
            "b": {
                "stage": "tests.plugin_stages.sleepy",
                "seconds": 1,
                "tag": "b",
                "resources": {"custom": {"node_b": 1}},
            },
        },
    }
    result = run_pipeline(parse_pipeline(raw))
    assert result.ok, [s.error for s in result.steps]
    nodes = {s.name: s.node for s in result.steps}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    assert nodes["data"] == nodes["a"] and nodes["stats"] == nodes["b"]
    assert nodes["a"] != nodes["b"] and {nodes["a"], nodes["b"]} == alive
    assert all(s.status == "ran" for s in result.steps)
    assert ray.is_initialized()  # the runner leaves a Ray it did not start running


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(schema_path) as f:
        jsonschema.validate(config, json.load(f))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for name, t in types.items() if name != head)
    assert any("pip install -e ~/twostage" in c for c in prepared["setup_commands"])
    assert prepared["file_mounts"]["~/twostage"] == "."


def test_submit_script_hands_over_to_twostage_run(tmp_path):
    # from another directory, with a config path relative to the project (as on the head node)
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/submit.py"),
            "configs/smoke.yaml",
            "--set",
            "steps.data.image_size=3",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "steps.data.image_size: must be between 4 and 4096" in bad.stderr
    usage = subprocess.run(
        [sys.executable, str(REPO / "scripts/submit.py")],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert usage.returncode == 2 and "usage" in usage.stderr
