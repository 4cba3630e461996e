"""A real Ray cluster on this machine, as a user starts one: `ray start --head` and a second
`ray start` node, separate processes, token authentication on, a custom resource (`gpu_like`)
on the second node only, and one shared store. The pipeline runs against it with `twostage
run` (RAY_ADDRESS), with `ray job submit`, and through `scripts/submit.py` as `ray submit`
calls it; a training step is killed with its node and recovers on a node started again, and
with the head node, on a new cluster.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    cli_env,
    ray_train_pipeline,
    registered_checkpoints,
    twostage,
    write_yaml,
)

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class RealCluster:
    address: str  # GCS, for RAY_ADDRESS
    dashboard: str  # http://..., for ray job submit
    env: dict  # token authentication on, with the cluster's token
    root: Path  # every node's temp dir lies under it

    def start_worker(self, name: str = "worker") -> None:
        """Starts a `ray start` node with 2 CPUs and the custom resource `gpu_like`."""
        _ray_start(
            [f"--address={self.address}", '--resources={"gpu_like": 1}'],
            self.root / name,
            self.env,
        )

    def stop_worker(self, name: str = "worker") -> None:
        """Kills every process of one node (its raylet and everything it started)."""
        _kill_under(self.root / name)

    def nodes(self) -> list[dict]:
        out = subprocess.run(
            [sys.executable, "-c", _NODES],
            env={**self.env, "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


_NODES = (
    "import json, ray; ray.init(logging_level='ERROR'); "
    "print(json.dumps([{'id': n['NodeID'], **n['Resources']} for n in ray.nodes() if n['Alive']]))"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], temp_dir: Path, env: dict) -> None:
    temp_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [RAY, "start", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _kill_under(root: Path) -> None:
    """SIGKILLs the processes whose command line names `root` (a node's temp dir): its GCS,
    raylet, log monitor and dashboard; their workers die with the raylet. Unlike `ray stop`,
    which stops every Ray process of the user, this stops one node."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(root) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def real_cluster():
    root = Path(tempfile.mkdtemp(prefix="ts-cluster-"))  # short: Ray's socket paths
    port, dashboard = _free_port(), _free_port()
    env = cli_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        # a lost node is declared dead after 3 missed health checks a second apart (Ray's
        # default: 5, 3 s apart), so the node-loss test waits seconds, not tens of seconds
        RAY_health_check_period_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    env.pop("RAY_ADDRESS", None)
    cluster = RealCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, root)
    try:
        _ray_start(
            [
                "--head",
                f"--port={port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                '--resources={"head_like": 1}',
            ],
            root / "head",
            env,
        )
        cluster.start_worker()
        yield cluster
    finally:
        for name in sorted(p.name for p in root.iterdir() if p.is_dir()):
            if name != "head":
                _kill_under(root / name)
        _kill_under(root / "head")


PIPELINE = """
name: cluster
store: {store}
ray: {{infeasible_timeout_s: 20}}
steps:
  data: {{stage: ingest, source: {{kind: embedded}}, image_size: 32, limit: 400}}
  vqvae:
    stage: train_autoencoder
    inputs: {{images: data}}
    resources: {{custom: {{gpu_like: 1}}}}
    model: {{family: vqvae2, in_channels: 1, channels: 16, res_channels: 8, codebook_size: 16}}
    train: {{steps: {steps}, batch_size: 16, checkpoint_every: 20, log_every: 10, workers: 2,
             cpus_per_worker: 1}}   # two DDP workers
  codes:
    stage: encode
    inputs: {{images: data, autoencoder: vqvae}}
    resources: {{custom: {{gpu_like: 1}}}}
  prior:
    stage: train_prior
    inputs: {{codes: codes}}
    level: top
    model: {{hidden_size: 32, layers: 1, heads: 2}}
    train: {{steps: 20, batch_size: 16, checkpoint_every: 20, log_every: 10, workers: 0}}
"""


def _pipeline(path: Path, store: Path, steps: int = 40) -> Path:
    return write_yaml(path, PIPELINE.format(store=store, steps=steps))


def _run(config: Path, cluster: RealCluster, cwd: Path, *extra, timeout=600):
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    return twostage("run", config, "--json", *extra, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def two_node_run(real_cluster, tmp_path_factory):
    """The shortened demo pipeline, run once on the two nodes; its store is reused below."""
    root = tmp_path_factory.mktemp("two_node_run")
    nodes = real_cluster.nodes()
    config = _pipeline(root / "p.yaml", root / "store")
    start = time.time()
    proc = _run(config, real_cluster, root)
    seconds = time.time() - start
    print(f"two-node cluster run: {seconds:.1f} s")
    return nodes, config, proc


def test_pipeline_runs_on_a_two_node_cluster_with_steps_pinned_to_the_second_node(two_node_run):
    nodes, _, proc = two_node_run
    assert len(nodes) == 2 and sum("gpu_like" in n for n in nodes) == 1
    summary = json.loads(proc.stdout)
    steps = {s["name"]: s for s in summary["stages"]}
    assert summary["status"] == "ok", steps
    assert {s["status"] for s in steps.values()} == {"ran"}
    # pinned by resource: training and encode ran on the second node
    second = next(n["id"] for n in nodes if "gpu_like" in n)
    assert steps["vqvae"]["node"] == steps["codes"]["node"] == second
    # every worker line once (each node has its own temp dir, so one log monitor tails it)
    lines = [ln for ln in proc.stderr.splitlines() if "train_autoencoder: step 20/40" in ln]
    assert len(lines) == 1, lines
    # two Ray Train DDP workers trained it: rank 0 checkpointed, logged and reported
    artifact = Path(steps["vqvae"]["uri"])
    final = json.loads((artifact / "_MANIFEST.json").read_text())
    assert set(final["files"]) == {
        "config.json",
        "model.safetensors",
        "metrics.json",
        "reconstructions.png",
    }
    metrics = final["metrics"]
    assert metrics["workers"] == 2 and metrics["step"] == 40
    assert 0 < metrics["val_mse"] < 1 and metrics["val_psnr"] > 0
    assert {"val_usage/bottom", "val_usage/top", "val_perplexity/top"} <= set(metrics)
    history = json.loads((artifact / "metrics.json").read_text())["history"]
    assert [row["step"] for row in history] == [10, 20, 30, 40]
    assert {"loss", "recon", "commitment", "perplexity/bottom", "usage/top", "lr"} <= set(
        history[0]
    )
    scratch = Path(summary["run_dir"]).parent.parent / "store" / "_scratch" / "train_autoencoder"
    assert not (scratch / steps["vqvae"]["key"]).exists()  # removed once committed


UNPLACEABLE = """
name: unplaceable
store: {store}
ray: {{infeasible_timeout_s: 8}}
steps:
  data: {{stage: ingest, source: {{kind: embedded}}, image_size: 32, limit: 200}}
  big:   # a worker of 64 CPUs, on 2-CPU nodes (steps differ: one key would run once)
    stage: train_autoencoder
    inputs: {{images: data}}
    model: {{family: vqvae2, in_channels: 1, channels: 16, res_channels: 8, codebook_size: 16}}
    train: {{steps: 3, batch_size: 16, cpus_per_worker: 64}}
  cuda:  # a GPU worker, on a cluster without GPUs
    stage: train_autoencoder
    inputs: {{images: data}}
    model: {{family: vqvae2, in_channels: 1, channels: 16, res_channels: 8, codebook_size: 16}}
    train: {{steps: 4, batch_size: 16, device: cuda}}
  small:
    stage: train_autoencoder
    inputs: {{images: data}}
    model: {{family: vqvae2, in_channels: 1, channels: 16, res_channels: 8, codebook_size: 16}}
    train: {{steps: 2, batch_size: 16, workers: 0}}
  codes: {{stage: encode, inputs: {{images: data, autoencoder: small}}, gpus_per_actor: 1}}
"""


def test_requests_no_node_can_hold_fail_within_the_timeout(real_cluster, tmp_path):
    config = write_yaml(tmp_path / "p.yaml", UNPLACEABLE.format(store=tmp_path / "store"))
    start = time.time()
    proc = _run(config, real_cluster, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads(proc.stdout)["stages"]}
    assert steps["data"]["status"] == steps["small"]["status"] == "ran"  # kept
    expected = {
        "big": "its workers ask for {CPU: 64} each, more than any node has (2 node(s): ",
        "cuda": "its workers ask for {CPU: 1, GPU: 1} each, more than any node has (2 node(s): ",
        "codes": "its workers ask for {GPU: 1} each, more than any node has (2 node(s): ",
    }
    for name, start_of_error in expected.items():
        error = steps[name].get("error", "")
        assert steps[name]["status"] == "failed" and error.startswith(start_of_error), steps[name]
        assert "ray.infeasible_timeout_s (8 s)" in error and "\n" not in error
    assert time.time() - start < 2 * 8 + 90
    assert (tmp_path / "store" / "ingest").is_dir()


def test_ray_job_submit_and_ray_submit_entry_point(real_cluster, two_node_run):
    """`ray job submit` trains one more prior on the two-node run's stored codes; the
    `ray submit` entry point then finds the whole pipeline stored."""
    _, config, _ = two_node_run
    job = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            f"--address={real_cluster.dashboard}",
            f"--runtime-env-json={json.dumps({'env_vars': {'PYTHONPATH': str(REPO)}})}",
            "--",
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(config),
            "--set",
            "steps.prior.train.steps=10",
            "--json",
        ],
        env=real_cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    assert '"status": "ran"' in job.stdout and len(list(_stored(config, "train_prior"))) == 2
    # scripts/submit.py, as `ray submit` runs it on the head: joins the cluster (RAY_ADDRESS)
    # and finds every step of the pipeline stored
    env = {**real_cluster.env, "RAY_ADDRESS": real_cluster.address}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "submit.py"), str(config), "--json"],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {s["status"] for s in json.loads(proc.stdout)["stages"]} == {"cached"}


def _stored(config: Path, stage: str):
    return (p for p in (config.parent / "store" / stage).iterdir() if not p.name.startswith("."))


def test_a_lost_training_node_fails_the_step_in_one_line_and_the_rerun_resumes(
    real_cluster, tmp_path
):
    store = tmp_path / "store"
    # the step's task stays on the head, its Ray Train worker goes to the second node
    pipeline = ray_train_pipeline(store, "{custom: {head_like: 1}}", "{gpu_like: 1}")
    config = write_yaml(tmp_path / "p.yaml", pipeline)
    env = {**real_cluster.env, "RAY_ADDRESS": real_cluster.address}
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), "--json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    snapshot = str(
        store / "_scratch/train_autoencoder/*/ray_train/checkpoint_manager_snapshot.json"
    )
    deadline = time.time() + 300
    while len(registered_checkpoints(snapshot).get("checkpoint_results", [])) < 2:
        assert run.poll() is None and time.time() < deadline, "no 2 checkpoints before the kill"
        time.sleep(0.2)
    real_cluster.stop_worker()  # the node of the training worker, after two checkpoints
    out, err = run.communicate(timeout=300)
    assert run.returncode == 1, err[-3000:]
    step = {s["name"]: s for s in json.loads(out)["stages"]}["vqvae"]
    assert step["status"] == "failed"
    assert "training failed: " in step["error"] and "\n" not in step["error"]
    assert "rerun to resume from the last checkpoint" in step["error"]
    assert not list((store / "train_autoencoder").glob("[!.]*"))  # nothing committed

    # cut the newest checkpoint short, as a crash while writing it could: the rerun resumes
    # from the one before it (and loses at most one checkpoint interval)
    *_, before, newest = registered_checkpoints(snapshot)["checkpoint_results"]
    (ray_train,) = (store / "_scratch/train_autoencoder").glob("*/ray_train")
    weights = ray_train / newest["checkpoint_dir_name"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    real_cluster.start_worker("worker2")  # a node with gpu_like again
    rerun = twostage("run", config, "--json", cwd=tmp_path, env=env, timeout=600)
    steps = {s["name"]: s for s in json.loads(rerun.stdout)["stages"]}
    assert steps["data"]["status"] == "cached"
    assert steps["vqvae"]["status"] == "resumed", rerun.stderr[-3000:]
    metrics = json.loads(Path(steps["vqvae"]["uri"], "_MANIFEST.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == before["metrics"]["step"]
    # Ray Train's snapshot lags its training by seconds: 240 steps leave room for the kill
    assert 20 <= metrics["resumed_from_step"] < newest["metrics"]["step"] < 240
    assert metrics["step"] == 240
    history = json.loads(Path(steps["vqvae"]["uri"], "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == list(range(20, 241, 20))  # no step trained twice


def test_a_lost_head_node_ends_the_run_and_a_new_cluster_resumes_from_the_shared_store(
    tmp_path,
):
    """The head node of a two-node cluster dies while a Ray Train worker trains: the driver
    ends (Ray's own message: it cannot reach the GCS), and the same pipeline on a new cluster
    goes on from the last checkpoint in the store, with the ingest it had committed. (A driver
    killed outright, with the Ray instance it started, leaves the store the same way.)"""
    root = Path(tempfile.mkdtemp(prefix="ts-head-"))  # short: Ray's socket paths
    env = cli_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        # the driver and the nodes give up on a lost GCS after 3 s (Ray's default: 60 s)
        RAY_gcs_rpc_server_reconnect_timeout_s="3",
    )
    env.pop("RAY_ADDRESS", None)
    store = tmp_path / "store"
    config = write_yaml(tmp_path / "p.yaml", ray_train_pipeline(store))
    snapshot = str(
        store / "_scratch/train_autoencoder/*/ray_train/checkpoint_manager_snapshot.json"
    )
    try:
        port = _free_port()
        _ray_start(["--head", f"--port={port}", "--include-dashboard=false"], root / "head", env)
        _ray_start([f"--address=127.0.0.1:{port}"], root / "worker", env)
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(config), "--json"],
            cwd=tmp_path,
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while len(registered_checkpoints(snapshot).get("checkpoint_results", [])) < 2:
            assert run.poll() is None and time.time() < deadline, "no 2 checkpoints to kill at"
            time.sleep(0.1)
        _kill_under(root / "head")
        _, err = run.communicate(timeout=120)
        assert run.returncode != 0 and "Failed to connect to GCS" in err
        _kill_under(root / "worker")
        last = registered_checkpoints(snapshot)["checkpoint_results"][-1]["metrics"]["step"]

        port = _free_port()  # a new cluster, one node, on the same store
        _ray_start(["--head", f"--port={port}", "--include-dashboard=false"], root / "new", env)
        rerun = twostage(
            "run", config, "--json", cwd=tmp_path, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        )
        steps = {s["name"]: s for s in json.loads(rerun.stdout)["stages"]}
        assert steps["data"]["status"] == "cached"
        assert steps["vqvae"]["status"] == "resumed", rerun.stderr[-3000:]
        manifest = json.loads(Path(steps["vqvae"]["uri"], "_MANIFEST.json").read_text())
        assert 40 <= last <= manifest["metrics"]["resumed_from_step"] < 240
        assert manifest["metrics"]["step"] == 240
    finally:
        for name in ("worker", "head", "new"):
            _kill_under(root / name)
