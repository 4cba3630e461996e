"""configs/imagefolder_vqvae2.yaml end to end at CPU size: the same pipeline (ingest of an image
folder, VQ-VAE-2, encode, both priors, samples) with 64px images and small models, on a
generated folder of RGB JPEGs of several sizes that lies in an S3 bucket (the loopback server)."""

import io

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.store import Store
from stages.formats import image_stream
from tests.helpers import CREDENTIALS, REPO, cli_env, run_json, steps_by_name


def _folder(client, prefix: str, classes: int = 3, per_class: int = 40) -> None:
    """Uploads the JPEGs (a third in a sub-folder) and a file that is no image."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:72, 0:96] / 96.0
    for c in range(classes):
        for i in range(per_class):
            colour = rng.uniform(0, 1, 3)
            phase = rng.uniform(0, 6.3)
            wave = 0.5 + 0.5 * np.sin((c + 1) * 6 * xs + phase)[..., None]
            pixels = (255 * wave * colour * (0.5 + ys[..., None])).clip(0, 255).astype(np.uint8)
            if i % 3 == 0:  # a few of another size
                pixels = pixels[:64, :80]
            data = io.BytesIO()
            Image.fromarray(pixels).save(data, format="JPEG", quality=90)
            name = f"class{c}/{'more/' if i % 3 == 1 else ''}{i}.jpg"
            client.put_object(Bucket="twostage", Key=f"{prefix}/{name}", Body=data.getvalue())
    client.put_object(Bucket="twostage", Key=f"{prefix}/class0/LICENSE.txt", Body=b"no image")


def _cpu_variant(folder: str, store) -> dict:
    """The shipped config with CPU-sized numbers; everything else as shipped."""
    raw = yaml.safe_load((REPO / "configs/imagefolder_vqvae2.yaml").read_text())
    raw.update(store=str(store), ray={"address": None, "num_cpus": 2})
    steps = raw["steps"]
    steps["data"].update(source={"kind": "image_folder", "path": folder}, image_size=64)
    steps["data"]["val_fraction"] = 0.1
    steps["vqvae"]["model"].update(image_size=64, channels=32, res_channels=16, embed_dim=16)
    steps["vqvae"]["model"]["codebook_size"] = 32
    steps["vqvae"]["train"].update(
        steps=30,
        batch_size=8,
        checkpoint_every=30,
        log_every=10,
        workers=0,
        device="cpu",
        val_images=16,
        shuffle_buffer=32,
    )
    steps["codes"].update(actors=1, gpus_per_actor=0, batch_size=64)
    for name in ("prior_top", "prior_bottom"):
        steps[name]["model"].update(hidden_size=32, layers=1, heads=2)
        steps[name]["train"].update(
            steps=10, batch_size=8, checkpoint_every=10, log_every=5, workers=0, device="cpu"
        )
    steps["samples"].update(per_class=1, classes=[0, 1, 2], device="cpu")
    steps["samples"]["resources"] = {"num_cpus": 1}
    return raw


@pytest.mark.slow
def test_imagefolder_pipeline_runs_end_to_end_at_cpu_size(tmp_path, s3_server):
    _folder(s3_server["client"], "folder")
    folder = f"s3://twostage/folder?endpoint_override=127.0.0.1:{s3_server['port']}&scheme=http"
    config = tmp_path / "imagefolder_cpu.yaml"
    config.write_text(yaml.safe_dump(_cpu_variant(folder, tmp_path / "store")))
    summary = run_json(config, cwd=tmp_path, env=cli_env(**CREDENTIALS), timeout=600)
    assert summary["status"] == "ok", summary
    steps = steps_by_name(summary)
    assert [steps[n]["status"] for n in steps] == ["ran"] * 6
    store = Store(str(tmp_path / "store"))
    data = store.open("ingest", steps["data"]["key"])
    assert data.metrics["images"] == 120 and data.metrics["channels"] == 3
    assert data.metrics["splits"]["val"] > 0 and data.metrics["corrupt"]["count"] == 0
    assert data.metrics["ignored_files"] == 1 and data.metrics["num_classes"] == 3
    assert image_stream.read_rows(data, "train", 4).images.shape == (4, 64, 64, 3)
    codes = store.open("encode", steps["codes"]["key"])
    assert codes.metrics["images"] == 120
    assert codes.metrics["grid_shapes"] == {"bottom": [16, 16], "top": [8, 8]}
    samples = store.open("sample", steps["samples"]["key"])
    assert samples.metrics["images"] == 3
