"""Every autoencoder family through the train_autoencoder stage, then analyze_latents."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.store import Store
from stages import analyze_latents, ingest, train_autoencoder
from tests.helpers import run_json, tiny_vqvae, write_yaml

FAMILIES = {
    "autoencoder": {},
    "denoising": {"noise": "masking"},
    "sparse": {},
    "ksparse": {"k": 4},
    "contractive": {},
    "vae": {},
    "beta_vae": {"beta": 4.0},
    "cvae": {},
}


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _ingest(store: Store, source: dict, **options):
    config = from_dict(ingest.Config, {"source": source, **options}, "data")
    with store.staging("ingest", _key("data")) as out:
        metrics = ingest.run(config, {}, out, "")
        artifact, _ = store.commit("ingest", _key("data"), out, {"metrics": metrics})
    return artifact


def _train(store: Store, images, key: str, model: dict, **train):
    config = from_dict(
        train_autoencoder.Config,
        {"model": model, "train": {"workers": 0, "log_every": 5, "checkpoint_every": 10, **train}},
        "vae",
    )
    with store.staging("train_autoencoder", key) as out:
        metrics = train_autoencoder.run(config, {"images": images}, out, str(out) + "-scratch")
        manifest = {"metrics": metrics, "config": train_autoencoder.to_dict(config)}
        artifact, _ = store.commit("train_autoencoder", key, out, manifest)
    return artifact


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("families") / "store"))
    return store, _ingest(store, {"kind": "embedded"}, image_size=32, limit=400)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_through_the_stage(mnist, family):
    store, images = mnist
    model = {"family": family, "image_size": 32, "channels": 8, "latent_dim": 8, **FAMILIES[family]}
    artifact = _train(
        store, images, _key(family), model, steps=10, batch_size=16, binarize="dynamic"
    )
    m = artifact.metrics
    assert m["step"] == 10 and np.isfinite(m["val_loss"]) and 0 < m["val_mse"] < 0.5
    assert 0 <= m["val_active_units"] <= 8
    history = json.loads(artifact.read_bytes("metrics.json"))["history"]
    assert [r["step"] for r in history] == [5, 10]
    assert {"loss", "recon"} <= set(history[0])
    if family in ("vae", "beta_vae", "cvae"):
        assert "kl" in history[0] and np.isfinite(m["val_neg_elbo"])
    assert "reconstructions.png" in artifact.files


def test_unknown_family_is_named_and_vqvae2_stays_the_default():
    with pytest.raises(ConfigError, match=r"vae\.model\.family: must be one of .*'beta_vae'"):
        from_dict(train_autoencoder.Config, {"model": {"family": "gan"}}, "vae")
    with pytest.raises(ConfigError, match=r"vae\.model\.beta"):
        from_dict(train_autoencoder.Config, {"model": {"family": "vae", "beta": "x"}}, "vae")
    assert from_dict(train_autoencoder.Config, {}, "vae").model.family == "vqvae2"


def test_capacity_grows_with_optimizer_steps_in_the_stage(mnist):
    store, images = mnist
    model = {
        "family": "beta_vae",
        "image_size": 32,
        "channels": 8,
        "latent_dim": 4,
        "capacity_max": 10.0,
        "capacity_steps": 40,
        "gamma": 10.0,
    }
    artifact = _train(store, images, _key("capacity"), model, steps=20, batch_size=8)
    history = json.loads(artifact.read_bytes("metrics.json"))["history"]
    # the logged capacity is the mean C over each window of 5 steps: C(step) = 10 * step / 40
    # is evaluated before the step's advance, so window 1..5 averages steps 0..4
    assert [round(r["capacity"], 4) for r in history] == [0.5, 1.75, 3.0, 4.25]


def test_analyze_latents_on_a_vae_and_a_conditional_vae(mnist, tmp_path):
    store, images = mnist
    for family in ("vae", "cvae"):
        model = {"family": family, "image_size": 32, "channels": 8, "latent_dim": 6}
        artifact = _train(
            store,
            images,
            _key("analyze " + family),
            model,
            steps=10,
            batch_size=16,
            binarize="dynamic",
        )
        out = tmp_path / family
        out.mkdir()
        config = analyze_latents.Config(
            traversal_dims=4, iw_samples=20, iw_images=40, interpolation_pairs=3
        )
        m = analyze_latents.run(config, {"autoencoder": artifact, "images": images}, out, "")
        assert {p.name for p in out.iterdir()} >= {"traversals.png", "interpolations.png"}
        assert (out / "class_swap.png").is_file() == (family == "cvae")
        assert np.isfinite(m["iw_nll"]) and m["iw_nll"] <= m["neg_elbo"] + 3 * m["iw_nll_stderr"]
        assert len(m["kl_per_dim"]) == 6 and m["iw_samples"] == 20 and m["iw_images"] == 40


def test_dsprites_factors_reach_mig_and_the_factor_vae_score(tmp_path):
    store = Store(str(tmp_path / "store"))
    images = _ingest(store, {"kind": "dsprites", "count": 600})
    model = {"family": "beta_vae", "image_size": 64, "channels": 8, "latent_dim": 4, "beta": 2.0}
    artifact = _train(store, images, _key("dsprites"), model, steps=6, batch_size=16)
    config = analyze_latents.Config(
        traversal_dims=4, iw_samples=0, factor_vae_votes=20, factor_vae_batch=8, mig_images=600
    )
    m = analyze_latents.run(config, {"autoencoder": artifact, "images": images}, tmp_path, "")
    assert 0.0 <= m["mig"] <= 1.0 and 0.0 <= m["factor_vae_score"] <= 1.0
    assert set(m["mig_per_factor"]) == {"shape", "scale", "orientation", "pos_x", "pos_y"}


def test_analyze_latents_refuses_a_vqvae2(mnist, tmp_path):
    store, images = mnist
    artifact = _train(
        store,
        images,
        _key("vq"),
        tiny_vqvae(codebook_size=16),
        steps=2,
        batch_size=8,
        checkpoint_every=2,
    )
    with pytest.raises(ValueError, match="VQ-VAE-2 .*continuous families"):
        analyze_latents.run(
            analyze_latents.Config(), {"autoencoder": artifact, "images": images}, tmp_path, ""
        )


@pytest.mark.slow
def test_pipeline_compares_families_in_the_report(tmp_path):
    config = write_yaml(
        tmp_path / "families.yaml",
        """
name: families
ray: {num_cpus: 2}
steps:
  data: {stage: ingest, image_size: 32, limit: 300}
  ae:
    stage: train_autoencoder
    inputs: {images: data}
    model: {family: autoencoder, channels: 8, latent_dim: 8}
    train: &train {steps: 6, batch_size: 16, log_every: 3, checkpoint_every: 6, workers: 0,
                   binarize: dynamic}
  vae:
    stage: train_autoencoder
    inputs: {images: data}
    model: {family: vae, channels: 8, latent_dim: 8}
    train: *train
  analyze_ae: {stage: analyze_latents, inputs: {autoencoder: ae, images: data}, probe_images: 200}
  analyze_vae:
    stage: analyze_latents
    inputs: {autoencoder: vae, images: data}
    iw_samples: 10
    iw_images: 30
    probe_images: 200
""",
    )
    summary = run_json(config, cwd=tmp_path, timeout=600)
    assert summary["status"] == "ok", summary
    report = (Path(summary["run_dir"]) / "report.html").read_text()
    table = report.split("<h2>Autoencoders</h2>", 1)[1].split("</table>", 1)[0]
    assert "<td>ae</td><td>autoencoder</td>" in table and "<td>vae</td><td>vae</td>" in table
    assert "IW-NLL" in table and "linear probe" in table
    assert report.count("traversals.png") == 2
