"""Ingest, train and encode of N and 4N JPEGs at 256 px: peak memory and rate against bare PIL.

On a generated image folder of N (default 12,000) and 4N distinct JPEGs (quality 90, 10 class
folders, some 320x256 and 256x320 that ingest crops), each size in one go:

- ``pil``: the in-run reference, a bare ``multiprocessing.Pool(os.cpu_count())`` loop over the
  same files: open, RGB, centre crop to a square, bilinear resize to 256x256, ``np.asarray``;
- ``ingest``, ``train`` (36 steps of 8), ``encode`` (the val split, 5%: a 2-core host encodes
  256px images at tens per second): the three stages through the real CLI (``twostage run
  --json -q``), one process per stage (the earlier steps cached), each with its own peak memory:
  the PSS of the whole process tree (the CLI, Ray's GCS, raylet and workers) sampled every
  0.2 s from /proc (less often where a sample costs more than 10% of a core), so Ray's shared
  object store counts once; plus the largest single process;
- ``rate``: ingest's images/s, measured apart: the ingest run again with no sampler, between
  two runs of the bare loop (their mean is the reference of ``ingest_vs_pil``: a shared VM's
  speed drifts within minutes); ``ingest_sampled_vs_pil`` is the sampled run's;
- at N only: a plain ``pyarrow.parquet.read_table`` of the image table (past 2 GiB of pixels);
- ``store_cost``: at each size, ingest's decode alone against a decode task's whole work
  (decode, Parquet with page checksums, sha256) on the same images, one process per core as
  the bare loop: the ceiling that storing puts on ingest against a loop that only decodes;
  ``store_breakdown_us``: where it goes, CPU microseconds per image in one process (decode;
  Parquet encode, page checksums, sha256, write);
- ``photos``: N/2 JPEGs of ImageNet's common sizes (500x375, 640x480, ...), ingest and the
  bare loop only: a larger JPEG costs more to decode while storing its 256px image costs the
  same, so this ratio is the one an ImageNet-like folder sees.

Acceptance: peak memory at 4N is at most 1.25x that at N for every stage (memory does not grow
with the data), and ingest reaches 0.8x the bare PIL rate on the same cores.

    python -m bench.data_scale [--n 12000] [--factor 4] [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from bench.common import machine, write

RESIZE = "center_crop"  # ingest's crop option, as the bare PIL loop does it
SIDE = 256
CLASSES = 10
# (width, height) of the generated images, by index: mostly square, some to be cropped
SHAPES = ((256, 256), (256, 256), (256, 256), (320, 256), (256, 320))
# ImageNet's common photo sizes, for a second, smaller folder (ingest and bare PIL only): the
# decode of a larger JPEG costs more while storing a 256px image costs the same, so the ratio
# of ingest to the bare loop depends on the sources' size
PHOTO_SHAPES = ((500, 375), (375, 500), (500, 333), (640, 480))
ENCODE_BATCH = 64  # the default 512 at 256 px holds GBs of activations: not what is measured
# encode streams the val split only (5% of the images): a 2-core host encodes 256px images at
# tens per second, so all 60,000 would take hours; its memory is measured on a stream all the
# same (the val files of the table), and the train split's stream is what training measures
VAL_FRACTION = 0.05
SAMPLE_S = 0.2  # seconds between memory samples, at least
# PSS costs the kernel a page-table walk per process (~1 ms a Ray worker, ~9 ms a process with
# torch loaded): the sampler waits longer when needed to stay under this share of one core,
# so that it does not slow the stages it measures on a small machine
SAMPLER_CPU_SHARE = 0.1
MAX_MEMORY_RATIO = 1.25
MIN_INGEST_VS_PIL = 0.8


# ----- the image folder -----------------------------------------------------------------------


def _image_path(root: Path, i: int) -> Path:
    return root / f"class_{i % CLASSES:02d}" / f"{i}.jpg"


def _make_image(task: tuple[str, int, tuple]) -> None:
    """Writes image `i` of one of `shapes`: a smooth random colour field, a few ellipses and
    pixel noise."""
    root, i, shapes = task
    rng = np.random.default_rng(i)
    width, height = shapes[i % len(shapes)]
    grid = rng.integers(0, 256, (rng.integers(2, 9), rng.integers(2, 9), 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        rx, ry = (int(r) for r in rng.integers(10, 80, size=2))
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=tuple(rng.integers(0, 256, 3).tolist()))
    noise = rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
    path = _image_path(Path(root), i)
    # written under another name first: an interrupted run leaves no truncated JPEG behind
    tmp = path.with_suffix(".tmp")
    Image.fromarray(pixels).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


def _count_images(root: Path) -> int:
    return sum(1 for _ in root.glob("*/*.jpg")) if root.is_dir() else 0


def make_folder(root: Path, count: int, shapes: tuple = SHAPES) -> None:
    """Generates images 0..count-1 of `shapes` under `root` in parallel; files already there
    are kept."""
    if _count_images(root) == count:
        print(f"reusing {root} ({count} images)", flush=True)
        return
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    todo = [(str(root), i, shapes) for i in range(count) if not _image_path(root, i).is_file()]
    print(f"generating {len(todo)} of {count} JPEGs in {root}", flush=True)
    start, step = time.perf_counter(), max(1, len(todo) // 10)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        for done, _ in enumerate(pool.imap_unordered(_make_image, todo, chunksize=64), 1):
            if done % step == 0 or done == len(todo):
                print(f"  {done}/{len(todo)} ({time.perf_counter() - start:.0f}s)", flush=True)


def link_folder(source: Path, root: Path, count: int) -> None:
    """Makes `root` hold the first `count` images of `source` as hard links."""
    if _count_images(root) == count:
        print(f"reusing {root} ({count} images)", flush=True)
        return
    shutil.rmtree(root, ignore_errors=True)
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir(parents=True)
    for i in range(count):
        os.link(_image_path(source, i), _image_path(root, i))
    print(f"linked the first {count} images of {source} into {root}", flush=True)


# ----- the bare PIL reference -----------------------------------------------------------------


def _pil_load(path: str) -> int:
    """Decodes, centre-crops and resizes one image as ingest does; returns one byte of it."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((SIDE, SIDE), Image.BILINEAR)
        return int(np.asarray(image)[SIDE // 2, SIDE // 2, 0])


def pil_rate(root: Path) -> dict:
    """Images/s of the bare PIL loop over every image of `root` on all cores."""
    files = sorted(str(p) for p in root.glob("*/*.jpg"))
    print(f"bare PIL: {len(files)} images on {os.cpu_count()} processes", flush=True)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        start = time.perf_counter()
        checksum = sum(pool.imap_unordered(_pil_load, files, chunksize=64))
        seconds = time.perf_counter() - start
    print(f"  {len(files) / seconds:.0f} images/s ({seconds:.1f}s)", flush=True)
    return {
        "images": len(files),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(files) / seconds, 1),
        "checksum": checksum,
    }


def disk_write_rate(out: Path, megabytes: int = 1024) -> float:
    """MB/s of a plain sequential write of `megabytes` to `out`'s disk, synced: the ceiling
    of any ingest that stores the pixels there (the bare PIL loop writes nothing)."""
    block = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
    path = out / "disk-write-test.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    print(f"disk: {megabytes / seconds:.0f} MB/s sequential write, synced", flush=True)
    return megabytes * 2**20 / 1e6 / seconds


# ----- memory of a process tree ---------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process now running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # gone since the listing
            continue
        # the command name may hold spaces and parentheses: the fields start after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(root: int) -> list[int]:
    children, pids = _children(), [root]
    for pid in pids:  # grows while it is walked: breadth first
        pids.extend(children.get(pid, []))
    return pids


def _memory_kb(pid: int) -> int:
    """PSS of one process in KiB (VmRSS where smaps_rollup cannot be read); 0 if it is gone."""
    for path, field in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            for line in open(path):
                if line.startswith(field):
                    return int(line.split()[1])
        except OSError:
            continue
    return 0


def run_sampled(command: list[str], stdout: Path, env: dict) -> dict:
    """Runs `command` (stdout to a file) and samples its tree's memory; returns the peaks."""
    peak_tree = peak_process = peak_pids = samples = 0
    cpu = time.process_time()
    with open(stdout, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, env=env)
        while proc.poll() is None:
            took, used = time.perf_counter(), time.process_time()
            sizes = [_memory_kb(pid) for pid in _tree(proc.pid)]
            peak_tree = max(peak_tree, sum(sizes))
            peak_process = max(peak_process, max(sizes))
            peak_pids = max(peak_pids, len(sizes))
            samples += 1
            # the sample's CPU time (the kernel's page walks are this process's system time)
            took, used = time.perf_counter() - took, time.process_time() - used
            time.sleep(max(0.0, max(SAMPLE_S, used / SAMPLER_CPU_SHARE) - took))
        wall = time.perf_counter() - start
    return {
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_tree_mib": round(peak_tree / 1024, 1),
        "peak_process_mib": round(peak_process / 1024, 1),
        "peak_processes": peak_pids,
        "samples": samples,
        "sample_every_s": round(wall / max(samples, 1), 2),
        "sampler_cpu_s": round(time.process_time() - cpu, 2),
    }


# ----- the pipeline ---------------------------------------------------------------------------


def pipeline_steps(folder: Path) -> dict:
    return {
        "data": {
            "stage": "ingest",
            "source": {"kind": "image_folder", "path": str(folder)},
            "image_size": SIDE,
            "resize": RESIZE,
            "channels": 3,
            "val_fraction": VAL_FRACTION,
        },
        "vqvae": {
            "stage": "train_autoencoder",
            "inputs": {"images": "data"},
            "model": {
                "family": "vqvae2",
                "image_size": SIDE,
                "in_channels": 3,
                "channels": 64,
                "res_blocks": 1,
                "res_channels": 32,
                "embed_dim": 64,
                "codebook_size": 512,
                "bottom_stride": 4,
            },
            "train": {
                "steps": 36,
                "batch_size": 8,
                "checkpoint_every": 36,
                "log_every": 12,
                "workers": 0,
                "val_images": 64,
            },
        },
        "codes": {
            "stage": "encode",
            "inputs": {"autoencoder": "vqvae", "images": "data"},
            "batch_size": ENCODE_BATCH,
            "splits": ["val"],
        },
    }


def stage_figures(store, step: dict, sampled: dict) -> dict:
    """One stage's figures from its --json summary entry, its artifact and its memory peaks."""
    artifact = store.open(step["stage"], step["key"])
    metrics, seconds = artifact.metrics, step["seconds"]
    images = metrics.get("images")
    if step["stage"] == "ingest":
        rate = images / seconds
    elif step["stage"] == "train_autoencoder":
        train = artifact.config["train"]
        rate = metrics.get("train_images_per_s") or train["steps"] * train["batch_size"] / seconds
    else:
        rate = metrics["images_per_s"]
    return {
        "key": step["key"],
        "stage_s": round(seconds, 2),
        **sampled,
        "images": images,
        "images_per_s": round(rate, 1),
        "bytes_written": sum(f["size"] for f in artifact.files.values()),
    }


def _run_step(
    out: Path, tag: str, store_dir: Path, steps: dict, name: str, sample: bool = True
) -> tuple[dict, dict]:
    """Runs the pipeline of `steps` (those before `name` cached in `store_dir`) through the
    CLI, its memory sampled when `sample`; returns (step `name`'s --json summary entry, the
    sampler's figures)."""
    config = out / f"data_scale_{tag}.yaml"
    spec = {
        "name": "data_scale",
        "store": str(store_dir),
        "runs_dir": str(out / "runs"),
        "ray": {"address": None},
        "steps": steps,
    }
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    twostage = str(Path(sys.executable).parent / "twostage")
    command = [twostage, "run", str(config), "--json", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    summary_path = out / f"summary_{tag}.json"
    if sample:
        sampled = run_sampled(command, summary_path, env)
    else:
        with open(summary_path, "w") as stdout:
            sampled = {"returncode": subprocess.run(command, stdout=stdout, env=env).returncode}
    if sampled["returncode"] != 0:
        raise RuntimeError(f"twostage run {config} failed: see its output above")
    summary = json.loads(summary_path.read_text())
    step = next(s for s in summary["stages"] if s["name"] == name)
    if step["status"] != "ran":
        raise RuntimeError(f"step {name!r} was {step['status']}, not ran: no figures")
    return step, sampled


def ingest_rate(out: Path, folder: Path) -> dict:
    """Ingest's images/s against the bare PIL loop, measured apart from the memory figures:
    the ingest through the CLI with no sampler (on 2 cores it costs 5-10%), into a store of
    its own, between two runs of the bare loop, whose mean is the reference (a shared VM's
    speed drifts by tens of percent within minutes)."""
    from pipeline.store import Store

    before = pil_rate(folder)
    store_dir = out / f"store_{folder.name}_rate"
    shutil.rmtree(store_dir, ignore_errors=True)
    print(f"twostage run: step 'data' on {folder.name}, not sampled", flush=True)
    steps = {"data": pipeline_steps(folder)["data"]}
    step, _ = _run_step(out, f"{folder.name}_rate", store_dir, steps, "data", sample=False)
    images = Store(str(store_dir)).open("ingest", step["key"]).metrics["images"]
    shutil.rmtree(store_dir, ignore_errors=True)
    after = pil_rate(folder)
    rate = images / step["seconds"]
    pil = (before["images_per_s"] + after["images_per_s"]) / 2
    print(f"  ingest {rate:.0f} images/s, bare PIL {pil:.0f}: {rate / pil:.2f}", flush=True)
    return {
        "images": images,
        "stage_s": step["seconds"],
        "images_per_s": round(rate, 1),
        "pil_before": before,
        "pil_after": after,
        "pil_images_per_s": round(pil, 1),
        "ingest_vs_pil": round(rate / pil, 3),
    }


def run_pipeline(out: Path, n: int, folder: Path, ingest_only: bool = False) -> dict:
    """Runs ingest, train and encode (or ingest alone) on `folder`, one CLI process each;
    returns their figures."""
    from pipeline.store import Store

    store_dir = out / f"store_{folder.name}"
    shutil.rmtree(store_dir, ignore_errors=True)  # every stage must run, not come from a cache
    steps = pipeline_steps(folder)
    if ingest_only:
        steps = {"data": steps["data"]}
    figures = {}
    for count, name in enumerate(steps, 1):
        print(f"twostage run: step {name!r} on {n} images", flush=True)
        step, sampled = _run_step(
            out, f"{folder.name}_{count}", store_dir, dict(list(steps.items())[:count]), name
        )
        figures[step["stage"]] = stage_figures(Store(str(store_dir)), step, sampled)
        f = figures[step["stage"]]
        print(
            f"  {f['stage_s']:.1f}s, {f['images_per_s']:.0f} images/s, "
            f"peak {f['peak_tree_mib']:.0f} MiB (tree)",
            flush=True,
        )
    if ingest_only:
        return figures
    ingest = Store(str(store_dir)).open("ingest", figures["ingest"]["key"])
    images = ingest.metrics["images"]
    pixel_bytes = images * SIDE * SIDE * 3
    figures["image_table"] = {
        "images": images,
        "pixel_bytes": pixel_bytes,
        "over_2gib": pixel_bytes > 2**31,
    }
    return figures


def read_check(out: Path, n: int, key: str) -> dict:
    """Reads the image table with plain pyarrow: row count and the first image's size."""
    import pyarrow.parquet as pq

    from pipeline.store import Store

    artifact = Store(str(out / f"store_images_{n}")).open("ingest", key)
    paths = [artifact.fs_path(f) for f in sorted(artifact.files) if f.endswith(".parquet")]
    print(f"pyarrow read_table of {len(paths)} Parquet files", flush=True)
    start = time.perf_counter()
    try:
        table = pq.read_table(paths, columns=["id", "split", "image"])
        rows, first = table.num_rows, len(table.column("image")[0].as_py())
        ok, error = rows == artifact.metrics["images"] and first == SIDE * SIDE * 3, None
        del table
    except Exception as e:  # the failure is the figure
        rows, first, ok, error = None, None, False, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    print(f"  ok={ok} rows={rows} ({seconds:.1f}s){' ' + error if error else ''}", flush=True)
    return {
        "ok": ok,
        "seconds": round(seconds, 2),
        "rows": rows,
        "first_image_bytes": first,
        "error": error,
    }


def _store_cost_slice(task: tuple[str, int, int, int]) -> tuple[float, float]:
    """One process's share of `store_cost`: (decode seconds, decode-and-store seconds) over
    `parts` parts of `rows_per_part` images from image `first` on."""
    import pyarrow.fs as pafs

    from stages.formats.images import ImageTableMeta, group_rows
    from stages.sources import image_folder

    root, first, rows_per_part, parts = task
    fs = pafs.LocalFileSystem()
    rows, classes, _ = image_folder.list_images(fs, root, 0, VAL_FRACTION)
    meta = ImageTableMeta(height=SIDE, width=SIDE, channels=3, class_names=classes)
    group, problems = group_rows(meta), []
    decode_s = part_s = 0.0
    for p in range(parts + 1):  # the first part warms the buffers and the file cache
        start_row = first + p * rows_per_part
        part = rows[start_row : start_row + rows_per_part]
        start = time.perf_counter()
        for g in range(0, len(part), group):
            image_folder._decode_rows(part[g : g + group], fs, meta, RESIZE, "pixels", problems)
        middle = time.perf_counter()
        image_folder.decode_part(part, fs, meta, RESIZE, len(part) // 4)
        if p:
            decode_s += middle - start
            part_s += time.perf_counter() - middle
    return decode_s, part_s


def store_cost(root: Path, rows_per_part: int = 682, parts: int = 3) -> dict:
    """What storing costs next to decoding, on all cores as the bare loop runs (one process
    each, on images of its own): the seconds of ingest's decode (`_decode_rows`, a row group
    at a time, as a task does it) against a whole decode task's work (`decode_part`: decode,
    then Parquet with page checksums and the file's sha256; in memory, so without the disk).
    On the same cores, ingest can reach at most ``decode_s / part_s`` of a loop that only
    decodes."""
    processes = os.cpu_count() or 1
    count = _count_images(root)
    rows_per_part = min(rows_per_part, count // (processes * (parts + 1)))
    span = rows_per_part * (parts + 1)
    tasks = [(str(root), i * span, rows_per_part, parts) for i in range(processes)]
    with multiprocessing.Pool(processes) as pool:
        shares = pool.map(_store_cost_slice, tasks)
    decode_s = sum(d for d, _ in shares)
    part_s = sum(p for _, p in shares)
    figures = {
        "images": processes * parts * rows_per_part,
        "processes": processes,
        "rows_per_part": rows_per_part,
        "decode_s": round(decode_s, 3),
        "decode_and_store_s": round(part_s, 3),
        "ceiling_vs_pil": round(decode_s / part_s, 3),
    }
    print(
        f"store cost: decode {decode_s:.2f}s, decode and store {part_s:.2f}s of "
        f"{figures['images']} images in {processes} processes: ingest can reach "
        f"{decode_s / part_s:.2f} of bare PIL",
        flush=True,
    )
    return figures


def store_breakdown(root: Path, out: Path, rows: int = 680) -> dict:
    """Where `store_cost`'s ceiling comes from: CPU microseconds per image of each piece of a
    decode task's work on `rows` images of `root`, in this process, best of three: ingest's
    decode, then the storing of its pixels: the Parquet encode (without page checksums), the
    page checksums on top of it, the file's sha256, and writing the file (`NewFile`, past the
    page cache, unhashed) into `out`."""
    import hashlib

    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.store import NewFile
    from stages.formats.images import (
        ImageTableMeta,
        group_rows,
        parquet_writer,
        table_schema,
        to_arrow,
    )
    from stages.sources import image_folder

    fs = pafs.LocalFileSystem()
    listed, classes, _ = image_folder.list_images(fs, str(root), 0, VAL_FRACTION)
    listed = listed[:rows]
    meta = ImageTableMeta(height=SIDE, width=SIDE, channels=3, class_names=classes)
    schema, group, problems = table_schema(meta), group_rows(meta), []
    starts = range(0, len(listed), group)

    def decode() -> list:
        return [
            image_folder._decode_rows(listed[g : g + group], fs, meta, RESIZE, f"b{g}", problems)
            for g in starts
        ]

    def best(work) -> float:
        times = []
        for _ in range(3):
            start = time.process_time()
            work()
            times.append(time.process_time() - start)
        return min(times) * 1e6 / len(listed)

    decode()  # warms the buffers and the file cache
    tables = [to_arrow(t, schema) for t in decode()]
    buffer = np.empty(sum(t.nbytes for t in tables) + (64 << 20), np.uint8)

    def encode(checksums: bool) -> int:
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(buffer))
        writer = parquet_writer(sink, schema, "none", page_checksums=checksums)
        for table in tables:
            writer.write_table(table, row_group_size=group)
        writer.close()
        return sink.tell()

    data = buffer[: encode(True)].copy()  # the file the last two pieces hash and write
    path = out / "store_breakdown.parquet"

    def write() -> None:
        path.unlink(missing_ok=True)
        file = NewFile(path, hashed=False)
        file.write(data)
        file.close()

    plain = best(lambda: encode(False))
    figures = {
        "images": len(listed),
        "decode": best(decode),
        "parquet": plain,
        "page_checksums": best(lambda: encode(True)) - plain,
        "sha256": best(lambda: hashlib.sha256(data).digest()),
        "write": best(write),
    }
    path.unlink(missing_ok=True)
    figures = {k: round(v, 1) for k, v in figures.items()}
    stored = sum(figures[k] for k in ("parquet", "page_checksums", "sha256", "write"))
    print(
        f"per image, CPU: decode {figures['decode']:.0f} us; storing {stored:.0f} us: Parquet "
        f"{figures['parquet']:.0f}, page checksums {figures['page_checksums']:.0f}, sha256 "
        f"{figures['sha256']:.0f}, write {figures['write']:.0f}",
        flush=True,
    )
    return figures


# ----- main -----------------------------------------------------------------------------------


def _print_table(figures: dict, sizes: list[int]) -> None:
    # stage s: the step alone; wall s: its whole CLI process, Ray's start and stop included
    print(f"\n{'images':<8}{'stage':<20}{'peak MiB':>10}{'stage s':>9}{'wall s':>9}", end="")
    print(f"{'img/s':>9}{'written MB':>12}")

    def pil_row(images, name: str, pil: dict) -> None:
        print(f"{images:<8}{name:<20}{'':>10}{pil['seconds']:>9.1f}{'':>9}", end="")
        print(f"{pil['images_per_s']:>9.0f}")

    def stage_row(name: str, f: dict) -> None:
        print(
            f"{'':<8}{name:<20}{f['peak_tree_mib']:>10.0f}{f['stage_s']:>9.1f}"
            f"{f['wall_s']:>9.1f}{f['images_per_s']:>9.1f}{f['bytes_written'] / 1e6:>12.1f}"
        )

    def rate_row(name: str, rate: dict) -> None:
        print(f"{'':<8}{name:<20}{'':>10}{rate['stage_s']:>9.1f}{'':>9}", end="")
        print(f"{rate['images_per_s']:>9.1f}   (bare PIL {rate['pil_images_per_s']:.0f} around it)")

    for n in sizes:
        run = figures["sizes"][str(n)]
        pil_row(n, "bare PIL", run["pil"])
        for stage in ("ingest", "train_autoencoder", "encode"):
            stage_row(stage, run[stage])
        rate_row("ingest, unsampled", run["rate"])
    photos = figures["photos"]
    pil_row(photos["pil"]["images"], "bare PIL (photos)", photos["pil"])
    stage_row("ingest (photos)", photos["ingest"])
    rate_row("ingest, unsampled", photos["rate"])
    print()
    for name, value in figures["ratios"].items():
        print(f"{name:<48}{value}")
    print(json.dumps(figures["accept"], indent=2))


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=12000, help="images of the smaller run")
    parser.add_argument("--factor", type=int, default=4, help="the larger run has n * factor")
    parser.add_argument("--out", help="data and stores here, kept (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the default temp dir")
    args, _ = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="data_scale-", dir="/tmp")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = [args.n, args.n * args.factor]
    figures = {"machine": machine(), "n": args.n, "factor": args.factor, "resize": RESIZE}
    try:
        # one folder of the larger size; the smaller is hard links to its first images
        make_folder(out / f"images_{sizes[1]}", sizes[1])
        link_folder(out / f"images_{sizes[1]}", out / f"images_{sizes[0]}", sizes[0])
        figures["sizes"] = {}
        for n in sizes:
            folder = out / f"images_{n}"
            run = {"pil": pil_rate(folder), **run_pipeline(out, n, folder)}
            run["rate"] = ingest_rate(out, folder)
            run["store_cost"] = store_cost(folder)
            run["store_breakdown_us"] = store_breakdown(folder, out)
            disk = disk_write_rate(out)
            run["disk_write_mb_s"] = round(disk, 1)
            # the rate at which the disk alone could take the table's pixels
            run["disk_ceiling_images_per_s"] = round(disk * 1e6 / (SIDE * SIDE * 3), 1)
            if n == sizes[0]:
                run["read_table"] = read_check(out, n, run["ingest"]["key"])
            figures["sizes"][str(n)] = run
        # photo-sized sources (ingest and bare PIL only, half of N)
        photos = out / f"photos_{args.n // 2}"
        make_folder(photos, args.n // 2, PHOTO_SHAPES)
        figures["photos"] = {
            "shapes": PHOTO_SHAPES,
            "pil": pil_rate(photos),
            **run_pipeline(out, args.n // 2, photos, ingest_only=True),
            "rate": ingest_rate(out, photos),
            "store_cost": store_cost(photos),
            "store_breakdown_us": store_breakdown(photos, out),
        }
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        else:
            print(f"kept {out}", flush=True)
    small, large = (figures["sizes"][str(n)] for n in sizes)
    ratios = {}
    for n, run in zip(sizes, (small, large), strict=True):
        ratios[f"ingest_vs_pil_{n}"] = run["rate"]["ingest_vs_pil"]
        # the same, from the run whose memory was sampled, against the bare loop before it
        ratios[f"ingest_sampled_vs_pil_{n}"] = round(
            run["ingest"]["images_per_s"] / run["pil"]["images_per_s"], 3
        )
        ceiling = min(run["rate"]["pil_images_per_s"], run["disk_ceiling_images_per_s"])
        ratios[f"ingest_vs_pil_or_disk_ceiling_{n}"] = round(
            run["rate"]["images_per_s"] / ceiling, 3
        )
        ratios[f"ingest_ceiling_from_store_cost_{n}"] = run["store_cost"]["ceiling_vs_pil"]
    photos = figures["photos"]
    ratios[f"photos_ingest_vs_pil_{args.n // 2}"] = photos["rate"]["ingest_vs_pil"]
    ratios[f"photos_ingest_sampled_vs_pil_{args.n // 2}"] = round(
        photos["ingest"]["images_per_s"] / photos["pil"]["images_per_s"], 3
    )
    ratios[f"photos_ingest_ceiling_from_store_cost_{args.n // 2}"] = photos["store_cost"][
        "ceiling_vs_pil"
    ]
    for stage in ("ingest", "train_autoencoder", "encode"):
        ratios[f"memory_{stage}_{sizes[1]}_vs_{sizes[0]}"] = round(
            large[stage]["peak_tree_mib"] / small[stage]["peak_tree_mib"], 3
        )
    figures["ratios"] = ratios
    figures["accept"] = {
        f"memory_ratio_le_{MAX_MEMORY_RATIO}": all(
            v <= MAX_MEMORY_RATIO for k, v in ratios.items() if k.startswith("memory_")
        ),
        f"ingest_ge_{MIN_INGEST_VS_PIL}_of_pil": all(
            v >= MIN_INGEST_VS_PIL
            for k, v in ratios.items()
            if k.startswith("ingest_vs_pil_") and "ceiling" not in k
        ),
        "read_table_ok": small["read_table"]["ok"],
    }
    _print_table(figures, sizes)
    write("data_scale", figures)
    return figures


if __name__ == "__main__":
    main()
