"""``twostage gc``: what no committed artifact and no running step owns, listed and removed.

Garbage, by kind:

- ``staging``: a step's staging directory (``<store>/.staging/<stage>-<key>-*``, local stores)
  left by a process that died before it committed or cleaned up;
- ``scratch``: ``<store>/_scratch/<stage>/<key>`` (a training step's checkpoints, an ingest's
  finished parts) of a key that is committed (the runner removes it on commit; a crash can
  leave it), or of a key that was never committed and whose newest file is older than the
  threshold: an interrupted run that nobody resumed (a rerun within the threshold resumes from
  it, so it is kept until then; so does an ingest of the same images under another key, e.g.
  once a broken file is fixed);
- ``upload``: on object stores, an ``attempt-*`` prefix of a key that its manifest does not name
  (a writer that lost a race, or died mid-upload);
- ``cache``: local copies of object-store files (``$TWOSTAGE_CACHE``) not used for the threshold.

Nothing committed is ever removed: an artifact is its manifest and the files it names. A step
that is running holds a shared lock on ``<store>/.locks/<stage>/<key>.lock`` (local stores;
`Store.step_lock`) and gc skips the staging and scratch of every key it cannot lock. On object
stores there are no locks: there the threshold alone protects a running step's scratch, so keep
it longer than a checkpoint interval.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.store import SCRATCH, Store, _cache_dir

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)\Z")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``90s`` or a plain number of seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"--older-than {text!r}: expected a duration like 7d, 12h, 30m or 90s")
    return float(match.group(1)) * _SECONDS[match.group(2)]


@dataclass
class Garbage:
    kind: str  # staging, scratch, upload or cache
    path: str  # in the store's file system (cache: a local path)
    bytes: int
    age_s: float  # since its newest file was written
    why: str
    owner: tuple[str, str] = ("", "")  # the stage and key whose step may hold it (not: cache)


def find(store: Store, older_than_s: float, now: float | None = None) -> tuple[list, list]:
    """What gc would remove, and what it keeps because a running step owns it.

    Returns:
        (garbage, kept): `Garbage` items; ``(path, why)`` of what a running step holds.
    """
    now = time.time() if now is None else now
    garbage: list[Garbage] = []
    kept: list[tuple[str, str]] = []
    committed = {(a.stage, a.key): a for a in store.list()}

    def consider(kind: str, path: str, stage: str, key: str, why: str, always: bool) -> None:
        size, newest = _tree(store, path)
        age = now - newest if newest else float("inf")
        if not always and age < older_than_s:
            return
        with store.unless_running(stage, key) as idle:
            if not idle:
                kept.append((path, f"a running step holds {stage}/{key[:12]}"))
                return
        garbage.append(Garbage(kind, path, size, age, why, (stage, key)))

    if store.local:
        for entry in _dirs(store, f"{store.root}/.staging"):
            stage, _, rest = entry.partition("-")
            key = rest.rsplit("-", 1)[0]
            consider(
                "staging",
                f"{store.root}/.staging/{entry}",
                stage,
                key,
                "never committed",
                always=False,
            )
    for stage in _dirs(store, f"{store.root}/{SCRATCH}"):
        for key in _dirs(store, f"{store.root}/{SCRATCH}/{stage}"):
            done = (stage, key) in committed
            why = "its artifact is committed" if done else "its key was never committed"
            consider(
                "scratch", f"{store.root}/{SCRATCH}/{stage}/{key}", stage, key, why, always=done
            )
    if not store.local:
        for (stage, key), artifact in committed.items():
            used = artifact.manifest.get("data_dir", "")
            for entry in _dirs(store, store.dir_of(stage, key)):
                if entry.startswith("attempt-") and entry != used:
                    consider(
                        "upload",
                        f"{store.dir_of(stage, key)}/{entry}",
                        stage,
                        key,
                        "not the committed attempt",
                        always=False,
                    )
        for stage in _dirs(store, store.root):
            if stage.startswith((".", "_")):
                continue
            for key in _dirs(store, f"{store.root}/{stage}"):
                if (stage, key) in committed:
                    continue
                for entry in _dirs(store, store.dir_of(stage, key)):
                    if entry.startswith("attempt-"):
                        consider(
                            "upload",
                            f"{store.dir_of(stage, key)}/{entry}",
                            stage,
                            key,
                            "its key has no manifest",
                            always=False,
                        )
        cache = _cache_dir()
        for path in sorted(cache.glob("*/*")) if cache.is_dir() else []:
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            used = max([p.stat().st_atime for p in path.rglob("*")] + [path.stat().st_mtime])
            if now - used >= older_than_s:
                garbage.append(Garbage("cache", str(path), size, now - used, "not used since"))
    return garbage, kept


def remove(store: Store, items: list[Garbage]) -> None:
    """Deletes what `find` listed (a step that started since is skipped by its lock)."""
    for item in items:
        if item.kind == "cache":
            shutil.rmtree(item.path, ignore_errors=True)
            continue
        with store.unless_running(*item.owner) as idle:  # a step may have started since
            if not idle:
                continue
            try:
                store.fs.delete_dir(item.path)
            except (FileNotFoundError, OSError):
                pass


def _dirs(store: Store, path: str) -> list[str]:
    import pyarrow.fs as pafs

    try:
        infos = store.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _tree(store: Store, path: str) -> tuple[int, float]:
    """Bytes under `path` and when its newest file was written (epoch seconds; 0 if none)."""
    import pyarrow.fs as pafs

    infos = store.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if store.local and not files:  # an empty directory: its own time
        return 0, Path(path).stat().st_mtime if Path(path).exists() else 0.0
    newest = max((i.mtime.timestamp() for i in files if i.mtime is not None), default=0.0)
    return sum(i.size or 0 for i in files), newest
