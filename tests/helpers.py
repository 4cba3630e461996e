"""Builders the test files share: the CLI in a subprocess, small input files, the tiny VQ-VAE-2
and the tiny two-stage pipeline. Fixtures live in conftest.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
# what the loopback S3 server (conftest's s3_server) accepts
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


# ----- the CLI ---------------------------------------------------------------------------------


def cli_env(**extra) -> dict:
    """Environment for `twostage` subprocesses: the repo importable (tests' plugin stages)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    env.update(extra)
    return env


def twostage(*args, cwd, env=None, check=None, timeout=300) -> subprocess.CompletedProcess:
    """Runs the CLI in a subprocess (as a user would) and returns the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"twostage {' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def run_json(*args, cwd, env=None, timeout=300) -> dict:
    """``twostage run *args --json``: the run's summary (status, run_dir, one entry per step)."""
    proc = twostage("run", *args, "--json", cwd=cwd, env=env, timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"no JSON on stdout (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        ) from None


def steps_by_name(summary: dict) -> dict[str, dict]:
    """A run summary's step entries by step name."""
    return {s["name"]: s for s in summary["stages"]}


def registered_checkpoints(pattern: str) -> dict:
    """Ray Train's checkpoint-manager snapshot at the glob `pattern` (``{}`` while there is none):
    ``checkpoint_results``, each registered checkpoint's ``checkpoint_dir_name`` and
    ``metrics``, oldest first."""
    import glob

    snapshots = glob.glob(pattern)
    try:
        return json.loads(Path(snapshots[0]).read_text()) if snapshots else {}
    except (ValueError, OSError):
        return {}  # being written


# ----- files -----------------------------------------------------------------------------------


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def noise_folder_with_a_late_broken_file(root: Path):
    """An image folder of 300 noise PNGs (16x16 RGB, classes ``a`` and ``b``) and a broken
    file late in id order (folders are listed, and cut into parts, by id), so that an ingest
    under ``strict`` stops after its first parts. Returns (the rng, the broken file's path
    relative to `root`)."""
    import numpy as np
    from PIL import Image

    from stages.sources.image_folder import _hash

    rng = np.random.default_rng(4)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(150):
            image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / label / f"{i}.png")
    ids = sorted(_hash(p.relative_to(root).as_posix().encode()) >> 1 for p in root.glob("*/*"))
    bad = next(
        f"a/bad{k}.png" for k in range(1000) if _hash(f"a/bad{k}.png".encode()) >> 1 > ids[240]
    )
    (root / bad).write_bytes(b"not a png")
    return rng, bad


def start_twostage(*args, cwd, env=None) -> subprocess.Popen:
    """The CLI started in a session of its own (`os.killpg` kills it and its Ray instance),
    its output dropped: for tests that kill a run part-way."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def ray_train_pipeline(store: Path, resources: str = "", worker_resources: str = "") -> str:
    """A pipeline's YAML: embedded MNIST, then a tiny VQ-VAE-2 trained by one Ray Train worker,
    checkpointed every 20 of its 240 steps (a test that kills it once Ray Train registered two
    checkpoints needs the room: Ray Train's snapshot of them lags the training by seconds).
    `resources`, `worker_resources`: flow YAML for the training step and its Ray Train worker."""
    step = f"\n    resources: {resources}" if resources else ""
    worker = f", worker_resources: {worker_resources}" if worker_resources else ""
    return f"""
name: ray_train
store: {store}
steps:
  data: {{stage: ingest, source: {{kind: embedded}}, image_size: 32, limit: 400}}
  vqvae:
    stage: train_autoencoder
    inputs: {{images: data}}{step}
    model: {{family: vqvae2, in_channels: 1, channels: 16, res_channels: 8, codebook_size: 16}}
    train: {{steps: 240, batch_size: 16, checkpoint_every: 20, log_every: 20, workers: 1{worker}}}
"""


def write_idx(path: Path, array) -> Path:
    """Writes a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    import gzip
    import struct

    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def copy_run(root: Path, target: Path) -> Path:
    """Copies a pipeline run's directory (its ``artifacts`` store and ``runs``) to `target`, for
    a test that runs more pipelines in that store without touching a shared fixture's."""
    shutil.copytree(root, target)
    return target


# ----- models and pipelines ------------------------------------------------------------------

TINY_VQVAE = {
    "in_channels": 1,
    "channels": 16,
    "res_blocks": 1,
    "res_channels": 8,
    "codebook_size": 32,
    "embed_dim": 8,
}


def tiny_vqvae(**changes) -> dict:
    """The tiny 1x32x32 VQ-VAE-2 the tests train (8x8 bottom and 4x4 top codes, 32 codes each),
    as keyword arguments of ``VQVAE2Config`` and a train_autoencoder step's ``model``."""
    return {**TINY_VQVAE, **changes}


def tiny_vqvae_yaml(**changes) -> str:
    """The same as a YAML flow mapping, for a pipeline file's ``model:``."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in tiny_vqvae(**changes).items()) + "}"


TINY_PRIOR = "{hidden_size: 32, layers: 1, heads: 2}"
PATCH_PRIOR = "{hidden_size: 32, layers: 1, heads: 2, patch: [2, 2]}"  # one step per 2x2 codes

# stage 1 of the tiny two-stage pipeline: MNIST at 32px, the tiny VQ-VAE-2, its codes
TWO_STAGE_BASE = f"""
steps:
  data: {{stage: ingest, image_size: 32, limit: 400}}
  vqvae:
    stage: train_autoencoder
    inputs: {{images: data}}
    model: {tiny_vqvae_yaml()}
    train: {{steps: 30, workers: 0, log_every: 10, checkpoint_every: 30}}
  codes:
    stage: encode
    inputs: {{images: data, autoencoder: vqvae}}
    precision: fp32
    batch_size: 128
"""

# the whole tiny pipeline: stage 1, a prior per level (Ray Train on the top, in process with
# 2x2 patches on the bottom), a classifier, samples, evaluation and the report
TWO_STAGE_PIPELINE = (
    "name: two_stage\ntracking: tensorboard\n"
    + TWO_STAGE_BASE
    + f"""
  prior_top:
    stage: train_prior
    inputs: {{codes: codes}}
    level: top
    model: {TINY_PRIOR}
    train: {{steps: 20, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 1}}
  prior_bottom:
    stage: train_prior
    inputs: {{codes: codes}}
    level: bottom
    model: {PATCH_PRIOR}
    train: {{steps: 20, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 0}}
  classifier: {{stage: train_classifier, inputs: {{images: data}}, steps: 20}}
  samples:
    stage: sample
    inputs: {{autoencoder: vqvae, priors: [prior_top, prior_bottom]}}
    per_class: 2
  evaluation:
    stage: evaluate
    inputs: {{images: data, classifier: classifier, samples: samples, autoencoder: vqvae,
              codes: codes, priors: [prior_top, prior_bottom]}}
"""
)
