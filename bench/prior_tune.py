"""A Ray Tune sweep with ASHA against the same grid run to the full budget, in one run.

``configs/prior_tune.yaml`` (depth x width x learning rate, 12 trials of the top-level prior on
the demo's code shards) runs twice on this host: with ASHA as shipped, and with
``sweep.scheduler.kind: none`` (every trial to the end). Each sweep gets its own copy of a
store that holds the demo's shards, so neither finds the other's checkpoints. Reported per
sweep: total steps trained, wall time, the best ``val_bits_per_code`` of a finished trial.
Target: ASHA within 0.05 bits of the full grid's best in at most half its steps.

    python -m bench.prior_tune [--store artifacts]

The demo's stage-1 steps run first into the given store (cached after ``make demo``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import machine, write

REPO = Path(__file__).resolve().parent.parent


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--store", default="artifacts", help="a store with (or for) the demo's shards"
    )
    args, _ = parser.parse_known_args()
    from pipeline.runner import run_pipeline
    from pipeline.spec import load_pipeline, parse_pipeline
    from pipeline.tune import grid_size, load_sweep, run_sweep

    demo = load_pipeline(REPO / "configs/mnist_vqvae2.yaml", store=args.store)
    upstream = {n: demo.raw["steps"][n] for n in ("data", "vqvae", "codes")}
    stage1 = parse_pipeline(
        {**demo.raw, "store": args.store, "steps": upstream, "tracking": "none"}
    )
    result = run_pipeline(stage1, -1)
    assert result.ok, [s.error for s in result.steps if s.error]

    figures: dict = {"machine": machine(), "sweeps": {}}
    with tempfile.TemporaryDirectory(prefix="twostage-bench-tune-") as tmp:
        for name, kind in (("full_grid", "none"), ("asha", "asha")):
            store = Path(tmp) / f"store-{name}"
            shutil.copytree(Path(args.store), store, ignore=shutil.ignore_patterns("_scratch"))
            sweep = load_sweep(
                REPO / "configs/prior_tune.yaml",
                [f"sweep.scheduler.kind={kind}", f"runs_dir={tmp}/runs-{name}"],
                store=str(store),
            )
            start = time.perf_counter()
            outcome = run_sweep(sweep, -1)
            seconds = time.perf_counter() - start
            finished = [t for t in outcome.trials if t["status"] == "finished"]
            best = min(finished, key=lambda t: t["metric"])
            figures["sweeps"][name] = {
                "trials": len(outcome.trials),
                "grid": grid_size(sweep),
                "finished": len(finished),
                "steps_trained": sum(t["steps"] for t in outcome.trials),
                "seconds": round(seconds, 1),
                "best_val_bits_per_code": best["metric"],
                "best_values": best["values"],
                "statuses": {
                    t["trial"]: [t["status"], t["steps"], t["values"]] for t in outcome.trials
                },
            }
            print(
                name,
                {k: v for k, v in figures["sweeps"][name].items() if k != "statuses"},
                flush=True,
            )
    full, asha = figures["sweeps"]["full_grid"], figures["sweeps"]["asha"]
    figures["asha_steps_fraction"] = round(asha["steps_trained"] / full["steps_trained"], 3)
    figures["asha_seconds_fraction"] = round(asha["seconds"] / full["seconds"], 3)
    figures["asha_minus_full_best_bits"] = round(
        asha["best_val_bits_per_code"] - full["best_val_bits_per_code"], 4
    )
    figures["target_met"] = (
        figures["asha_minus_full_best_bits"] <= 0.05 and figures["asha_steps_fraction"] <= 0.5
    )
    write("prior_tune", figures)
    return figures


if __name__ == "__main__":
    main()
