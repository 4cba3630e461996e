"""The cluster launcher config and the submit script (a real cluster: test_real_cluster.py)."""

import copy
import json
import os
import subprocess
import sys

import yaml

from tests.helpers import REPO, cli_env


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
