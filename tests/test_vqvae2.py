"""VQ-VAE-2 on tiny configs: shapes, config checks, encode/decode, save/load, one step."""

import pytest
import torch

from models.vqvae2 import PRESETS, VQVAE2, ConfigError, VQVAE2Config, preset
from tests.helpers import tiny_vqvae


def _model(**changes) -> VQVAE2:
    torch.manual_seed(0)
    return VQVAE2(VQVAE2Config(**tiny_vqvae(**changes)))


@pytest.mark.parametrize(
    "levels,size,expected",
    [
        (1, 32, {"codes": (8, 8)}),
        (2, 32, {"bottom": (8, 8), "top": (4, 4)}),
        (3, 64, {"bottom": (16, 16), "middle": (8, 8), "top": (4, 4)}),
    ],
)
def test_shapes_per_level(levels, size, expected):
    model = _model(levels=levels, image_size=size, in_channels=3)
    x = torch.rand(2, 3, size, size) * 2 - 1
    out = model(x)
    assert out["x_hat"].shape == x.shape
    codes = model.encode_indices(x)
    assert {k: tuple(v.shape[1:]) for k, v in codes.items()} == expected
    assert model.config.grid_shapes() == expected
    assert all(v.dtype == torch.int64 and v.max() < 32 for v in codes.values())


def test_loss_terms_are_named_and_finite():
    out = _model(in_channels=1)(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert set(out) == {
        "x_hat",
        "loss",
        "recon",
        "commitment",
        "codebook",
        "perplexity/bottom",
        "perplexity/top",
        "usage/bottom",
        "usage/top",
        "restarts/bottom",
        "restarts/top",
    }
    for k in ("loss", "recon", "commitment", "codebook"):
        assert torch.isfinite(out[k]), k
    torch.testing.assert_close(
        out["loss"], out["recon"] + 0.25 * out["commitment"] + out["codebook"]
    )


def test_config_rejects_grids_that_do_not_divide_the_image():
    with pytest.raises(
        ConfigError, match=r"image_size: 28 is not divisible by .* = 8.*pad 28 -> 32"
    ):
        VQVAE2Config(image_size=28)
    with pytest.raises(ConfigError, match="levels: must be 1, 2 or 3"):
        VQVAE2Config(levels=4)
    with pytest.raises(ConfigError, match="codebook_size"):
        VQVAE2Config(codebook_size=70000)
    assert VQVAE2Config(image_size=28, levels=1, bottom_stride=4).grid_shapes() == {"codes": (7, 7)}


def test_presets():
    assert PRESETS["32px"].grid_shapes() == {"bottom": (8, 8), "top": (4, 4)}
    assert PRESETS["64px"].grid_shapes() == {"bottom": (16, 16), "top": (8, 8)}
    assert PRESETS["256px"].grid_shapes() == {"bottom": (64, 64), "top": (32, 32)}
    assert preset("32px", in_channels=1).in_channels == 1


def test_decode_of_encode_equals_eval_forward():
    model = _model(in_channels=1)
    model.train()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    model(x)  # initialise codebooks from data
    model.eval()
    with torch.no_grad():
        forward = model(x)["x_hat"]
    torch.testing.assert_close(
        model.decode_indices(model.encode_indices(x)), forward, rtol=0, atol=0
    )


def test_save_load_identical(tmp_path):
    model = _model(in_channels=1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    model.train()
    model(x)
    model.eval()
    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQVAE2.load(tmp_path).eval()
    codes = model.encode_indices(x)
    assert all(torch.equal(codes[k], loaded.encode_indices(x)[k]) for k in codes)
    assert torch.equal(model.decode_indices(codes), loaded.decode_indices(codes))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        VQVAE2.load(tmp_path)


def test_same_seed_same_model_and_one_step_changes_weights():
    a, b = _model(in_channels=1), _model(in_channels=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    opt = torch.optim.Adam(a.parameters(), 1e-3)
    out = a(torch.rand(4, 1, 32, 32) * 2 - 1)
    out["loss"].backward()
    opt.step()
    after = a.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("encoders.0" in k for k in changed) and any("decoder." in k for k in changed)
    assert any("quantizers.0.embed" in k for k in changed)  # EMA codebook moved


def test_bf16_autocast_runs_and_keeps_codebook_fp32():
    model = _model(in_channels=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert torch.isfinite(out["loss"])
    assert model.quantizers[0].embed.dtype == torch.float32
    assert model.quantizers[0].cluster_size.dtype == torch.float32
