"""Artifact store: atomic commits, checksums on read, racing writers."""

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from pipeline.store import MANIFEST, CorruptArtifactError, Store, StoreError, artifact_key
from stages.formats import image_stream
from stages.formats.images import read_image_table
from tests.helpers import REPO, twostage


def _commit(store: Store, key: str, files: dict[str, bytes], stage: str = "demo"):
    with store.staging(stage, key) as out:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        return store.commit(stage, key, out, {"metrics": {"n": len(files)}})


def test_key_is_canonical():
    a = artifact_key("s", "1", {"x": 1, "y": [1, 2]}, {"in": "k"})
    b = artifact_key("s", "1", {"y": [1, 2], "x": 1}, {"in": "k"})
    assert a == b and len(a) == 64
    assert artifact_key("s", "2", {"x": 1, "y": [1, 2]}, {"in": "k"}) != a
    assert artifact_key("s", "1", {"x": 1, "y": [1, 2]}, {"in": "j"}) != a


def test_commit_layout_and_manifest(tmp_path):
    store = Store(str(tmp_path))
    key = "a" * 64
    artifact, won = _commit(store, key, {"x.bin": b"hello", "sub/y.txt": b"world"})
    assert won
    final = tmp_path / "demo" / key
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()) == [
        MANIFEST,
        "sub/y.txt",
        "x.bin",
    ]
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["files"]["x.bin"]["size"] == 5
    assert manifest["metrics"] == {"n": 2}
    assert store.open("demo", key).read_bytes("sub/y.txt") == b"world"
    assert not list((tmp_path / ".staging").iterdir())  # staging cleaned


def test_failed_stage_leaves_nothing(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.staging("demo", "b" * 64) as out:
            (out / "half.bin").write_bytes(b"partial")
            raise RuntimeError("stage crashed")
    assert store.get("demo", "b" * 64) is None
    assert not (tmp_path / "demo").exists()
    assert not list((tmp_path / ".staging").iterdir())


def test_flipped_byte_is_detected_naming_the_file(tmp_path):
    store = Store(str(tmp_path))
    key = "c" * 64
    _commit(store, key, {"weights.bin": bytes(range(256)) * 10, "ok.txt": b"fine"})
    path = tmp_path / "demo" / key / "weights.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    artifact = store.open("demo", key)
    with pytest.raises(CorruptArtifactError, match=r"weights.bin: sha256 does not match"):
        artifact.read_bytes("weights.bin")
    with pytest.raises(CorruptArtifactError, match=r"weights.bin"):
        artifact.local_path("weights.bin")
    assert artifact.read_bytes("ok.txt") == b"fine"
    problems = artifact.verify()
    assert len(problems) == 1 and "weights.bin" in problems[0]
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptArtifactError, match=r"weights.bin: size 2550 bytes does not match"):
        artifact.read_bytes("weights.bin")
    with pytest.raises(CorruptArtifactError) as info:
        artifact.read_bytes("weights.bin")
    assert str(info.value).endswith(f"; delete {tmp_path}/demo/{key} and rerun to recompute it")


def _race_worker(root: str, key: str, tag: int, barrier) -> bool:
    store = Store(root)
    with store.staging("demo", key) as out:
        # every writer writes different content: a mixed artifact would fail verification
        for i in range(20):
            (out / f"part-{i:02d}.bin").write_bytes(bytes([tag]) * (1000 + i))
        barrier.wait()
        _, won = store.commit("demo", key, out, {"metrics": {"writer": tag}})
    return won


def test_racing_writers_leave_one_intact_artifact(tmp_path):
    key = "d" * 64
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            won = pool.starmap(_race_worker, [(str(tmp_path), key, t, barrier) for t in range(4)])
    assert sum(won) == 1
    artifact = Store(str(tmp_path)).open("demo", key)
    assert artifact.verify() == []
    writer = artifact.metrics["writer"]
    for i in range(20):
        assert set(artifact.read_bytes(f"part-{i:02d}.bin")) == {writer}
    assert not list((tmp_path / ".staging").iterdir())


@pytest.mark.parametrize("text", ["{not json", "[]"], ids=["not json", "not a mapping"])
def test_unreadable_manifest_is_an_error_not_a_cache_hit(tmp_path, text):
    store = Store(str(tmp_path))
    key = "e" * 64
    _commit(store, key, {"a": b"1"})
    (tmp_path / "demo" / key / MANIFEST).write_text(text)
    with pytest.raises(CorruptArtifactError, match="unreadable manifest"):
        store.get("demo", key)
    problems = []
    assert store.list(problems=problems) == []
    assert len(problems) == 1 and "_MANIFEST.json: unreadable manifest" in problems[0]
    proc = twostage("verify", "--all", "--store", tmp_path, cwd=tmp_path, check=1)
    assert f"CORRUPT {tmp_path}/demo/{key}/_MANIFEST.json" in proc.stdout
    listed = twostage("ls", "--store", tmp_path, cwd=tmp_path, check=0)
    assert listed.stdout == "no artifacts\n" and "left out 1 artifact(s)" in listed.stderr
    # by key too: named as unreadable (not "no artifact"), with the way out
    one = twostage("verify", key[:8], "--store", tmp_path, cwd=tmp_path, check=1)
    assert "_MANIFEST.json: unreadable manifest" in one.stderr
    assert f"delete {tmp_path}/demo/{key} and rerun" in one.stderr


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"a": "not an entry"}, "file 'a': expected size (bytes) and sha256"),
        ({"a": {"size": 1}}, "file 'a': expected size (bytes) and sha256"),
        ([["a", 1]], "'files' is not a mapping"),
        ({"../../outside": {"size": 1, "sha256": "0" * 64}}, "leaves the artifact"),
        ({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}, "is not a relative path"),
    ],
    ids=["not a mapping entry", "no sha256", "files a list", "dot-dot", "absolute"],
)
def test_a_malformed_manifest_entry_is_one_line_not_a_key_error(tmp_path, files, expected):
    store = Store(str(tmp_path))
    key = "e" * 64
    _commit(store, key, {"a": b"1"})
    path = tmp_path / "demo" / key / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "files": files}))  # valid JSON, a bad entry
    with pytest.raises(CorruptArtifactError, match="unreadable manifest") as info:
        store.get("demo", key)
    assert expected in str(info.value) and "\n" not in str(info.value)
    problems = []
    assert store.list(problems=problems) == [] and expected in problems[0]


def test_names_that_would_leave_the_store_are_refused(tmp_path):
    store = Store(str(tmp_path / "store"))
    _commit(store, "abcd" + "0" * 60, {"a": b"1"})
    (tmp_path / "secret").mkdir()  # beside the store: must never be listed or read
    (tmp_path / "secret" / "abcdxyz1").mkdir()
    (tmp_path / "secret" / "abcdxyz1" / MANIFEST).write_text(
        (tmp_path / "store" / "demo" / ("abcd" + "0" * 60) / MANIFEST).read_text()
    )
    for ref in ("demo/../../secret/abcdxyz1", "../secret/abcdxyz1", "demo/..", "demo/.."):
        with pytest.raises(StoreError, match="is not one plain name|too short"):
            store.find(ref)
    for stage, key in (("..", "secret"), ("demo", "../../secret/abcdxyz1"), ("demo", "")):
        with pytest.raises(StoreError, match="is not one plain name|is empty"):
            store.get(stage, key)
    with pytest.raises(StoreError, match="is not one plain name"):
        store.list("../secret")
    out = twostage("show", "demo/../../secret/abcdxyz1", "--store", store.root, cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert (
        out.stderr == "twostage: stage 'demo/../../secret' is not one plain name (no /, \\ or ..)\n"
    )


@pytest.mark.parametrize("command", [["ls"], ["verify", "--all"]])
def test_listing_a_store_that_is_not_there_is_an_error(tmp_path, command):
    proc = twostage(*command, "--store", tmp_path / "typo", cwd=tmp_path, check=1)
    assert (
        proc.stderr
        == f"twostage: {tmp_path}/typo: no artifact store there (nothing at that path)\n"
    )


def test_find_by_prefix(tmp_path):
    store = Store(str(tmp_path))
    _commit(store, "abcd" + "0" * 60, {"a": b"1"})
    _commit(store, "abcd" + "1" * 60, {"a": b"1"})
    assert store.find("abcd11").key == "abcd" + "1" * 60
    assert store.find("demo/abcd00").key == "abcd" + "0" * 60
    with pytest.raises(StoreError, match="ambiguous"):
        store.find("abcd")
    with pytest.raises(StoreError, match="too short"):
        store.find("ab")
    with pytest.raises(StoreError, match="no artifact"):
        store.find("ffff")


@pytest.mark.slow
def test_cli_verify_and_reader_fail_on_flipped_byte(tmp_path):
    """Acceptance: one flipped byte makes `twostage verify` and any reader fail, naming the file."""
    run = twostage(
        "run", REPO / "configs/smoke.yaml", "--set", "steps.data.limit=300", cwd=tmp_path, check=0
    )
    assert run.returncode == 0
    proc = twostage("verify", "--all", cwd=tmp_path, check=0)
    assert proc.stdout.count("ok ") == 2
    store = Store(str(tmp_path / "artifacts"))
    (ingest,) = store.list("ingest")
    parquet = Path(store.dir_of("ingest", ingest.key)) / "images-train-00000.parquet"
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    parquet.write_bytes(bytes(data))
    proc = twostage("verify", ingest.key[:10], cwd=tmp_path, check=1)
    assert "CORRUPT" in proc.stdout and "images-train-00000.parquet" in proc.stdout
    with pytest.raises(CorruptArtifactError, match="images-train-00000.parquet"):
        read_image_table(store.open("ingest", ingest.key))
    # a downstream stage reading the corrupt table fails with the file's name too
    rerun = twostage(
        "run",
        REPO / "configs/smoke.yaml",
        "--set",
        "steps.data.limit=300",
        "--set",
        "steps.stats.examples_per_class=2",
        "--json",
        cwd=tmp_path,
    )
    summary = json.loads(rerun.stdout)
    assert rerun.returncode == 1
    stats = next(s for s in summary["stages"] if s["name"] == "stats")
    assert stats["status"] == "failed" and "images-train-00000.parquet" in stats["error"]
    # a truncated table fails where its footer is first read, naming the file and the remedy
    parquet.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptArtifactError, match=r"images-train-00000.parquet: size .* rerun to"):
        image_stream.groups(store.open("ingest", ingest.key), "train")  # what streaming reads


def test_write_new_file_round_trips_and_commits_with_its_recorded_digest(tmp_path):
    """Direct writes (whole blocks, the padding cut off) keep every byte; `commit` takes the
    digest recorded at the write until the file changes, then reads it again."""
    import hashlib
    import os

    import numpy as np

    from pipeline.store import sha256_file, write_new_file

    data = np.random.default_rng(0).integers(0, 256, (9 << 20) + 12345, dtype=np.uint8)
    store = Store(str(tmp_path / "store"))
    key = artifact_key("stage", "1", {"x": 1}, {})
    with store.staging("stage", key) as out:
        write_new_file(out / "a.bin", data)
        write_new_file(out / "b.bin", b"small", sha256="0" * 64)  # a digest this test made up
        assert (out / "a.bin").read_bytes() == data.tobytes()
        assert sha256_file(out / "a.bin") == hashlib.sha256(data).hexdigest()
        assert sha256_file(out / "b.bin") == "0" * 64  # recorded, not read
        artifact, _ = store.commit("stage", key, out, {})
    assert artifact.files["b.bin"]["sha256"] == "0" * 64
    with pytest.raises(CorruptArtifactError, match="b.bin"):
        artifact.read_bytes("b.bin")  # readers check the bytes, so a wrong record shows
    with store.staging("stage", key) as out:
        write_new_file(out / "c.bin", b"before", sha256="1" * 64)
        with open(out / "c.bin", "ab") as f:
            f.write(b" and after")
        os.utime(out / "c.bin", ns=(1, 1))
        assert sha256_file(out / "c.bin") == hashlib.sha256(b"before and after").hexdigest()


@pytest.mark.parametrize("size", [0, 1, 4096, 4 << 20, (4 << 20) + 1, (10 << 20) + 777])
def test_new_file_streams_in_pieces_and_never_replaces_a_file(tmp_path, size):
    """`NewFile` takes writes of any size across its buffers (reused from file to file) and
    gives the file's sha256; an existing file is refused and left as it was."""
    import hashlib

    import numpy as np

    from pipeline.store import NewFile, sha256_file

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for name in ("first.bin", "second.bin"):
        with NewFile(tmp_path / name) as f:
            for start in range(0, size, 1_000_003):  # pieces that straddle the buffers
                f.write(data[start : start + 1_000_003])
        assert f.sha256 == hashlib.sha256(data).hexdigest() == sha256_file(tmp_path / name)
        assert (tmp_path / name).read_bytes() == data
    with pytest.raises(FileExistsError):
        NewFile(tmp_path / "first.bin")
    assert (tmp_path / "first.bin").read_bytes() == data


def _aged(path: Path, days: float) -> Path:
    """Writes a file under `path` dated `days` ago."""
    import os
    import time

    path.mkdir(parents=True, exist_ok=True)
    (path / "f.bin").write_bytes(b"x" * 10)
    then = time.time() - days * 86400
    os.utime(path / "f.bin", (then, then))
    return path


@pytest.mark.slow
def test_gc_removes_only_what_no_artifact_or_running_step_owns(tmp_path):
    import os
    import signal
    import time

    from tests.helpers import start_twostage, write_yaml

    root = tmp_path / "store"
    store = Store(str(root))
    artifact, _ = _commit(store, "a" * 64, {"x.bin": b"1"})
    done = _aged(root / "_scratch" / "demo" / ("a" * 64), 0)  # left by a crash after commit
    staging = _aged(root / ".staging" / f"demo-{'b' * 64}-dead", 30)  # a process died
    abandoned = _aged(root / "_scratch" / "demo" / ("c" * 64), 30)  # nobody resumed it
    recent = _aged(root / "_scratch" / "demo" / ("d" * 64), 1)  # a rerun may resume it

    marker = tmp_path / "marker"
    config = write_yaml(
        tmp_path / "p.yaml",
        f"name: gc\nstore: {root}\nsteps:\n  slow: {{stage: tests.plugin_stages.sleepy, "
        f"seconds: 60, scratch_file: true, marker_dir: {marker}}}\n",
    )
    run = start_twostage("run", config, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not list(marker.glob("attempt-*")):
            assert run.poll() is None and time.time() < deadline, "the step did not start"
            time.sleep(0.2)
        (running,) = (root / "_scratch" / "tests.plugin_stages.sleepy").iterdir()

        listed = twostage("gc", "--dry-run", "--older-than", "0", "--store", root, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert f"kept     {running}  (a running step holds" in listed.stdout
        for path in (done, staging, abandoned, recent):
            assert str(path) in listed.stdout and path.is_dir()  # listed, not removed
        assert "would remove 4 item(s)" in listed.stdout

        week = twostage("gc", "--store", root, cwd=tmp_path, check=0)  # the default: 7d
        assert "removed 3 item(s)" in week.stdout
        assert not done.exists() and not staging.exists() and not abandoned.exists()
        assert recent.is_dir() and running.is_dir()

        twostage("gc", "--older-than", "0", "--store", root, cwd=tmp_path, check=0)
        assert not recent.exists() and (running / "checkpoint.txt").is_file()
        assert store.open("demo", "a" * 64).verify() == []  # nothing committed is touched
        bad = twostage("gc", "--older-than", "soon", "--store", root, cwd=tmp_path, check=2)
        assert bad.stderr.startswith("twostage: config error: --older-than 'soon'")
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
