import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


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
    proc = twostage("run", *args, "--json", cwd=cwd, env=env, timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"no JSON on stdout (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        ) from None


@pytest.fixture
def shared_mnist() -> Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/data/mnist is not available")
    return SHARED_MNIST


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_idx(path: Path, array) -> Path:
    """Writes a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    import gzip
    import struct

    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def kill_after_checkpoints(
    config: Path, cwd: Path, stage: str, count: int = 1, within: float = 240
) -> dict:
    """Starts ``twostage run config`` and kills it (driver and Ray processes) as soon as Ray
    Train has registered `count` checkpoints of a `stage` step (what a rerun resumes from;
    at most the 2 the stages keep).

    Returns:
        Ray Train's checkpoint-manager snapshot once all is dead, what a rerun resumes from
        (``checkpoint_results``: each registered checkpoint's ``checkpoint_dir_name`` and
        ``metrics``, oldest first).
    """
    import glob
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), "--json"],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    snapshot = str(cwd / f"artifacts/_scratch/{stage}/*/ray_train/checkpoint_manager_snapshot.json")
    deadline = time.time() + within
    while time.time() < deadline:
        registered = _registered_checkpoints(glob.glob(snapshot))
        if len(registered.get("checkpoint_results", [])) >= count:
            break
        assert proc.poll() is None, f"the run ended before {count} checkpoint(s)"
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"fewer than {count} {stage} checkpoint(s) within {within:.0f} s")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    # read again until it stays put: Ray Train's worker can register more checkpoints before
    # it too is gone
    last = _registered_checkpoints(glob.glob(snapshot))
    for _ in range(10):
        time.sleep(1)
        now = _registered_checkpoints(glob.glob(snapshot))
        if now == last:
            break
        last = now
    return last


def _registered_checkpoints(snapshots: list[str]) -> dict:
    try:
        return json.loads(Path(snapshots[0]).read_text()) if snapshots else {}
    except (ValueError, OSError):
        return {}  # being written
