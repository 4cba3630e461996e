"""Stage-1 training, streamed, against the in-memory loop it replaced, on the embedded MNIST.

The train_autoencoder stage streams its batches from the image table (Ray Data reads of row
groups in a shuffled order, a local shuffle buffer; `stages.formats.image_stream`). Streaming
must not slow the small case down, so on the demo's VQ-VAE-2 (32px, batch 32):

- ``in_memory``: the loop the stage had before streaming (`_in_memory_loop`): the whole train
  split read into one uint8 tensor, each batch drawn with ``torch.randint``, the same model,
  optimizer, precision and memory format, and the same step: the loss checked finite, the
  gradient norm clipped (the stage's default ``grad_clip``) and checked, as the stage had then
  and has now, so the two differ only in where the batches come from; launched through the
  stage's own harness
  (`stages.training.harness.launch`), so it gets the same process, threads and Ray Train
  worker as the stage;
- ``streamed``: the stage itself through the pipeline runner; its ``train_images_per_s``.

Each is measured in-process (``workers: 0``) and on one Ray Train worker (the demo's default).
Rates leave out the first log window (warm-up); repeats alternate, medians quoted.

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
    parser.add_argument("--repeats", type=int, default=3)
    args, _ = parser.parse_known_args()
    import ray

    from pipeline.runner import run_pipeline
    from pipeline.spec import parse_pipeline

    figures: dict = {"machine": machine(), "steps": args.steps, "batch_size": BATCH}
    rates: dict[str, list[float]] = {
        f"{how}_{where}": [] for how in ("in_memory", "streamed") for where in ("in_process", "ray")
    }
    with tempfile.TemporaryDirectory(prefix="twostage-bench-") as tmp:
        store = str(Path(tmp) / "store")

        def stage(workers: int, seed: int) -> float:
            result = run_pipeline(parse_pipeline(_pipeline(store, args.steps, workers, seed)), -1)
            assert result.ok, [s.error for s in result.steps]
            (vqvae,) = [s for s in result.steps if s.name == "vqvae"]
            return vqvae.metrics["train_images_per_s"]

        ray.init(include_dashboard=False, logging_level="WARNING")
        stage(0, 999)  # ingest, and Ray and torch warm
        (data,) = _store(store).list("ingest")
        images_ref = {"store": store, "stage": "ingest", "key": data.key}
        for repeat in range(args.repeats):
            for workers, where in ((0, "in_process"), (1, "ray")):
                scratch = str(Path(tmp) / f"scratch-{repeat}-{workers}")
                rates[f"in_memory_{where}"].append(
                    _in_memory_rate(images_ref, args.steps, workers, scratch)
                )
                rates[f"streamed_{where}"].append(stage(workers, repeat))
            print({k: round(v[-1]) for k, v in rates.items()}, flush=True)
        ray.shutdown()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    figures["images_per_s"] = {k: round(v, 1) for k, v in medians.items()}
    figures["runs"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    for where in ("in_process", "ray"):
        ratio = medians[f"streamed_{where}"] / medians[f"in_memory_{where}"]
        figures[f"streamed_vs_in_memory_{where}"] = round(ratio, 3)
    figures["target"] = "streamed >= 0.9 x in_memory"
    figures["meets_target"] = all(
        figures[f"streamed_vs_in_memory_{w}"] >= 0.9 for w in ("in_process", "ray")
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


def _store(uri: str):
    from pipeline.store import Store

    return Store(uri)


def _in_memory_rate(images_ref: dict, steps: int, workers: int, scratch: str) -> float:
    from stages.training.harness import launch

    with tempfile.TemporaryDirectory(prefix="twostage-final-") as final:
        _, metrics = launch(
            _in_memory_loop,
            {"images": images_ref, "steps": steps},
            workers=workers,
            cpus_per_worker=os.cpu_count(),  # what the stage's worker gets on one node
            device="cpu",
            scratch=scratch,
            final=Path(final),
        )
    return metrics["images_per_s"]


def _in_memory_loop(loop_config: dict, session) -> dict:
    """The pre-streaming loop: random batches from a tensor holding the whole train split."""
    from models.families import build
    from models.vqvae2 import VQVAE2Config
    from stages.formats.images import read_image_table
    from stages.formats.pixels import to_signed
    from stages.training import loop
    from stages.training.harness import use_bf16

    ref, steps = loop_config["images"], loop_config["steps"]
    torch.set_num_threads(max(1, session.cpus))
    artifact = _store(ref["store"]).open(ref["stage"], ref["key"])
    images = torch.from_numpy(read_image_table(artifact, splits=("train",)).images)
    torch.manual_seed(0)
    model = build(VQVAE2Config(**{k: v for k, v in MODEL.items() if k != "family"}))
    model = model.to(memory_format=torch.channels_last)
    wrapped = session.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = session.device
    bf16 = use_bf16("auto", device)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(steps):
        if step == LOG_EVERY:  # the first log window is warm-up, as in the stage's figure
            start = time.perf_counter()
        index = torch.randint(len(images), (BATCH,), generator=generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = wrapped(to_signed(images[index], device, True))["loss"]
        loop.check_finite(loss, step, {}, "")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.clip_and_step(optimizer, model.parameters(), loop.TrainConfig().grad_clip, step, "")
    metrics = {
        "step": steps,
        "images_per_s": (steps - LOG_EVERY) * BATCH / (time.perf_counter() - start),
    }
    loop.save_checkpoint(session, model, {"step": steps}, [], metrics)
    return metrics


if __name__ == "__main__":
    main()
