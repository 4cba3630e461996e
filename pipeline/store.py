"""Content-addressed artifact store on a local path or any pyarrow filesystem URI (e.g. S3).

Layout: ``<store>/<stage>/<key>/`` holds one committed artifact: its files and ``_MANIFEST.json``.
The manifest lists every file with its size and sha256, plus the stage config, input keys,
versions and metrics. An artifact exists only once its manifest does.

Commit protocol:
- local paths: the stage writes into ``<store>/.staging/<unique>/``, the manifest is written
  last, everything is fsynced (a power cut cannot leave a committed artifact with empty
  files), then the whole directory is renamed to ``<stage>/<key>`` in one atomic step. If another
  writer got there first the rename fails and the late copy is discarded: racing runs never
  leave a mixed artifact.
- object stores (no atomic rename): the files are uploaded under a fresh attempt prefix
  ``<stage>/<key>/<attempt>/`` and the manifest, naming that prefix as ``data_dir``, is put
  last. A manifest only ever points at one complete attempt, so racing writers cannot mix
  files either; the loser's attempt prefix is left behind as garbage. A staged output may
  name files that are already in the store (`stage_in_store`, e.g. an ingest's finished parts
  under its scratch): those are copied inside the store, not uploaded from the staging
  directory, which then holds only the small files.

Readers verify size and sha256 of every file they read and raise `CorruptArtifactError` naming
the file on any mismatch.

Keys are sha256 over the canonical JSON of (stage type, stage version, stage config, input keys).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = 1
IN_STORE = "_IN_STORE.jsonl"  # in a staging directory: its files already in the store
SCRATCH = "_scratch"  # <store>/_scratch/<stage>/<key>: a key's resumable state
_CHUNK = 4 << 20
_PUTS = 16  # uploads and copies of one commit to an object store at once


class StoreError(RuntimeError):
    """The store cannot be opened or an artifact is missing."""


class CorruptArtifactError(StoreError):
    """A stored file does not match its manifest (size or checksum) or the manifest is unreadable."""


def artifact_key(stage: str, version: str, config: dict, inputs: dict[str, Any]) -> str:
    """The content address of a stage output.

    Args:
        stage: Stage type name (e.g. ``ingest``).
        version: The stage implementation's version string; bump it when outputs change.
        config: The stage's full config as plain data (defaults filled in).
        inputs: Input slot -> artifact key (or list of keys).

    Returns:
        64 hex digits.
    """
    payload = {"stage": stage, "version": version, "config": config, "inputs": inputs}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    stat = os.stat(path)
    known = _WRITTEN.get((str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns))
    if known is not None:  # written by `NewFile` on this node, unchanged since
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# files this process wrote with `NewFile` (or a process of this node, see `record_written`):
# (path, inode, size, mtime) -> sha256
_WRITTEN: dict[tuple[str, int, int, int], str] = {}
_DIRECT_BLOCK = 4096  # O_DIRECT writes whole blocks from block-aligned memory
_BUFFER_BYTES = 4 << 20
# full buffers a `NewFile` may hand to its background thread before the caller waits: a Parquet
# row group (8 MB) arrives as a burst of two, which the thread writes while the caller decodes
_IN_FLIGHT = 3
_buffers: list[mmap.mmap] = []  # page-aligned buffers of closed `NewFile`s, reused by the next


class NewFile:
    """A new file (it must not exist yet) written in order, its sha256 computed on the way; a
    binary file object, so a `pyarrow.parquet.ParquetWriter` can write into it.

    Where the filesystem allows, the writes bypass the page cache (Linux ``O_DIRECT``, whole
    blocks from reused page-aligned buffers): data written once, much larger than memory (an
    image table), would otherwise evict what the host is reading meanwhile (the source images),
    and hosts whose fresh memory is slow to touch pay for every page of it: on a 2-core VM,
    2 GB took 32 s through the page cache and 1.6 s direct (`dd`). Elsewhere (no ``O_DIRECT``,
    tmpfs) the writes are plain. Full buffers are hashed and written by a background thread
    while the caller fills the next ones (up to `_IN_FLIGHT` queued), so the caller does not
    wait for the disk unless it produces faster than the disk takes the data. `close`
    returns the sha256 and remembers it for this path, so that `Store.commit` need not read
    the file back.
    """

    def __init__(self, path: Path | str, hashed: bool = True):
        self.path = str(path)
        self.size = 0
        self.closed = False
        self.sha256: str | None = None
        self._digest = hashlib.sha256() if hashed else None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
            self._direct = True
        except (AttributeError, OSError):  # no O_DIRECT here, or the filesystem refuses it
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._direct = False
        self._buffer = _buffers.pop() if _buffers else mmap.mmap(-1, _BUFFER_BYTES)
        self._fill = 0
        self._spare: list[mmap.mmap] = []  # buffers whose blocks are written
        self._written = 0  # bytes the background thread has written
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="newfile")  # blocks in order
        self._pending: collections.deque = collections.deque()  # (future, buffer), oldest first

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(len(view) - done, len(self._buffer) - self._fill)
            self._buffer[self._fill : self._fill + take] = view[done : done + take]
            self._fill += take
            done += take
            if self._fill == len(self._buffer):
                self._hand_over()
        self.size += len(view)
        return len(view)

    def _hand_over(self) -> None:
        """Gives the filled buffer to the background thread and goes on in a free one: one
        whose block is written, waiting for the oldest when `_IN_FLIGHT` are queued."""
        self._pending.append(
            (self._thread.submit(self._write_block, self._buffer, self._fill), self._buffer)
        )
        while self._pending and (self._pending[0][0].done() or len(self._pending) >= _IN_FLIGHT):
            future, buffer = self._pending.popleft()
            future.result()  # written (or its error raised here)
            self._spare.append(buffer)
        if self._spare:
            self._buffer = self._spare.pop()
        else:
            self._buffer = _buffers.pop() if _buffers else mmap.mmap(-1, _BUFFER_BYTES)
        self._fill = 0

    def _write_block(self, buffer: mmap.mmap, fill: int) -> None:
        """Hashes and writes ``buffer[:fill]``; the last block zero-padded when direct (`close`
        truncates the padding)."""
        with memoryview(buffer) as block:
            if self._digest is not None:
                self._digest.update(block[:fill])
            if not self._direct:
                _write_all(self._fd, block[:fill], self.path)
            else:
                end = -(-fill // _DIRECT_BLOCK) * _DIRECT_BLOCK
                buffer[fill:end] = bytes(end - fill)
                try:
                    _write_all(self._fd, block[:end], self.path)
                except OSError as e:
                    # the flag was taken but direct writes are not (some filesystems): go plain
                    if self._written or e.errno != errno.EINVAL:
                        raise
                    os.close(self._fd)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
                    self._direct = False
                    _write_all(self._fd, block[:fill], self.path)
        self._written += fill

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass  # buffers are written when full; the rest on close

    def close(self) -> str | None:
        """Finishes the file; returns its sha256 (None when made with ``hashed=False``)."""
        if self.closed:
            return self.sha256
        try:
            if self._fill:
                self._hand_over()
            for future, _ in self._pending:
                future.result()
            if self._direct:
                os.ftruncate(self._fd, self.size)  # drop the last block's padding
        finally:
            self._thread.shutdown()  # waits for what is queued
            os.close(self._fd)
            self.closed = True
            _buffers.extend([self._buffer, *self._spare, *(b for _, b in self._pending)])
            self._pending.clear()
        self.sha256 = self._digest.hexdigest() if self._digest is not None else None
        if self.sha256 is not None:
            record_written(self.path, self.sha256)
        return self.sha256

    def __enter__(self) -> NewFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HashedStream:
    """A new file `path` of the pyarrow filesystem `fs` (an object store's), written in order,
    its sha256 computed on the way; a binary file object, as `NewFile` is for local files.
    An object appears only once `close` has uploaded it whole; `close` returns the sha256."""

    def __init__(self, fs, path: str):
        self.path, self.size, self.closed, self.sha256 = path, 0, False, None
        self._stream = fs.open_output_stream(path)
        self._digest = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self._stream.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> str:
        if not self.closed:
            self._stream.close()
            self.closed, self.sha256 = True, self._digest.hexdigest()
        return self.sha256


def _write_all(fd: int, view: memoryview, path: str) -> None:
    written = 0
    try:
        while written < len(view):
            written += os.write(fd, view[written:])
    except OSError as e:  # a full disk: the message names the file
        raise OSError(e.errno, e.strerror, path) from None


def record_written(path: Path | str, sha256: str) -> None:
    """Remembers `sha256` as the digest of the finished file `path`, as it is now (inode, size,
    mtime), e.g. a file a Ray task of this node wrote with `NewFile` and renamed since."""
    stat = os.stat(path)
    _WRITTEN[(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)] = sha256


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """`dst` as a hard link to `src` (files written once are never changed), or a copy where
    the filesystem refuses links; FileNotFoundError when `src` is gone."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:  # another filesystem, or no hard links there
        shutil.copyfile(src, dst)


def write_new_file(path: Path, data, sha256: str | None = None) -> None:
    """Writes `data` (bytes-like) as the new file `path` (see `NewFile`) and remembers its
    sha256: `sha256`, computed where the data was made, or here."""
    with NewFile(path, hashed=sha256 is None) as f:
        f.write(data)
    if sha256 is not None:
        record_written(path, sha256)


_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _name_error(text: Any) -> str | None:
    """Why `text` is not one plain path component (a stage type, a key), or None."""
    if not isinstance(text, str) or not text:
        return "is empty"
    if "/" in text or "\\" in text or text in (".", "..") or "\0" in text:
        return "is not one plain name (no /, \\ or ..)"
    return None


def _path_error(name: Any) -> str | None:
    """Why `name` is not a relative path inside an artifact (a manifest file name), or None."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return "is not a relative path"
    if any(part in ("", ".", "..") for part in name.split("/")) or "\0" in name:
        return "leaves the artifact (empty, . or .. parts)"
    return None


def _manifest_error(manifest: Any) -> str | None:
    """What is malformed in a parsed manifest (files and where they lie), or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return "not a twostage manifest"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "'files' is not a mapping of file name -> size and sha256"
    for name, entry in files.items():
        problem = _path_error(name)
        if problem:
            return f"file name {name!r} {problem}"
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.match(entry["sha256"])
        ):
            return f"file {name!r}: expected size (bytes) and sha256 (64 hex digits)"
    data_dir = manifest.get("data_dir", "")
    if data_dir and _path_error(data_dir):
        return f"data_dir {data_dir!r} {_path_error(data_dir)}"
    return None


# query parameters of a store URI that hold credentials (pyarrow's S3, GCS and HDFS options)
_SECRET_PARAMS = {"access_key", "secret_key", "session_token", "password", "token", "kerb_ticket"}


def redact(uri: str) -> str:
    """A store URI or path as it may be shown and written down: the user info of its authority
    (``s3://KEY:SECRET@bucket``) and every credential in its query become ``***``. Readers
    reopen stores from the full URI (`Store.spec`), which is never written to a file."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    rest, qmark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    params = []
    for item in query.split("&") if query else []:
        name, eq, value = item.partition("=")
        params.append(f"{name}=***" if name.lower() in _SECRET_PARAMS and eq else item)
    return f"{scheme}://{authority}{slash}{path}" + (qmark + "&".join(params) if qmark else "")


def _is_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


@dataclass
class Artifact:
    """A committed artifact: its manifest and verified access to its files."""

    store: Store
    stage: str
    key: str
    manifest: dict

    @property
    def uri(self) -> str:
        return self.store.uri_of(self.stage, self.key)

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def _remedy(self) -> str:
        return f"; delete {self.uri} and rerun to recompute it"

    def fs_path(self, name: str) -> str:
        """Path of one file of this artifact in ``store.fs`` (unverified; for bulk readers)."""
        data_dir = self.manifest.get("data_dir", "")
        return "/".join(p for p in (self.store.dir_of(self.stage, self.key), data_dir, name) if p)

    def _entry(self, name: str) -> dict:
        if name not in self.files:
            raise StoreError(
                f"{self.stage}/{self.key[:12]}: no file {name!r} in artifact "
                f"(has: {', '.join(sorted(self.files)) or 'nothing'})"
            )
        return self.files[name]

    def read_bytes(self, name: str) -> bytes:
        """Reads one file, verifying its size and sha256 against the manifest."""
        entry = self._entry(name)
        path = self.fs_path(name)
        try:
            with self.store.fs.open_input_stream(path) as f:
                data = f.read()
        except (FileNotFoundError, OSError) as e:
            raise CorruptArtifactError(
                f"{path}: listed in the manifest but unreadable ({e}){self._remedy}"
            ) from e
        _check(path, len(data), hashlib.sha256(data).hexdigest(), entry, self._remedy)
        return data

    def local_path(self, name: str) -> Path:
        """A verified local path to one file (downloaded to a cache for remote stores)."""
        entry = self._entry(name)
        if self.store.local:
            path = Path(self.fs_path(name))
            if not path.is_file():
                raise CorruptArtifactError(
                    f"{path}: listed in the manifest but missing{self._remedy}"
                )
            _check(str(path), path.stat().st_size, sha256_file(path), entry, self._remedy)
            return path
        cache = _cache_dir() / self.stage / self.key
        target = cache / name
        if target.is_file() and target.stat().st_size == entry["size"]:
            if sha256_file(target) == entry["sha256"]:
                return target
        data = self.read_bytes(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def local_dir(self, *names: str) -> Path:
        """A local directory holding verified copies of `names` (e.g. a model's two files)."""
        paths = [self.local_path(name) for name in names]
        return paths[0].parent

    def verify(self) -> list[str]:
        """Checks every file; returns the list of problems (empty when intact)."""
        problems = []
        for name in sorted(self.files):
            try:
                if self.store.local:
                    self.local_path(name)
                else:
                    self.read_bytes(name)
            except StoreError as e:
                problems.append(str(e))
        return problems


def _check(path: str, size: int, digest: str, entry: dict, remedy: str = "") -> None:
    if size != entry["size"]:
        raise CorruptArtifactError(
            f"{path}: size {size} bytes does not match the manifest's {entry['size']} "
            f"(truncated or overwritten file){remedy}"
        )
    if digest != entry["sha256"]:
        raise CorruptArtifactError(
            f"{path}: sha256 does not match the manifest (corrupted file){remedy}"
        )


def _cache_dir() -> Path:
    root = os.environ.get("TWOSTAGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twostage"
    )
    return Path(root)


class Store:
    """An artifact store rooted at a local path or a pyarrow filesystem URI.

    Args:
        uri: A local path (relative paths resolve against the current directory) or a URI
            pyarrow understands, e.g. ``s3://bucket/prefix`` (endpoint and credentials from the
            usual AWS environment variables, or ``?endpoint_override=host:port&scheme=http``).
    """

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.local = _is_local(uri)
        if self.local:
            path = uri[len("file://") :] if uri.startswith("file://") else uri
            self.root = str(Path(path).expanduser().resolve())
            self.uri = self.spec = self.root
            self.fs = pafs.LocalFileSystem()
        else:
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            except Exception as e:  # pyarrow raises several types here
                raise StoreError(f"store {uri!r}: cannot open ({e})") from e
            self.root = root.rstrip("/")
            self.uri = redact(uri.split("?", 1)[0].rstrip("/"))  # shown and written down
            self.spec = uri  # with its query (endpoint, scheme), for workers to reopen

    def dir_of(self, stage: str, key: str) -> str:
        """Where artifact ``stage/key`` lies; `StoreError` for names that would leave it."""
        for what, text in (("stage", stage), ("key", key)):
            problem = _name_error(text)
            if problem:
                raise StoreError(f"{what} {text!r} {problem}")
        return f"{self.root}/{stage}/{key}"

    def uri_of(self, stage: str, key: str) -> str:
        return f"{self.uri}/{stage}/{key}"

    # ----- reading -------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether anything is at the store's root."""
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound

    def _read_manifest(self, stage: str, key: str) -> dict | None:
        path = f"{self.dir_of(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as f:
                raw = f.read()
        except FileNotFoundError:  # pyarrow's local and S3 file systems both raise it
            return None
        except OSError as e:  # e.g. access denied: not the same as "not there"
            raise StoreError(f"{path}: cannot read the manifest ({e})") from e
        try:
            manifest = json.loads(raw)
            problem = _manifest_error(manifest)
            if problem:
                raise ValueError(problem)
        except ValueError as e:
            raise CorruptArtifactError(
                f"{path}: unreadable manifest ({e}); delete {self.dir_of(stage, key)} and rerun "
                "the pipeline that made it"
            ) from e
        return manifest

    def get(self, stage: str, key: str) -> Artifact | None:
        """The committed artifact, or None if there is none."""
        manifest = self._read_manifest(stage, key)
        return None if manifest is None else Artifact(self, stage, key, manifest)

    def open(self, stage: str, key: str) -> Artifact:
        """The committed artifact; raises StoreError when it does not exist."""
        artifact = self.get(stage, key)
        if artifact is None:
            raise StoreError(f"no committed artifact {stage}/{key} in {self.uri}")
        return artifact

    def list(self, stage: str | None = None, problems: list[str] | None = None) -> list[Artifact]:
        """All committed artifacts, oldest first (optionally of one stage type).

        Artifacts whose manifest is unreadable are left out; their errors are appended to
        `problems` when given.
        """
        if stage is not None and _name_error(stage):
            raise StoreError(f"stage {stage!r} {_name_error(stage)}")
        stages = [stage] if stage else self._children(self.root)
        found = []
        for name in stages:
            if name.startswith(".") or name.startswith("_"):
                continue
            for key in self._children(f"{self.root}/{name}"):
                try:
                    artifact = self.get(name, key)
                except CorruptArtifactError as e:
                    if problems is not None:
                        problems.append(str(e))
                    continue
                if artifact is not None:
                    found.append(artifact)
        return sorted(found, key=lambda a: a.manifest.get("created", ""))

    def find(self, key_prefix: str) -> Artifact:
        """The one artifact whose key starts with `key_prefix` (accepts ``stage/key`` too)."""
        stage = None
        if "/" in key_prefix:
            stage, key_prefix = key_prefix.rsplit("/", 1)
        if len(key_prefix) < 4:
            raise StoreError(f"key prefix {key_prefix!r} is too short (give at least 4 characters)")
        for what, text in (("stage", stage), ("key prefix", key_prefix)):
            if text is not None and _name_error(text):
                raise StoreError(f"{what} {text!r} {_name_error(text)}")
        problems: list[str] = []
        matches = [a for a in self.list(stage, problems) if a.key.startswith(key_prefix)]
        if not matches:
            unreadable = [p for p in problems if f"/{key_prefix}" in p]
            if unreadable:  # there, but its manifest cannot be read
                raise CorruptArtifactError(unreadable[0])
            raise StoreError(f"no artifact with key {key_prefix!r} in {self.uri}")
        if len(matches) > 1:
            names = ", ".join(f"{a.stage}/{a.key[:12]}" for a in matches[:5])
            raise StoreError(f"key prefix {key_prefix!r} is ambiguous: {names}")
        return matches[0]

    def _children(self, path: str) -> list[str]:
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    # ----- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, stage: str, key: str):
        """A fresh local directory for a stage to write its outputs into.

        On a local store it lives under ``<store>/.staging`` so the commit is a rename on one
        file system; for object stores it is a local temporary directory. Removed on exit
        unless it was committed (renamed away).
        """
        if self.local:
            base = Path(self.root) / ".staging"
            base.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix=f"{stage}-{key}-", dir=base))  # gc reads both
        else:
            path = Path(tempfile.mkdtemp(prefix=f"twostage-{stage}-{key[:12]}-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, stage: str, key: str, staged: Path, manifest: dict) -> tuple[Artifact, bool]:
        """Commits the files in `staged` as artifact ``stage/key``.

        Args:
            stage: Stage type.
            key: Artifact key.
            staged: Local directory holding the output files (from `staging`).
            manifest: Extra manifest fields (config, inputs, metrics, ...); files are added here.

        Returns:
            (artifact, won): `won` is False when another writer committed the key first, in
            which case its artifact is returned and ours discarded.
        """
        files = {}
        in_store = staged_in_store(staged)
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            rel = path.relative_to(staged).as_posix()
            if rel == MANIFEST:
                raise StoreError(f"stage output may not contain a file named {MANIFEST}")
            if rel != IN_STORE:
                files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for rel, entry in in_store.items():
            files[rel] = {"size": entry["size"], "sha256": entry["sha256"]}
        files = dict(sorted(files.items()))
        full = {
            "format": MANIFEST_FORMAT,
            "stage": stage,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **manifest,
            "files": files,
        }
        existing = self.get(stage, key)
        if existing is not None:
            return existing, False
        if self.local:
            if in_store:
                raise StoreError("files in the store can be staged on object stores only")
            return self._commit_local(stage, key, staged, full)
        return self._commit_remote(stage, key, staged, full, in_store)

    def _commit_local(self, stage, key, staged, manifest):
        manifest["data_dir"] = ""
        _write_json_atomic(staged / MANIFEST, manifest)
        sync_tree(staged)  # on disk before the rename commits it (e.g. a power cut)
        final = Path(self.dir_of(stage, key))
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
            sync_directory(final.parent)
        except OSError:
            existing = self.get(stage, key)
            if existing is None:
                raise StoreError(
                    f"{final} exists but holds no committed artifact; remove it and rerun"
                ) from None
            return existing, False
        staged.mkdir()  # the staging context removes it again
        return Artifact(self, stage, key, manifest), True

    def _commit_remote(self, stage, key, staged, manifest, in_store):
        attempt = f"attempt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        manifest["data_dir"] = attempt
        base = f"{self.dir_of(stage, key)}/{attempt}"

        def put(rel: str) -> None:
            if rel in in_store:  # a copy inside the store (S3: CopyObject, no bytes through here)
                self.fs.copy_file(in_store[rel]["path"], f"{base}/{rel}")
                return
            with (
                open(staged / rel, "rb") as src,
                self.fs.open_output_stream(f"{base}/{rel}") as dst,
            ):
                shutil.copyfileobj(src, dst, _CHUNK)

        # several at once: an object store takes each request at a fraction of its bandwidth,
        # and an ImageNet-size table is thousands of files
        with ThreadPoolExecutor(_PUTS) as pool:
            for _ in pool.map(put, manifest["files"]):  # the first error is raised here
                pass
        existing = self.get(stage, key)
        if existing is None:
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            if _put_if_absent(self.spec, f"{self.dir_of(stage, key)}/{MANIFEST}", body):
                return Artifact(self, stage, key, manifest), True
            existing = self.get(stage, key)  # another writer's manifest landed first
        self.fs.delete_dir(base)
        return existing, False

    # ----- what a running step owns (for `twostage gc`) -------------------------------------

    def _lock_path(self, stage: str, key: str) -> Path:
        self.dir_of(stage, key)  # both are plain names
        return Path(self.root) / ".locks" / stage / f"{key}.lock"

    @contextlib.contextmanager
    def step_lock(self, stage: str, key: str):
        """Held while a step of ``stage/key`` runs: a shared lock (racing runs of one key may
        both hold it) that `twostage gc` cannot take, so it leaves that key's staging and
        scratch alone. Local stores only (an flock); nothing on object stores."""
        if not self.local:
            yield
            return
        import fcntl

        path = self._lock_path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def unless_running(self, stage: str, key: str):
        """Yields True while no step of ``stage/key`` runs, holding it off until the block
        ends; yields False when one runs (always True on object stores: no locks there)."""
        path = self._lock_path(stage, key)
        if not self.local or not path.exists():
            yield True
            return
        import fcntl

        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ----- scratch space for resumable stages ----------------------------------------------

    def scratch_uri(self, stage: str, key: str) -> str:
        """Where a stage may keep resumable state (checkpoints) for one key:
        ``<store>/_scratch/<stage>/<key>`` (`SCRATCH`), so the other keys' scratch of a stage
        are its siblings.

        A local path for local stores; for object stores the URI with its query (endpoint).
        """
        if self.local:
            return f"{self.root}/{SCRATCH}/{stage}/{key}"
        base, _, query = self.spec.partition("?")
        return f"{base.rstrip('/')}/{SCRATCH}/{stage}/{key}" + (f"?{query}" if query else "")

    def remove_scratch(self, stage: str, key: str) -> None:
        """Deletes a committed key's resumable state (no error if there is none)."""
        path = f"{self.root}/{SCRATCH}/{stage}/{key}"
        try:
            self.fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass


def stage_in_store(staged: Path, name: str, path: str, size: int, sha256: str) -> None:
    """Adds file `name` to the output staged in `staged` (an object store's step): the finished
    file `path` in the store's filesystem (e.g. under the step's scratch), of `size` bytes and
    digest `sha256`. The commit copies it into the artifact inside the store."""
    with open(staged / IN_STORE, "a") as f:  # one line a file
        f.write(json.dumps({"name": name, "path": path, "size": size, "sha256": sha256}) + "\n")


def staged_in_store(staged: Path) -> dict[str, dict]:
    """The files `stage_in_store` added to `staged`: name -> path, size and sha256."""
    try:
        lines = (staged / IN_STORE).read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {entry.pop("name"): entry for entry in map(json.loads, lines)}


def _put_if_absent(uri: str, path: str, body: bytes) -> bool:
    """Writes the object at `path` (``bucket/key``) of the S3 store `uri` only if there is
    none yet: S3's conditional put (``If-None-Match: *``), so of two writers of one manifest
    exactly one wins. Returns False when another object was there first."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{redact(uri)}: commits need an atomic create; only s3:// has one")
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise StoreError(
            "an s3:// store commits its manifests with a conditional put, which needs boto3: "
            "pip install 'twostage[s3]'"
        ) from None
    rest, _, query = uri[len("s3://") :].partition("?")
    options = {k: unquote(v) for k, v in (i.partition("=")[::2] for i in query.split("&") if i)}
    creds, _, _ = rest.partition("/")[0].rpartition("@")
    access, _, secret = (unquote(part) for part in creds.partition(":"))
    endpoint = options.get("endpoint_override")
    client = boto3.client(
        "s3",
        endpoint_url=f"{options.get('scheme', 'https')}://{endpoint}" if endpoint else None,
        region_name=options.get("region") or None,
        aws_access_key_id=access or options.get("access_key") or None,
        aws_secret_access_key=secret or options.get("secret_key") or None,
        aws_session_token=options.get("session_token") or None,
    )
    bucket, _, key = path.partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return False
        raise StoreError(f"{redact(uri)}: cannot write {key} ({e})") from None
    return True


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def sync_tree(directory: Path) -> None:
    """fsyncs every file under `directory`, then the directories themselves."""
    for path in sorted(directory.rglob("*"), key=lambda p: p.is_dir()):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            sync_directory(path)
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    """fsyncs a directory's entries (a rename in it, a new file), where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open directories
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def check_in_process(workers: int, what: str, location: str) -> None:
    """ValueError when in-process training (``workers`` 0), whose checkpoints live in a local
    directory, would keep them at `location` (`what`, e.g. "the store") on an object store."""
    if workers == 0 and "://" in location:
        raise ValueError(
            f"train.workers: 0 trains in process with checkpoints in a local directory, but "
            f"{what} is {redact(location.split('?')[0])}; use workers >= 1 (Ray Train)"
        )
