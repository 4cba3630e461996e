"""TD-VAE through its stages: ingest (bouncing Moving MNIST) -> train_sequence -> rollout, in
process on a real store, then the whole pipeline through the CLI with training on Ray Train
and the report's prediction table."""

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch

from models.tdvae import TDVAE
from pipeline.config import ConfigError, from_dict
from pipeline.store import Store
from stages import ingest_sequences, rollout, train_sequence
from stages.formats.sequences import read_sequence_rows as sequence_rows
from stages.formats.sequences import sequence_groups
from stages.training.harness import LocalSession
from tests.helpers import run_json, write_yaml

TINY_MODEL = {
    "image_size": 16,
    "channels": 4,
    "frame_features": 16,
    "belief_dim": 16,
    "hidden_dim": 16,
    "latent_dim": 3,
    "layers": 2,
    "max_jump": 3,
}
SOURCE = {"kind": "moving_mnist", "count": 60, "frames": 8, "canvas": 16, "num_digits": 1}


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("tdvae") / "store"))
    config = from_dict(
        ingest_sequences.Config, {"source": {**SOURCE, "digit_size": 8}, "limit": 300}, "data"
    )
    with store.staging("ingest_sequences", _key("data")) as out:
        metrics = ingest_sequences.run(config, {}, out, "")
        data, _ = store.commit("ingest_sequences", _key("data"), out, {"metrics": metrics})
    config = from_dict(
        train_sequence.Config,
        {
            "model": TINY_MODEL,
            "train": {"workers": 0, "steps": 12, "batch_size": 8, "log_every": 4,
                      "checkpoint_every": 6, "binarize": "dynamic"},
        },
        "tdvae",
    )  # fmt: skip
    with store.staging("train_sequence", _key("tdvae")) as out:
        metrics = train_sequence.run(config, {"sequences": data}, out, str(out) + "-scratch")
        manifest = {"metrics": metrics, "config": train_sequence.to_dict(config)}
        model, _ = store.commit("train_sequence", _key("tdvae"), out, manifest)
    return store, data, model


def test_training_logs_every_term_and_scores_val(trained):
    _, _, model = trained
    m = model.metrics
    assert m["step"] == 12 and np.isfinite(m["val_loss"]) and m["val_kl"] >= 0
    history = json.loads(model.read_bytes("metrics.json"))["history"]
    assert [r["step"] for r in history] == [4, 8, 12]
    assert {"loss", "recon", "kl", "belief_t2", "transition", "lr", "sequences_per_s"} <= set(
        history[0]
    )


def test_rollout_scores_every_jump_against_both_baselines(trained, tmp_path):
    store, data, model = trained
    config = from_dict(rollout.Config, {"context": 3, "samples": 2, "rollout_samples": 2}, "r")
    out = tmp_path / "out"
    out.mkdir()
    metrics = rollout.run(config, {"model": model, "sequences": data}, out, "")
    rows = metrics["per_delta"]
    assert [r["delta"] for r in rows] == [1, 2, 3]
    for r in rows:
        for who in ("model", "copy_last", "mean_frame"):
            assert r[f"{who}_bce"] > 0 and 0 <= r[f"{who}_mse"] <= 1
    assert np.isfinite(metrics["val_bound"])
    # copy-last is exact for a frame it copies: scoring uses the true frames, not a model output
    assert rows[0]["copy_last_mse"] < rows[2]["copy_last_mse"]
    assert (out / "rollouts.png").is_file() and (out / "predictions.json").is_file()
    from PIL import Image

    with Image.open(out / "rollouts.png") as im:  # 4 sequences x (truth + 2 samples) rows
        assert im.size[1] == 2 * (12 * (16 + 2) + 2)


def test_rollout_refuses_a_context_that_leaves_no_room(trained, tmp_path):
    store, data, model = trained
    config = from_dict(rollout.Config, {"context": 7}, "r")
    with pytest.raises(ValueError, match="context 7 \\+ max_delta 3 exceeds the 8 frames"):
        rollout.run(config, {"model": model, "sequences": data}, tmp_path, "")


class _Interrupted(Exception):
    pass


class _StoppingSession(LocalSession):
    """An in-process session that dies right after reporting the checkpoint at `stop_at`."""

    def __init__(self, scratch, stop_at=None):
        super().__init__(scratch, torch.device("cpu"), 1)
        self.stop_at = stop_at

    def report(self, metrics, checkpoint):
        super().report(metrics, checkpoint)
        if metrics["step"] == self.stop_at:
            raise _Interrupted


def test_frame_pretraining_trains_the_frame_path_and_resumes_in_either_phase(trained, tmp_path):
    store, data, _ = trained
    config = from_dict(
        train_sequence.Config,
        {
            "model": TINY_MODEL,
            "pretrain": {"steps": 4, "batch_size": 16},
            "train": {"steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 2,
                      "binarize": "dynamic"},
        },
        "tdvae",
    )  # fmt: skip
    ref = {"store": store.spec, "stage": data.stage, "key": data.key}
    whole = _StoppingSession(tmp_path / "whole")
    final = train_sequence.train_loop(config, ref, whole)
    assert final["step"] == 8 and np.isfinite(final["val_loss"])

    # killed mid pre-training, then at the phase boundary, then run to the end
    split = tmp_path / "split"
    for stop_at in (2, 4, None):
        try:
            train_sequence.train_loop(config, ref, _StoppingSession(split, stop_at))
        except _Interrupted:
            pass
        if stop_at == 4:  # the boundary checkpoint: only the encoder and decoder have moved
            boundary = (split / "checkpoint_00000004" / "model.safetensors").read_bytes()
            pretrained = safetensors.torch.load(boundary)
            metrics = json.loads((split / "checkpoint_00000004/final_metrics.json").read_text())
            assert metrics["val_pretrain_kl"] > 0 and metrics["resumed_from_step"] == 2
    torch.manual_seed(config.train.seed)
    initial = TDVAE(config.model).state_dict()
    moved = {k for k in initial if not torch.equal(initial[k], pretrained[k])}
    assert moved and all(k.startswith(("encoder.", "decoder.")) for k in moved)

    history = json.loads((whole.last_checkpoint / "history.json").read_text())
    assert [r["step"] for r in history] == [2, 4, 6, 8]
    assert {"pretrain_recon", "pretrain_kl", "frames_per_s"} <= set(history[0])
    assert {"recon", "belief_t2", "sequences_per_s"} <= set(history[2])
    resumed = json.loads((split / "checkpoint_00000008/final_metrics.json").read_text())
    assert resumed["resumed_from_step"] == 4 and np.isfinite(resumed["val_loss"])

    # each phase walks its own order from its first step: killed at the boundary only, the run
    # ends as if never killed (mid-phase, up to a shuffle buffer of sequences differ)
    boundary = tmp_path / "boundary"
    for stop_at in (4, None):
        try:
            train_sequence.train_loop(config, ref, _StoppingSession(boundary, stop_at))
        except _Interrupted:
            pass
    a = safetensors.torch.load((whole.last_checkpoint / "model.safetensors").read_bytes())
    b = safetensors.torch.load((boundary / "checkpoint_00000008/model.safetensors").read_bytes())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world", [1, 2])
def test_training_streams_each_train_sequence_once_per_epoch(trained, world):
    store, data, _ = trained
    buffer = 16
    train = from_dict(train_sequence.SequenceTrainConfig, {"shuffle_buffer": buffer}, "train")
    train_rows = {r.tobytes() for r in sequence_rows(data, "train", 10**6)}
    val_rows = {r.tobytes() for r in sequence_rows(data, "val", 10**6)}
    share = len(train_rows) // world
    first, later = [], []
    for rank in range(world):
        session = SimpleNamespace(rank=rank, world_size=world)
        groups = sequence_groups(data, "train")
        batches = train_sequence._batches(data, groups, train, session, 4, 3 * share // 4, 0, 1)
        drawn = [r.numpy().tobytes() for _ in range(3 * share // 4) for r in next(batches)]
        first += drawn[: share - buffer]  # all of them from the first epoch
        later += drawn
    assert len(first) == len(set(first))  # no repeats within an epoch, none across workers
    assert set(later) == train_rows and not set(later) & val_rows  # three epochs: every one


def test_pretraining_resets_only_the_decoder_input_layer(trained, tmp_path):
    store, data, _ = trained
    ref = {"store": store.spec, "stage": data.stage, "key": data.key}
    boundary = {}
    for reset in (True, False):
        config = from_dict(
            train_sequence.Config,
            {
                "model": TINY_MODEL,
                "pretrain": {"steps": 3, "batch_size": 8, "reset_decoder_input": reset},
                "train": {"steps": 1, "batch_size": 4, "checkpoint_every": 3, "log_every": 3},
            },
            "tdvae",
        )
        scratch = tmp_path / str(reset)
        with pytest.raises(_Interrupted):
            train_sequence.train_loop(config, ref, _StoppingSession(scratch, stop_at=3))
        boundary[reset] = safetensors.torch.load(
            (scratch / "checkpoint_00000003/model.safetensors").read_bytes()
        )
    differ = {k for k in boundary[True] if not torch.equal(boundary[True][k], boundary[False][k])}
    assert differ == {"decoder.net.0.weight", "decoder.net.0.bias"}


def test_model_and_frames_must_agree(trained, tmp_path):
    store, data, _ = trained
    config = from_dict(train_sequence.Config, {"model": {**TINY_MODEL, "image_size": 32}}, "t")
    with pytest.raises(ValueError, match="frames are 16x16x1 but the model expects 32x32x1"):
        train_sequence.run(config, {"sequences": data}, tmp_path, str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"t\.model\.max_jump"):
        from_dict(train_sequence.Config, {"model": {"max_jump": 0}}, "t")


@pytest.mark.slow
def test_pipeline_trains_with_ray_train_rolls_out_and_reports_the_prediction_table(tmp_path):
    """Through the CLI, training on a Ray Train worker (resume after a kill is the shared
    skeleton's, tested on the prior and on a real cluster)."""
    source = ", ".join(f"{k}: {v}" for k, v in {**SOURCE, "digit_size": 8}.items())
    model = ", ".join(f"{k}: {v}" for k, v in TINY_MODEL.items())
    config = write_yaml(
        tmp_path / "tdvae.yaml",
        f"""
name: tdvae
steps:
  data: {{stage: ingest_sequences, source: {{{source}}}, limit: 300}}
  tdvae:
    stage: train_sequence
    inputs: {{sequences: data}}
    model: {{{model}}}
    train: {{steps: 40, batch_size: 8, checkpoint_every: 20, log_every: 20, warmup_steps: 5,
            workers: 1}}
  rollout:
    stage: rollout
    inputs: {{model: tdvae, sequences: data}}
    context: 3
    samples: 2
""",
    )
    summary = run_json(config, cwd=tmp_path, timeout=600)
    assert [s["status"] for s in summary["stages"]] == ["ran", "ran", "ran"]
    store = Store(str(tmp_path / "artifacts"))
    artifact = store.open("train_sequence", summary["stages"][1]["key"])
    assert artifact.metrics["step"] == 40
    history = json.loads(artifact.read_bytes("metrics.json"))["history"]
    assert [r["step"] for r in history] == [20, 40]
    page = (tmp_path / summary["run_dir"] / "report.html").read_text()
    assert "Predictions (rollout)" in page and "BCE copy last frame" in page
    assert "rollouts.png" in page
