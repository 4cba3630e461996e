"""Stage 1 on the full MNIST of ../shared (70k images, padded to 32x32), through the real pipeline.

Runs ``configs/mnist_vqvae2.yaml`` with the ``mnist`` source on a temporary store and records
what the trained artifact reports: val MSE / PSNR and per-level codebook usage and perplexity
over the val split, and training throughput. Usage above 50% on every level is the target.

    python -m bench.mnist_vqvae2 [--mnist ../shared/data/mnist] [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, write

REPO = Path(__file__).resolve().parent.parent


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--steps", type=int, default=2000)
    args, _ = parser.parse_known_args()
    if not (Path(args.mnist) / "train-images-idx3-ubyte.gz").is_file():
        print(f"skipped: no MNIST IDX files in {args.mnist}")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(REPO / "configs/mnist_vqvae2.yaml"),
            "--store",
            f"{tmp}/store",
            "--json",
            "--set",
            "steps.data.source.kind=mnist",
            "--set",
            f"steps.data.source.path={Path(args.mnist).resolve()}",
            "--set",
            f"steps.vqvae.train.steps={args.steps}",
            "--set",
            f"runs_dir={tmp}/runs",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"pipeline failed with exit status {proc.returncode}")
        summary = json.loads(proc.stdout)
        run_dir = Path(summary["run_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        vq = metrics["vqvae"]
        figures = {
            "machine": machine(),
            "command": " ".join(cmd[1:]),
            "wall_seconds": round(seconds, 1),
            "images": metrics["data"]["splits"],
            "steps": vq["step"],
            "val_mse": vq["val_mse"],
            "val_psnr": vq["val_psnr"],
            "val_usage": {k.split("/")[1]: v for k, v in vq.items() if k.startswith("val_usage/")},
            "val_perplexity": {
                k.split("/")[1]: v for k, v in vq.items() if k.startswith("val_perplexity/")
            },
            "train_img_s": vq["train_images_per_s"],
            "bf16": vq["bf16"],
            "stage_seconds": {s["name"]: s["seconds"] for s in summary["stages"]},
            "usage_above_50_percent_on_every_level": all(
                v > 0.5 for k, v in vq.items() if k.startswith("val_usage/")
            ),
        }
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "mnist_vqvae2_reconstructions.png").write_bytes(
            (run_dir / "reconstructions.png").read_bytes()
        )
    print(json.dumps({k: v for k, v in figures.items() if k != "machine"}, indent=2))
    write("mnist_vqvae2", figures)
    return figures


if __name__ == "__main__":
    main()
