"""Stage 2 end to end: encode -> train_prior (per level) -> sample -> evaluate -> report.

One tiny pipeline runs once per session on local Ray (real Ray Train + Ray Data, real Parquet;
conftest's `two_stage_run`); the tests then look at its artifacts, re-sample from its priors,
and run further pipelines in a copy of its store (cached stages, a refused prior, a Tune sweep
killed and resumed).
"""

import glob
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from models.prior_sampling import fp16_weights_available
from pipeline.config import ConfigError
from pipeline.spec import load_pipeline
from pipeline.store import Store
from stages import sample, train_prior
from stages.formats.codes import CodeShardError, open_codes
from stages.sampling.priors import load_priors
from tests.helpers import (
    TINY_PRIOR,
    TWO_STAGE_BASE,
    copy_run,
    run_json,
    steps_by_name,
    tiny_vqvae_yaml,
    twostage,
    write_yaml,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_stage(two_stage_run, tmp_path_factory):
    """The session's tiny two-stage run (helpers.TWO_STAGE_PIPELINE), copied: these tests run
    further pipelines in its store."""
    run_root, summary = two_stage_run
    root = copy_run(run_root, tmp_path_factory.mktemp("two_stage") / "run")
    return root, Store(str(root / "artifacts")), steps_by_name(summary), summary


def test_pipeline_trains_priors_samples_evaluates_and_reports(two_stage):
    root, store, steps, summary = two_stage
    assert all(s["status"] == "ran" for s in steps.values())
    vqvae_key = steps["vqvae"]["key"]
    for name, level, workers in (("prior_top", "top", 1), ("prior_bottom", "bottom", 0)):
        prior = store.open("train_prior", steps[name]["key"])
        m = prior.metrics
        assert m["level"] == level and m["autoencoder_key"] == vqvae_key
        weights = store.open("train_autoencoder", vqvae_key).files["model.safetensors"]
        assert m["autoencoder_weights"] == weights["sha256"]  # the weights, not only the key
        assert m["workers"] == max(workers, 1) and m["step"] == 20
        assert np.isfinite(m["val_bits_per_code"]) and 0 < m["val_bits_per_code"] < 6
        history = json.loads(prior.read_bytes("metrics.json"))["history"]
        assert [r["step"] for r in history] == [5, 10, 15, 20]
        assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in history)
    assert store.open("train_prior", steps["prior_bottom"]["key"]).metrics["context_levels"] == [
        "top"
    ]

    samples = store.open("sample", steps["samples"]["key"])
    table = pq.read_table(samples.local_path("codes-00000.parquet"))  # plain pyarrow
    assert table.num_rows == 20
    assert sorted(table["label"].to_pylist()) == sorted(list(range(10)) * 2)
    assert len(table["codes_bottom"][0].as_py()) == 64 and len(table["codes_top"][0].as_py()) == 16
    assert "samples.png" in samples.files

    evaluation = store.open("evaluate", steps["evaluation"]["key"]).metrics
    assert evaluation["samples"] == 20
    assert 0.0 <= evaluation["class_accuracy"] <= 1.0
    assert evaluation["frechet_distance"] > evaluation["frechet_distance_real"] >= 0
    assert 0 < evaluation["recon_mse"] < 0.2
    assert set(evaluation) >= {"val_bits_per_code/top", "val_bits_per_code/bottom"}

    report = (Path(summary["run_dir"]) / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4  # reconstructions, samples, curves
    assert "samples.png" in report and "reconstructions.png" in report
    assert "<h2>Priors</h2>" in report and "val bits/code" in report
    assert "<td>2x2</td>" in report  # the bottom prior's patch


def test_tensorboard_holds_every_training_curve_and_the_run(two_stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, store, steps, summary = two_stage
    logs = Path(summary["run_dir"]) / "tensorboard"

    def scalars(name: str) -> dict[str, list]:
        events = EventAccumulator(str(logs / name))
        events.Reload()
        return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}

    # in process (vqvae, prior_bottom), on Ray Train (prior_top), without checkpoints (classifier)
    for name, curve, val, logged in (
        ("vqvae", "train/loss", "checkpoint/val_mse", [10, 20, 30]),
        ("prior_top", "train/nll", "checkpoint/val_bits_per_code", [5, 10, 15, 20]),
        ("prior_bottom", "train/nll", "checkpoint/val_bits_per_code", [5, 10, 15, 20]),
        ("classifier", "train/ce", "checkpoint/val_accuracy", [20]),
    ):
        found = scalars(name)
        assert [e.step for e in found[curve]] == logged, name
        assert all(np.isfinite(e.value) for e in found[curve]) and found[val], name
    run = scalars("_run")
    prior = store.open("train_prior", steps["prior_top"]["key"])
    assert run["prior_top/val_bits_per_code"][0].value == pytest.approx(
        prior.metrics["val_bits_per_code"]
    )


def _priors(store, steps):
    autoencoder = store.open("train_autoencoder", steps["vqvae"]["key"])
    artifacts = [store.open("train_prior", steps[n]["key"]) for n in ("prior_top", "prior_bottom")]
    from models.vqvae2 import VQVAE2Config

    ae_config = VQVAE2Config(**json.loads(autoencoder.read_bytes("config.json")))
    priors, classes = load_priors(artifacts, autoencoder.key, ae_config)
    return priors, classes, artifacts, ae_config


def test_same_seed_same_codes_other_seed_other_codes(two_stage):
    _, store, steps, _ = two_stage
    priors, classes, _, _ = _priors(store, steps)
    labels = torch.arange(len(classes)).repeat_interleave(3)
    draw = lambda seed, **kw: sample.sample_codes(  # noqa: E731
        priors, labels, sample.Config(seed=seed, batch_size=7, **kw), torch.device("cpu")
    )
    first, again, other = draw(3), draw(3), draw(4)
    for level in ("top", "bottom"):
        assert torch.equal(first[level], again[level])
    assert not torch.equal(first["bottom"], other["bottom"])
    bottom = priors["bottom"][0].config
    assert bottom.patch == [2, 2] and bottom.steps == 16
    guided = draw(3, guidance=2.0, top_k=8, top_p=0.9)
    assert guided["bottom"].shape == (30, 8, 8) and int(guided["bottom"].max()) < 32
    if fp16_weights_available():  # fp16 weights: deterministic too, and close to fp32
        fp32, fp16, fp16_again = (
            sample.sample_codes(priors, labels, sample.Config(seed=3), torch.device("cpu"), p)
            for p in ("fp32", "fp16_weights", "fp16_weights")
        )
        assert torch.equal(fp16["bottom"], fp16_again["bottom"])
        for level in ("top", "bottom"):
            assert (fp16[level] == fp32[level]).float().mean() > 0.9


def test_bad_prior_model_options_are_refused(two_stage):
    _, store, steps, _ = two_stage
    meta = open_codes(store.open("encode", steps["codes"]["key"])).meta
    config = train_prior.Config(level="top", model=train_prior.ModelConfig(patch=[3, 2]))
    with pytest.raises(
        ValueError, match=r"model.patch: \[3, 2\] does not divide the top level's 4x4"
    ):
        train_prior.prior_config_for(meta, config)
    with pytest.raises(ValueError, match=r"kv_heads: must divide heads \(2\), got 3"):
        train_prior.ModelConfig(heads=2, kv_heads=3)


def test_prior_of_another_autoencoder_is_refused(two_stage):
    root, store, steps, _ = two_stage
    _, _, artifacts, ae_config = _priors(store, steps)
    with pytest.raises(CodeShardError, match="trained on codes of autoencoder"):
        load_priors(artifacts, "0" * 64, ae_config)
    with pytest.raises(CodeShardError, match="no prior for level"):
        load_priors(artifacts[:1], artifacts[0].metrics["autoencoder_key"], ae_config)

    # the same through the CLI: a second autoencoder, the first one's priors
    config = write_yaml(
        root / "refused.yaml",
        "name: refused\n"
        + TWO_STAGE_BASE
        + f"""
  other:
    stage: train_autoencoder
    inputs: {{images: data}}
    model: {tiny_vqvae_yaml()}
    train: {{steps: 10, workers: 0, log_every: 10, checkpoint_every: 10, seed: 1}}
  prior_top:
    stage: train_prior
    inputs: {{codes: codes}}
    level: top
    model: {TINY_PRIOR}
    train: {{steps: 20, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 0}}
  prior_bottom:
    stage: train_prior
    inputs: {{codes: codes}}
    level: bottom
    model: {TINY_PRIOR}
    train: {{steps: 20, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 0}}
  samples:
    stage: sample
    inputs: {{autoencoder: other, priors: [prior_top, prior_bottom]}}
    per_class: 2
""",
    )
    trained = glob.glob(str(root / "artifacts/train_autoencoder/*"))
    proc = twostage("run", config, cwd=root, timeout=600)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1  # refused before any work
    assert "samples.inputs.priors: prior_top was trained on codes of autoencoder" in proc.stderr
    assert glob.glob(str(root / "artifacts/train_autoencoder/*")) == trained
    assert not glob.glob(str(root / "artifacts/sample/*/codes-*.parquet"))[1:]  # only the good one


def test_sweep_on_stored_shards_trains_only_priors_and_compares_them(two_stage):
    root, store, steps, _ = two_stage
    codes = f"encode/{steps['codes']['key'][:8]}"  # as twostage ls prints it
    vqvae = f"train_autoencoder/{steps['vqvae']['key'][:8]}"
    config = write_yaml(
        root / "sweep.yaml",
        f"""name: sweep
steps:
  prior_top:  # the first pipeline's prior_top, word for word, on its stored shards
    stage: train_prior
    inputs: {{codes: {codes}}}
    level: top
    model: {TINY_PRIOR}
    train: {{steps: 20, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 1}}
  prior_b:
    stage: train_prior
    inputs: {{codes: {codes}}}
    level: top
    model: {{hidden_size: 48, layers: 1, heads: 2, kv_heads: 1, class_conditional: false}}
    train: {{steps: 10, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 0}}
  prior_c:
    stage: train_prior
    inputs: {{codes: {codes}}}
    level: bottom
    model: {{hidden_size: 32, layers: 1, heads: 2, class_conditional: false}}
    train: {{steps: 10, batch_size: 16, log_every: 5, checkpoint_every: 10, workers: 0}}
  unconditional:
    stage: sample
    inputs: {{autoencoder: {vqvae}, priors: [prior_b, prior_c]}}
    num_samples: 3
    precision: bf16
""",
    )
    summary = run_json(config, cwd=root, timeout=600)
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status == {
        "prior_top": "cached",
        "prior_b": "ran",
        "prior_c": "ran",
        "unconditional": "ran",
    }
    keys = {s["name"]: s["key"] for s in summary["stages"]}
    assert keys["prior_top"] == steps["prior_top"]["key"]  # a stored input keys as its step did
    report = (Path(summary["run_dir"]) / "report.html").read_text()
    assert "prior_b" in report and "prior_c" in report and "<h2>Priors</h2>" in report
    assert "<td>2 (kv 1)</td>" in report  # prior_b: grouped-query attention
    # unconditional priors sample num_samples images, here with bf16 products and KV cache
    samples = store.open("sample", keys["unconditional"])
    assert samples.metrics["images"] == 3 and samples.metrics["precision"] == "bf16"
    assert samples.metrics["conditional"] is False
    assert samples.manifest["inputs"]["autoencoder"] == steps["vqvae"]["key"]
    table = pq.read_table(samples.local_path("codes-00000.parquet"))
    assert table["label"].to_pylist() == [-1, -1, -1] or table["label"].null_count == 3
    assert "samples.png" in samples.files
    assert not (Path(summary["run_dir"]) / "tensorboard").exists()  # not asked for: none

    # every prior on those shards, best first, with the options that differ between them
    table = twostage("ls", "train_prior", "--metrics", "--input", codes, cwd=root, check=0)
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["ARTIFACT", "level"] and "val_bits_per_code" in lines[0]
    assert "model.hidden_size" in lines[0] and lines[-1] == "(best first by val_bits_per_code)"
    ranked = json.loads(
        twostage("ls", "train_prior", "--metrics", "--input", codes, "--json", cwd=root).stdout
    )["rows"]
    assert {r["key"] for r in ranked} == {keys[n] for n in ("prior_top", "prior_b", "prior_c")} | {
        steps["prior_bottom"]["key"]
    }
    bits = [r["metrics"]["val_bits_per_code"] for r in ranked]
    assert bits == sorted(bits) and len(lines) == 2 + len(ranked)
    pair = twostage("compare", keys["prior_b"][:8], keys["prior_c"][:8], cwd=root, check=0)
    assert pair.stdout.splitlines()[0].split()[:3] == ["ARTIFACT", "level", "model.hidden_size"]
    again = run_json(config, cwd=root, timeout=600)
    assert {s["status"] for s in again["stages"]} == {"cached"}

    # bad references: one line, exit 2, before any work
    before = sorted(p.name for p in (root / "artifacts/train_prior").iterdir())
    text = config.read_text()
    for wrong, message in (
        ((codes, "encode/0000ffff"), "no artifact with key '0000ffff'"),
        (
            (codes, f"train_prior/{steps['prior_top']['key'][:8]}"),
            "is of stage train_prior, expected encode",
        ),
        (
            ("level: bottom", "level: middle"),
            "the code shards have levels bottom, top, not 'middle'",
        ),
        ((vqvae, codes), "is of stage encode, expected train_autoencoder"),
    ):
        bad = write_yaml(root / "bad.yaml", text.replace(*wrong, 1))
        if "no artifact" in message:  # through the CLI once: one line, exit status 2
            proc = twostage("run", bad, cwd=root)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        else:  # the same check in process (what the CLI prints is the error's one line)
            with pytest.raises(ConfigError, match=re.escape(message)) as refused:
                load_pipeline(bad, store=store.uri)
            assert "\n" not in str(refused.value)
    assert sorted(p.name for p in (root / "artifacts/train_prior").iterdir()) == before


def test_tune_sweep_stops_trials_early_resumes_after_a_kill_and_commits_the_best(two_stage):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import cli_env

    root, store, steps, _ = two_stage
    codes = f"encode/{steps['codes']['key'][:8]}"
    sweep = write_yaml(
        root / "tune.yaml",
        f"""name: tiny_tune
sweep:
  step:
    stage: train_prior
    inputs: {{codes: {codes}}}
    level: top
    model: {TINY_PRIOR}
    train: {{steps: 60, batch_size: 64, log_every: 10, checkpoint_every: 20, cpus_per_worker: 1}}
  space:  # seed 5 runs them in this order, best first, worst last: ASHA stops the last at 40
    train.lr: {{grid: [3.0e-3, 1.0e-4, 1.0e-5]}}  # steps (after a restore: after the second's)
  seed: 5
  scheduler: {{kind: asha, grace_steps: 40, reduction_factor: 2}}
  max_concurrent_trials: 1
  top_k: 1
""",
    )
    scratch = root / "artifacts/_scratch/train_prior"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "tune", str(sweep)],
        cwd=root,
        env=cli_env(TUNE_GLOBAL_CHECKPOINT_S="0.5"),  # the experiment's state follows closely
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def newest(key_dir: Path) -> int:
        found = [int(p.name.split("_")[1]) for p in key_dir.glob("checkpoint_*")]
        return max(found, default=0)

    def recorded_done() -> bool:  # Tune's saved state knows a trial finished
        states = root.glob("runs/tune/*/experiment_state-*.json")
        return any("TERMINATED" in p.read_text(errors="replace") for p in states)

    # killed once one trial is done and another is mid-way, short of ASHA's rung at 40 (a trial
    # that reached it may have been stopped there: done, not mid-way)
    deadline = time.time() + 300
    while time.time() < deadline:
        trained = [newest(d) for d in scratch.glob("*")] if scratch.exists() else []
        if 60 in trained and any(0 < s < 40 for s in trained) and recorded_done():
            break
        assert proc.poll() is None, "the sweep ended before it could be killed mid-way"
        time.sleep(0.05)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("no finished trial and no trial mid-way within 300 s")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    mid_way = {d.name: newest(d) for d in scratch.glob("*") if 0 < newest(d) < 40}
    assert mid_way

    summary = run_json_tune(sweep, root)
    trials = {t["key"]: t for t in summary["trials"]}
    assert len(trials) == 3 and {t["status"] for t in trials.values()} <= {"finished", "stopped"}
    assert any(t["status"] == "stopped" and t["steps"] == 40 for t in trials.values())  # ASHA
    for key, step in mid_way.items():  # went on from its checkpoint, did not start over
        assert trials[key]["figures"]["resumed_from_step"] >= step > 0
    for t in trials.values():  # no trial reported a step twice or went back
        reported = [c["step"] for c in t["checkpoints"]]
        assert reported == sorted(set(reported)), (t["trial"], reported)
    best = summary["trials"][0]
    assert best["status"] == "finished" and best["values"] == {"train.lr": 3.0e-3}
    assert summary["committed"] == [
        {
            "trial": best["trial"],
            "status": "ran",
            "key": best["key"],
            "uri": store.uri_of("train_prior", best["key"]),
            "error": None,
        }
    ]
    # the winner is the plain step it stands for: a pipeline naming it finds it cached
    plain = write_yaml(
        root / "winner.yaml",
        f"""name: winner
steps:
  prior:
    stage: train_prior
    inputs: {{codes: {codes}}}
    level: top
    model: {TINY_PRIOR}
    train: {{steps: 60, batch_size: 64, log_every: 10, checkpoint_every: 20, cpus_per_worker: 1,
             workers: 0, lr: 3.0e-3}}
""",
    )
    assert steps_by_name(run_json(plain, cwd=root))["prior"]["status"] == "cached"
    report = (Path(summary["run_dir"]) / "report.html").read_text()
    assert report.count("<tr>") == 4 and "data:image/png;base64," in report


def run_json_tune(sweep: Path, root: Path) -> dict:
    proc = twostage("tune", sweep, "--json", cwd=root, timeout=600, check=0)
    return json.loads(proc.stdout)


def test_python_api_runs_a_pipeline_opens_its_codes_and_samples_from_its_priors(two_stage):
    import yaml

    import twostage
    from pipeline.config import ConfigError
    from tests.helpers import TWO_STAGE_PIPELINE

    root, store, steps, _ = two_stage
    pipeline = yaml.safe_load(TWO_STAGE_PIPELINE)
    where = {"runs_dir": str(root / "runs")}
    result = twostage.run(pipeline, where, store=store.uri)  # everything stored: no Ray at all
    assert result.ok and {s.status for s in result.steps} == {"cached"}
    refs = result.refs
    assert refs["codes"] == f"encode/{steps['codes']['key']}"

    codes = twostage.open_codes(refs["codes"][:16], store=store.uri)
    assert (
        codes.meta.level_names == ["bottom", "top"]
        and codes.meta.autoencoder_key == (steps["vqvae"]["key"])
    )
    kwargs = {"store": store.uri, "per_class": 1, "classes": [3, 7], "seed": 5}
    images, labels = twostage.sample(
        refs["vqvae"], [refs["prior_top"], refs["prior_bottom"]], **kwargs
    )
    again, _ = twostage.sample(refs["vqvae"], [refs["prior_bottom"], refs["prior_top"]], **kwargs)
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8 and list(labels) == [3, 7]
    assert np.array_equal(images, again)  # one seed, one draw
    assert not twostage.load_model(refs["prior_top"], store=store.uri).training
    with pytest.raises(CodeShardError, match="no prior for level"):
        twostage.sample(refs["vqvae"], [refs["prior_top"]], **kwargs)
    with pytest.raises(ConfigError, match=r"steps.vqvae.train.steps: must be positive, got 0"):
        twostage.run(pipeline, {**where, "steps.vqvae.train.steps": 0}, store=store.uri)
