"""Stage 1 on the full MNIST of ../shared (70k images, padded to 32x32), through the real pipeline.

Runs a two-step pipeline (ingest with the ``mnist`` source, then train_autoencoder: a
two-level VQ-VAE-2 with the paper's 512 codes per level, the stage's default widths) on a
temporary store and records what the trained artifact reports: val MSE / PSNR and per-level
codebook usage and perplexity over the val split, and training throughput. Usage above 50% on
every level is the target. (The demo's config trains a smaller VQ-VAE-2, 64 codes per level.)

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


def _pipeline(mnist: Path, steps: int) -> dict:
    """The stage-1 pipeline (JSON is YAML): full MNIST padded to 32x32, VQ-VAE-2 with 512 codes."""
    model = {"family": "vqvae2", "in_channels": 1, "levels": 2, "codebook_size": 512}
    train = {"steps": steps, "batch_size": 32, "lr": 3.0e-4, "checkpoint_every": 500}
    return {
        "name": "mnist_vqvae2_stage1",
        "steps": {
            "data": {
                "stage": "ingest",
                "source": {"kind": "mnist", "path": str(mnist)},
                "image_size": 32,
            },
            "vqvae": {
                "stage": "train_autoencoder",
                "inputs": {"images": "data"},
                "model": model,
                "train": {**train, "log_every": 100},
            },
        },
    }


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--steps", type=int, default=2000)
    args, _ = parser.parse_known_args()
    if not (Path(args.mnist) / "train-images-idx3-ubyte.gz").is_file():
        print(f"skipped: no MNIST IDX files in {args.mnist}")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Path(tmp) / "mnist_vqvae2_stage1.yaml"
        pipeline.write_text(json.dumps(_pipeline(Path(args.mnist).resolve(), args.steps)))
        cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(pipeline),
            "--store",
            f"{tmp}/store",
            "--json",
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
