"""Encode stage end to end against the model's bare encode, shard reads, bytes per image.

On the full MNIST of ../shared (70k images padded to 32x32, 1 channel) with the reference
VQ-VAE-2 configuration (channel 128, 2 res blocks of 32, embed_dim 64, 512 codes, 2 levels):

- ``bare``: the model's ``encode_indices`` over the images already in memory as a uint8 array
  (no_grad, batch 512, same precision as the stage), the in-run reference;
- ``end_to_end``: the encode stage through the pipeline runner: image table Parquet in -> Ray
  Data actor pool -> committed, checksummed code shards (Ray Data start-up included);
- reads: `open_codes(...).to_numpy()` (checksums verified) and a Ray Data scan against a plain
  ``pyarrow.parquet.read_table`` of the same files;
- bytes per image of the shards against the reference implementation's LMDB rows (~874 B at 32px).

    python -m bench.encode_throughput [--mnist ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import machine, write

REPO = Path(__file__).resolve().parent.parent
LMDB_BYTES_PER_ROW = 874


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--train-steps", type=int, default=200)
    args, _ = parser.parse_known_args()
    if not (Path(args.mnist) / "train-images-idx3-ubyte.gz").is_file():
        print(f"skipped: no MNIST IDX files in {args.mnist}")
        return {}
    import ray

    from models.vqvae2 import VQVAE2
    from pipeline.runner import run_pipeline
    from pipeline.spec import parse_pipeline
    from pipeline.store import Store
    from stages.formats.codes import open_codes
    from stages.formats.images import read_image_table
    from stages.training.harness import pick_device, use_bf16

    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "name": "bench_encode",
            "store": f"{tmp}/store",
            "runs_dir": f"{tmp}/runs",
            "steps": {
                "data": {
                    "stage": "ingest",
                    "image_size": 32,
                    "source": {"kind": "mnist", "path": str(Path(args.mnist).resolve())},
                },
                "vqvae": {
                    "stage": "train_autoencoder",
                    "inputs": {"images": "data"},
                    "model": {"in_channels": 1},
                    "train": {
                        "steps": args.train_steps,
                        "workers": 0,
                        "checkpoint_every": args.train_steps,
                        "log_every": 100,
                    },
                },
                "codes": {"stage": "encode", "inputs": {"images": "data", "autoencoder": "vqvae"}},
            },
        }
        ray.init(include_dashboard=False, logging_level="WARNING")
        result = run_pipeline(parse_pipeline(raw))
        assert result.ok, [s.error for s in result.steps]
        steps = {s.name: s for s in result.steps}
        store = Store(f"{tmp}/store")
        encode = store.open("encode", steps["codes"].key)
        e2e = encode.metrics
        figures["end_to_end"] = {
            "images": e2e["images"],
            "stage_seconds": round(steps["codes"].seconds, 2),
            "img_s_stage": round(e2e["images"] / steps["codes"].seconds, 1),
            "img_s_streaming": round(e2e["images_per_s"], 1),
            "precision": e2e["precision"],
            "files": e2e["files"],
        }

        # bare model encode, same precision, images already in memory
        table = read_image_table(store.open("ingest", steps["data"].key))
        model_dir = (
            store.open("train_autoencoder", steps["vqvae"].key).local_path("config.json").parent
        )
        model = VQVAE2.load(model_dir).eval().to(memory_format=torch.channels_last)
        bf16 = use_bf16("auto", pick_device("auto"))
        images = table.images
        start = time.perf_counter()
        bare_codes = {}
        for i in range(0, len(images), 512):
            x = (
                torch.from_numpy(images[i : i + 512])
                .permute(0, 3, 1, 2)
                .float()
                .div_(127.5)
                .sub_(1)
            )
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                codes = model.encode_indices(x)
            if i == 0:
                bare_codes = {k: v[:4].numpy() for k, v in codes.items()}
        bare_seconds = time.perf_counter() - start
        figures["bare"] = {
            "images": len(images),
            "seconds": round(bare_seconds, 2),
            "img_s": round(len(images) / bare_seconds, 1),
        }
        figures["end_to_end_vs_bare"] = round(
            figures["end_to_end"]["img_s_stage"] / figures["bare"]["img_s"], 3
        )

        # the shards hold exactly what the model computes
        dataset = open_codes(encode, expect_autoencoder=steps["vqvae"].key)
        arrays = dataset.to_numpy()
        order = np.argsort(arrays["id"])
        first_ids = table.ids[:4]
        rows = order[np.searchsorted(arrays["id"][order], first_ids)]
        figures["codes_match_bare_encode"] = all(
            np.array_equal(arrays[level][rows], bare_codes[level]) for level in bare_codes
        )

        # reads
        paths = [dataset.artifact.fs_path(n) for n in dataset.files]
        total_bytes = sum(encode.files[n]["size"] for n in dataset.files)
        codes_per_row = sum(int(np.prod(s)) for s in dataset.meta.grid_shapes.values())

        def best_of(fn, repeats: int = 3) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        plain = pq.read_table(paths)
        reads = {
            "plain_pyarrow_read_table": best_of(lambda: pq.read_table(paths)),
            "open_codes_to_numpy_verified": best_of(lambda: open_codes(encode).to_numpy()),
            "ray_data_iter_batches": best_of(
                lambda: sum(
                    len(b["id"]) for b in dataset.to_ray_dataset().iter_batches(batch_size=4096)
                ),
                repeats=1,
            ),
        }
        figures["reads"] = {
            name: {
                "seconds": round(s, 3),
                "codes_per_s": round(plain.num_rows * codes_per_row / s),
                "mb_per_s": round(total_bytes / s / 1e6, 1),
            }
            for name, s in reads.items()
        }
        figures["shards"] = {
            "bytes": total_bytes,
            "bytes_per_image": round(total_bytes / plain.num_rows, 1),
            "reference_lmdb_bytes_per_row": LMDB_BYTES_PER_ROW,
            "ratio_to_reference": round(total_bytes / plain.num_rows / LMDB_BYTES_PER_ROW, 3),
            "codes_per_image": codes_per_row,
        }
        ray.shutdown()
    summary = {k: v for k, v in figures.items() if k != "machine"}
    import json

    print(json.dumps(summary, indent=2))
    write("encode_throughput", figures)
    return figures


if __name__ == "__main__":
    main()
