"""The train_autoencoder stage: artifacts, resume, NaN. Two Ray Train DDP workers, a killed
training node and the rerun's resume past a checkpoint cut short: tests/test_real_cluster.py."""

from pathlib import Path

import pytest
import torch

from pipeline.config import from_dict
from pipeline.store import Store
from stages import ingest, train_autoencoder
from stages.training.harness import _training_error, launch
from stages.training.loop import CheckpointError
from tests.helpers import tiny_vqvae, tiny_vqvae_yaml

TINY_MODEL = tiny_vqvae_yaml()


def _images(tmp_path: Path, **kwargs):
    store = Store(str(tmp_path / "store"))
    config = ingest.Config(**{"image_size": 32, "limit": 600, **kwargs})
    with store.staging("ingest", "f" * 64) as out:
        metrics = ingest.run(config, {}, out, "")
        artifact, _ = store.commit("ingest", "f" * 64, out, {"metrics": metrics})
    return artifact


def _config(**train) -> train_autoencoder.Config:
    return from_dict(
        train_autoencoder.Config,
        {"model": tiny_vqvae(), "train": {"workers": 0, "log_every": 10, **train}},
        "",
    )


def test_in_process_resume_and_checkpoint_contents(tmp_path):
    images = _images(tmp_path)
    scratch = tmp_path / "scratch"
    out = tmp_path / "out1"
    out.mkdir()
    first = train_autoencoder.run(
        _config(steps=20, checkpoint_every=10), {"images": images}, out, str(scratch)
    )
    assert first["resumed_from_step"] == 0
    checkpoints = sorted(p.name for p in scratch.iterdir())
    assert checkpoints == ["checkpoint_00000010", "checkpoint_00000020"]
    assert {p.name for p in (scratch / "checkpoint_00000020").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "state.pt",
        "history.json",
    }
    out2 = tmp_path / "out2"
    out2.mkdir()
    second = train_autoencoder.run(
        _config(steps=30, checkpoint_every=10), {"images": images}, out2, str(scratch)
    )
    assert second["resumed_from_step"] == 20 and second["step"] == 30
    # a truncated newest checkpoint is set aside and the one before resumes the run
    weights = scratch / "checkpoint_00000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out3 = tmp_path / "out3"
    out3.mkdir()
    third = train_autoencoder.run(
        _config(steps=40, checkpoint_every=10), {"images": images}, out3, str(scratch)
    )
    assert third["resumed_from_step"] == 20 and third["step"] == 40
    assert (scratch / "unloadable-checkpoint_00000030" / "model.safetensors").is_file()
    # with no loadable checkpoint left, one message names the newest's problem and the way
    # out, and nothing is moved (a rerun meets the same checkpoints)
    for checkpoint in scratch.glob("checkpoint_*"):
        (checkpoint / "state.pt").write_bytes(b"not a checkpoint")
    out4 = tmp_path / "out4"
    out4.mkdir()
    with pytest.raises(CheckpointError) as info:
        train_autoencoder.run(
            _config(steps=50, checkpoint_every=10), {"images": images}, out4, str(scratch)
        )
    message = str(info.value)
    assert message.startswith(
        "no checkpoint to resume from can be loaded: checkpoint_00000040: state.pt does not "
        "match its sha256 (corrupted on disk)"
    )
    assert message.endswith(
        f"; nor can the 1 older one(s); delete {scratch} to start this step over"
    )
    assert not list(out4.iterdir())
    assert sorted(p.name for p in scratch.iterdir()) == [
        "checkpoint_00000030",
        "checkpoint_00000040",
        "unloadable-checkpoint_00000030",
    ]


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    images = _images(tmp_path)
    scratch = tmp_path / "scratch"
    out = tmp_path / "out"
    out.mkdir()
    config = _config(
        steps=200, checkpoint_every=1, lr=1e12, warmup_steps=1, grad_clip=0.0, precision="fp32"
    )
    with pytest.raises(
        FloatingPointError,
        match=r"loss became (nan|inf) at step \d+.*last good checkpoint: step \d+",
    ):
        train_autoencoder.run(config, {"images": images}, out, str(scratch))
    kept = sorted(scratch.glob("checkpoint_*"))
    assert kept and all((p / "model.safetensors").is_file() for p in kept)


def test_a_flipped_bit_in_the_tensor_data_falls_back_to_the_checkpoint_before(tmp_path):
    images = _images(tmp_path)
    scratch = tmp_path / "scratch"
    for n, steps in enumerate((20, 30)):
        out = tmp_path / f"out{n}"
        out.mkdir()
        metrics = train_autoencoder.run(
            _config(steps=steps, checkpoint_every=10), {"images": images}, out, str(scratch)
        )
        if n == 0:  # flip one bit in the newest weights, past the safetensors header
            weights = scratch / "checkpoint_00000020" / "model.safetensors"
            data = bytearray(weights.read_bytes())
            header = 8 + int.from_bytes(data[:8], "little")
            data[(header + len(data)) // 2] ^= 0x04
            weights.write_bytes(bytes(data))
    assert metrics["resumed_from_step"] == 10 and metrics["step"] == 30
    assert (scratch / "unloadable-checkpoint_00000020" / "model.safetensors").is_file()


class _InfGradient(torch.autograd.Function):
    """The identity forward (a finite loss stays finite); an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


@pytest.mark.parametrize("grad_clip, precision", [(1.0, "fp32"), (0.0, "bf16")])
def test_inf_gradients_with_a_finite_loss_never_reach_a_checkpoint(
    tmp_path, monkeypatch, grad_clip, precision
):
    from safetensors.torch import load_file

    from models.vqvae2 import VQVAE2

    images = _images(tmp_path, limit=200)
    forward, calls = VQVAE2.forward, []

    def poisoned(self, *args, **kwargs):  # the 10th training step: a checkpoint is due after it
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 10:
                out["loss"] = _InfGradient.apply(out["loss"])
        return out

    monkeypatch.setattr(VQVAE2, "forward", poisoned)
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    out.mkdir()
    config = _config(steps=20, checkpoint_every=5, grad_clip=grad_clip, precision=precision)
    with pytest.raises(FloatingPointError, match=r"gradient norm became (nan|inf) at step 10 "):
        train_autoencoder.run(config, {"images": images}, out, str(scratch))
    kept = sorted(scratch.glob("checkpoint_*"))
    assert [p.name for p in kept] == ["checkpoint_00000005"]
    for checkpoint in kept:
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert not list(out.iterdir())


def test_image_size_mismatch_names_the_fix(tmp_path):
    images = _images(tmp_path, image_size=None)  # 28x28
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        ValueError,
        match=r"model.image_size is 32 but the images are 28x28; set the ingest step's image_size: 32",
    ):
        train_autoencoder.run(_config(steps=2), {"images": images}, out, str(tmp_path / "s"))


def test_ray_train_failure_text_is_one_line_naming_the_checkpoint_problem():
    # what Ray Train's error text ends with when a worker cannot load its checkpoint
    text = (
        "Training worker 0 failed.\nTraceback (most recent call last):\n  ...\n"
        "stages.training.CheckpointError: the checkpoint to resume from cannot be loaded "
        "(SafetensorError: incomplete metadata)\n"
    )
    message = _training_error(RuntimeError(text), "s3://b/_scratch/train_prior/abc")
    assert message == (
        "the checkpoint to resume from cannot be loaded (SafetensorError: incomplete metadata)"
        "; delete s3://b/_scratch/train_prior/abc to start this step over"
    )


def test_in_process_training_refuses_an_object_store_scratch():
    with pytest.raises(
        ValueError, match=r"train.workers: 0 .* scratch is s3://b/p/_scratch/x; use"
    ):
        launch(
            train_autoencoder._loop,
            {},
            workers=0,
            cpus_per_worker=1,
            device="cpu",
            scratch="s3://b/p/_scratch/x?endpoint_override=localhost:9000&scheme=http",
            final=Path("unused"),
        )
