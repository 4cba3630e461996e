"""Stage-1 training, streamed, against the in-memory loop it replaced, on the embedded MNIST.

The train_autoencoder stage streams its batches from the image table (Ray Data reads of row
groups in a shuffled order, a local shuffle buffer; `stages.formats.image_stream`). Streaming
must not slow the small case down, so on the demo's VQ-VAE-2 (32px, batch 32):

- ``in_memory``: the loop the stage had before streaming, here in this process: the whole train
  split read into one uint8 tensor, each batch drawn with ``torch.randint``, the same model,
  optimizer, precision and memory format, and as many torch threads as the stage gets;
- ``streamed``: the stage itself through the pipeline runner, in-process (``workers: 0``) and
  on one Ray Train worker (the demo's default); its ``train_images_per_s`` (the mean of the
  log windows after the first).

Both rates leave out the first log window (warm-up); repeats alternate the two, medians quoted.

    python -m bench.stream_training [--steps 400] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, write

LOG_EVERY = 100
MODEL = {
    "family": "vqvae2",
    "in_channels": 1,
    "levels": 2,
    "codebook_size": 64,
    "channels": 64,
    "res_channels": 32,
}
BATCH = 32


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    args, _ = parser.parse_known_args()
    import ray

    from pipeline.runner import run_pipeline
    from pipeline.spec import parse_pipeline

    figures: dict = {"machine": machine(), "steps": args.steps, "batch_size": BATCH}
    rates: dict[str, list[float]] = {"in_memory": [], "streamed_in_process": [], "streamed_ray": []}
    with tempfile.TemporaryDirectory(prefix="twostage-bench-") as tmp:
        store = str(Path(tmp) / "store")

        def stage(workers: int, seed: int) -> float:
            result = run_pipeline(parse_pipeline(_pipeline(store, args.steps, workers, seed)), -1)
            assert result.ok, [s.error for s in result.steps]
            (vqvae,) = [s for s in result.steps if s.name == "vqvae"]
            return vqvae.metrics["train_images_per_s"]

        ray.init(include_dashboard=False, logging_level="WARNING")
        stage(0, 999)  # ingest, and Ray and torch warm
        images = _train_images(store)
        for repeat in range(args.repeats):
            rates["in_memory"].append(_in_memory_rate(images, args.steps))
            rates["streamed_in_process"].append(stage(0, repeat))
            rates["streamed_ray"].append(stage(1, repeat))
            print({k: round(v[-1]) for k, v in rates.items()}, flush=True)
        ray.shutdown()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    figures["images_per_s"] = {k: round(v, 1) for k, v in medians.items()}
    figures["runs"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    for name in ("streamed_in_process", "streamed_ray"):
        figures[f"{name}_vs_in_memory"] = round(medians[name] / medians["in_memory"], 3)
    figures["target"] = "streamed >= 0.9 x in_memory"
    figures["meets_target"] = (
        min(figures["streamed_in_process_vs_in_memory"], figures["streamed_ray_vs_in_memory"])
        >= 0.9
    )
    write("stream_training", figures)
    return figures


def _pipeline(store: str, steps: int, workers: int, seed: int) -> dict:
    return {
        "name": "bench_stream",
        "store": store,
        "ray": {"address": None},
        "steps": {
            "data": {"stage": "ingest", "source": {"kind": "embedded"}, "image_size": 32},
            "vqvae": {
                "stage": "train_autoencoder",
                "inputs": {"images": "data"},
                "model": MODEL,
                "train": {
                    "steps": steps,
                    "batch_size": BATCH,
                    "lr": 1.0e-3,
                    "checkpoint_every": steps,
                    "log_every": LOG_EVERY,
                    "val_images": 256,
                    "workers": workers,
                    "seed": seed,
                },
            },
        },
    }


def _train_images(store: str) -> torch.Tensor:
    from pipeline.store import Store
    from stages.formats.images import read_image_table

    (data,) = Store(store).list("ingest")
    table = read_image_table(data, splits=("train",))
    return torch.from_numpy(table.images)


def _in_memory_rate(images: torch.Tensor, steps: int) -> float:
    """The pre-streaming loop: random batches from a tensor holding the whole split."""
    from models.families import build
    from models.vqvae2 import VQVAE2Config
    from stages.formats.pixels import to_signed
    from stages.training.harness import use_bf16

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build(VQVAE2Config(**{k: v for k, v in MODEL.items() if k != "family"}))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    bf16 = use_bf16("auto", device)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(steps):
        if step == LOG_EVERY:  # the first log window is warm-up, as in the stage's figure
            start = time.perf_counter()
        index = torch.randint(len(images), (BATCH,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(to_signed(images[index], device, True))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(model, "advance"):
            model.advance()
    return (steps - LOG_EVERY) * BATCH / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
