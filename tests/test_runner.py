"""The runner on a real local Ray instance, driven through the CLI as a user would."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import Store
from tests.helpers import (
    REPO,
    cli_env,
    run_json,
    twostage,
    write_yaml,
)

pytestmark = pytest.mark.slow

SMOKE = REPO / "configs" / "smoke.yaml"


def test_smoke_twice_second_run_is_cached_and_fast_then_ls_and_show(tmp_path):
    t0 = time.perf_counter()
    first = run_json(SMOKE, cwd=tmp_path)
    first_seconds = time.perf_counter() - t0
    assert first["status"] == "ok"
    assert [(s["name"], s["stage"], s["status"]) for s in first["stages"]] == [
        ("data", "ingest", "ran"),
        ("stats", "image_stats", "ran"),
    ]
    for s in first["stages"]:
        assert set(s) >= {"name", "stage", "status", "key", "seconds", "uri"}
        assert Path(s["uri"], "_MANIFEST.json").is_file()

    t0 = time.perf_counter()
    second = run_json(SMOKE, cwd=tmp_path)
    second_seconds = time.perf_counter() - t0
    assert [s["status"] for s in second["stages"]] == ["cached", "cached"]
    assert [s["key"] for s in second["stages"]] == [s["key"] for s in first["stages"]]
    assert second_seconds < first_seconds / 10, (first_seconds, second_seconds)

    run_dir = Path(first["run_dir"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["steps"]["data"]["key"] == first["stages"][0]["key"]
    assert record["steps"]["data"]["config"]["image_size"] == 32
    assert {"twostage", "python", "ray"} <= set(record["versions"])
    assert (run_dir / "class_means.png").stat().st_size > 1000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["images"] == 7000

    # ls and show on that store
    listing = twostage("ls", cwd=tmp_path, check=0).stdout
    assert "ingest" in listing and "image_stats" in listing
    (row,) = json.loads(twostage("ls", "image_stats", "--json", cwd=tmp_path, check=0).stdout)
    assert row["inputs"] == {"images": first["stages"][0]["key"]}
    shown = json.loads(twostage("show", row["key"][:8], cwd=tmp_path, check=0).stdout)
    assert shown["stage"] == "image_stats" and "stats.json" in shown["files"]
    missing = twostage("show", "ffffffff", cwd=tmp_path, check=1)
    assert "no artifact with key 'ffffffff'" in missing.stderr


def test_two_runs_at_once_leave_one_intact_artifact_per_key(tmp_path):
    config = write_yaml(
        tmp_path / "race.yaml",
        f"""
name: race
store: {tmp_path / "store"}
steps:
  data: {{stage: ingest, source: {{kind: embedded}}, limit: 2000}}
  slow: {{stage: tests.plugin_stages.sleepy, seconds: 2, inputs: {{after: data}}}}
  stats: {{stage: image_stats, inputs: {{images: data}}}}
""",
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--json"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    summaries = [json.loads(o[0]) for o in outs]
    assert [s["key"] for s in summaries[0]["stages"]] == [s["key"] for s in summaries[1]["stages"]]
    store = Store(str(tmp_path / "store"))
    for stage in ("ingest", "tests.plugin_stages.sleepy", "image_stats"):
        committed = store.list(stage)
        assert len(committed) == 1, stage
        assert committed[0].verify() == []
        key_dir = Path(store.dir_of(stage, committed[0].key))
        on_disk = {p.relative_to(key_dir).as_posix() for p in key_dir.rglob("*") if p.is_file()}
        assert on_disk == set(committed[0].files) | {"_MANIFEST.json"}
    assert not list((tmp_path / "store" / ".staging").iterdir())


def test_killed_worker_is_retried_and_the_stage_completes(tmp_path):
    markers = tmp_path / "attempts"
    config = write_yaml(
        tmp_path / "kill.yaml",
        f"""
name: kill
steps:
  slow: {{stage: tests.plugin_stages.sleepy, seconds: 4, marker_dir: {markers}, max_retries: 2}}
""",
    )
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--json"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (markers.exists() and any(markers.iterdir())):
        time.sleep(0.1)
    (first,) = list(markers.iterdir())
    victim = int(first.name.split("-")[1])
    os.kill(victim, signal.SIGKILL)  # the Ray worker process running the stage
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out, err[-3000:]
    (step,) = json.loads(out)["stages"]
    assert step["status"] == "ran"
    attempts = sorted(p.name for p in markers.iterdir())
    assert len(attempts) == 2 and f"attempt-{victim}" in attempts
    assert Store(str(tmp_path / "artifacts")).open(step["stage"], step["key"]).verify() == []


def test_failed_stage_stops_its_dependents_and_keeps_others(tmp_path):
    config = write_yaml(
        tmp_path / "fail.yaml",
        """
name: fail
steps:
  good: {stage: tests.plugin_stages.sleepy, seconds: 0.1, tag: good}
  bad: {stage: tests.plugin_stages.sleepy, seconds: 0.1, fail: true}
  after_bad: {stage: tests.plugin_stages.sleepy, seconds: 0.1, inputs: {after: bad}}
  bad_data: {stage: tests.plugin_stages.sleepy, seconds: 0.1, fail_in_ray_data: true}
  greedy: {stage: tests.plugin_stages.sleepy, seconds: 0.1, resources: {custom: {pod: 2}}}
""",
    )
    proc = twostage("run", config, "--json", cwd=tmp_path, check=1)
    summary = json.loads(proc.stdout)
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["good"]["status"] == "ran"
    assert stages["bad"]["status"] == "failed"
    assert stages["bad"]["error"] == "ValueError: sleepy was told to fail"
    # an error inside Ray Data is the user's error in one line, not Ray's wrapper
    assert stages["bad_data"]["error"] == "ValueError: sleepy's data was told to fail"
    # a Ray instance started here never grows: a step that asks for more fails, not waits
    assert stages["greedy"]["error"].startswith(
        "resources: asks for {CPU: 1, pod: 2}, more than any node of this Ray instance has"
        " (1 node(s): {CPU: "
    )
    # the terminal shows no traceback; the run directory keeps it
    assert "Traceback" not in proc.stderr
    kept = Path(summary["run_dir"]) / "bad.traceback.txt"
    assert 'raise ValueError("sleepy was told to fail")' in kept.read_text()
    assert stages["after_bad"]["status"] == "failed"
    assert "input step 'bad' failed" in stages["after_bad"]["error"]
    store = Store(str(tmp_path / "artifacts"))
    assert store.get(stages["bad"]["stage"], stages["bad"]["key"]) is None
    # the good step is reused on the rerun; the failed one is tried again (and fails again)
    again = json.loads(twostage("run", config, "--json", cwd=tmp_path, check=1).stdout)
    assert {s["name"]: s["status"] for s in again["stages"]} == {
        "good": "cached",
        "bad": "failed",
        "after_bad": "failed",
        "bad_data": "failed",
        "greedy": "failed",
    }


def test_a_full_disk_fails_ingest_in_one_line_keeps_the_store_and_the_rerun_goes_on(tmp_path):
    """The store on a small filesystem that fills up during an image folder's ingest: the
    step fails in one line that names the file and says what to do, the artifact committed
    before stays intact, and once there is space the rerun decodes only the parts not done."""
    import numpy as np
    from PIL import Image

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs (the full disk) needs root")
    try:
        images = tmp_path / "images"
        rng = np.random.default_rng(0)
        for label in ("a", "b"):
            (images / label).mkdir(parents=True)
            for i in range(300):  # 1.8 MB of pixels in 10 parts
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(images / label / f"{i}.png")
        store_dir = disk / "store"
        store = Store(str(store_dir))
        with store.staging("older", "0" * 64) as out:  # an artifact stored before
            (out / "weights.bin").write_bytes(bytes(range(256)) * 64)
            store.commit("older", "0" * 64, out, {"metrics": {}})
        config = write_yaml(
            tmp_path / "big.yaml",
            f"name: full\nstore: {store_dir}\nsteps:\n"
            f"  big: {{stage: ingest, source: {{kind: image_folder, path: {images}}}}}\n",
        )
        # the disk full but for 1 MB: room for a few parts, not the table
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - 2**20))

        proc = twostage("run", config, "--json", cwd=tmp_path, check=1)
        (step,) = json.loads(proc.stdout)["stages"]
        assert step["status"] == "failed"
        error = step["error"]
        # the file is named where the failing write knows it (the table's files)
        assert error.startswith("OSError: [Errno 28] No space left on device")
        assert "free space and rerun" in error
        assert "Traceback" not in proc.stderr and "Unhandled error" not in proc.stderr
        assert store.open("older", "0" * 64).verify() == []
        assert store.get("ingest", step["key"]) is None
        assert not list((store_dir / ".staging").iterdir())
        finished = len(list(store_dir.glob("_scratch/ingest/*/parts/*.json")))
        assert finished >= 1

        (disk / "filler").unlink()
        (step,) = run_json(config, cwd=tmp_path)["stages"]
        assert step["status"] == "resumed"
        artifact = store.open("ingest", step["key"])
        assert artifact.metrics["resumed_parts"] == finished
        assert artifact.metrics["images"] == 600 and artifact.verify() == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
