"""Classic autoencoder families on tiny CPU configs: interface, save/load, one step, and numeric
checks against independent references (Monte Carlo KL, autograd Jacobian, top-k gradients,
clean denoising targets, capacity schedule, importance-weighted NLL)."""

import math
from dataclasses import replace

import pytest
import torch
from einops import repeat
from torch.distributions import Normal

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.contractive import ContractiveAutoencoder, ContractiveConfig
from models.conv import ConvDecoder, ConvEncoder
from models.cvae import ConditionalVAE, ConditionalVAEConfig
from models.denoising import DenoisingAutoencoder, DenoisingConfig
from models.ksparse import KSparseAutoencoder, KSparseConfig
from models.losses import gaussian_kl, reconstruction
from models.sparse import SparseAutoencoder, SparseConfig
from models.vae import VAE, VAEConfig

TINY = dict(in_channels=1, image_size=8, channels=8, latent_dim=4)
OUTPUTS = {"loss", "recon", "recon_logits", "z"}
VAE_OUTPUTS = OUTPUTS | {"kl", "capacity"}

# family -> (model class, config, exact output keys)
FAMILIES = {
    "autoencoder": (Autoencoder, AutoencoderConfig(**TINY), OUTPUTS),
    "denoising": (DenoisingAutoencoder, DenoisingConfig(**TINY), OUTPUTS),
    "sparse": (SparseAutoencoder, SparseConfig(**TINY), OUTPUTS | {"sparsity"}),
    "ksparse": (KSparseAutoencoder, KSparseConfig(**TINY, k=2), OUTPUTS),
    "contractive": (ContractiveAutoencoder, ContractiveConfig(**TINY), OUTPUTS | {"contractive"}),
    "vae": (VAE, VAEConfig(**TINY), VAE_OUTPUTS),
    "beta_vae": (
        VAE,
        VAEConfig(**TINY, family="beta_vae", beta=4.0, capacity_max=5.0, capacity_steps=10),
        VAE_OUTPUTS,
    ),
    "cvae": (ConditionalVAE, ConditionalVAEConfig(**TINY, num_classes=3), VAE_OUTPUTS),
}


def _model(family: str, **changes):
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    return cls(replace(config, **changes))


def _batch(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 8, 8, generator=g) * 0.8 + 0.1  # no exact 0 or 1
    labels = torch.randint(0, 3, (b,), generator=g)
    return x, labels


def _expected_loss(family: str, out: dict, model) -> torch.Tensor:
    c = model.config
    if family == "sparse":
        return out["recon"] + c.beta * out["sparsity"]
    if family == "contractive":
        return out["recon"] + c.weight * out["contractive"]
    if family == "beta_vae":
        return out["recon"] + c.gamma * (out["kl"] - out["capacity"]).abs()
    if family in ("vae", "cvae"):
        return out["recon"] + out["kl"]
    return out["recon"]


# ----- interface ---------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_are_the_named_terms_and_finite(family, likelihood):
    model = _model(family, likelihood=likelihood)
    x, labels = _batch()
    out = model(x, labels)
    assert set(out) == FAMILIES[family][2]
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    assert out["recon_logits"].shape == x.shape
    assert out["z"].shape == (4, 4)
    torch.testing.assert_close(out["loss"], _expected_loss(family, out, model))
    z = model.encode(x, labels)
    assert z.shape == (4, 4)
    images = model.decode(z, labels)
    assert images.shape == x.shape
    assert images.min() >= 0 and images.max() <= 1
    model.eval()
    assert set(model(x, labels)) == FAMILIES[family][2]  # keys do not depend on the mode


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_optimizer_step_changes_the_weights(family):
    model = _model(family)
    x, labels = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(x, labels)["loss"].backward()
    opt.step()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(before[name], p.detach()), name
    assert not torch.equal(before["encoder.net.0.weight"], model.encoder.net[0].weight)
    assert not torch.equal(before["decoder.net.0.weight"], model.decoder.net[0].weight)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_gives_identical_outputs(family, tmp_path):
    model = _model(family).eval()
    x, labels = _batch()
    torch.manual_seed(1)
    expected = model(x, labels)
    model.save(tmp_path / family)
    assert {p.name for p in (tmp_path / family).iterdir()} == {"config.json", "model.safetensors"}
    loaded = type(model).load(tmp_path / family).eval()
    assert loaded.config == model.config
    torch.manual_seed(1)
    actual = loaded(x, labels)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert torch.equal(model.encode(x, labels), loaded.encode(x, labels))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deterministic_under_a_seed(family):
    x, labels = _batch()
    outs = []
    for _ in range(2):
        model = _model(family).train()
        torch.manual_seed(1)
        outs.append(model(x, labels))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        VAE.load(tmp_path)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_size: must be a power of two >= 8"):
        AutoencoderConfig(image_size=28)
    with pytest.raises(ValueError, match=r"k: must be in \[1, latent_dim=4\]"):
        KSparseConfig(latent_dim=4, k=5)
    with pytest.raises(ValueError, match="set family: beta_vae"):
        VAEConfig(beta=4.0)
    with pytest.raises(ValueError, match="likelihood"):
        SparseConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="rho"):
        SparseConfig(rho=1.5)
    with pytest.raises(ValueError, match="noise_level"):
        DenoisingConfig(noise_level=1.5)
    with pytest.raises(ValueError, match="family"):
        ContractiveConfig(family="vae")
    with pytest.raises(ValueError, match="hidden: must be >= 0"):
        VAEConfig(hidden=-1)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_conv_blocks_round_trip_the_image_size(size):
    encoder, decoder = ConvEncoder(3, size, 4, 5), ConvDecoder(5, 3, size, 4)
    z = encoder(torch.rand(2, 3, size, size))
    assert z.shape == (2, 5)
    assert decoder(z).shape == (2, 3, size, size)


def test_conv_blocks_hidden_adds_two_fully_connected_layers():
    plain, wide = ConvEncoder(1, 16, 4, 6), ConvEncoder(1, 16, 4, 6, hidden=32)
    linear = [m for m in wide.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(8 * 16, 32), (32, 32), (32, 6)]
    assert sum(isinstance(m, torch.nn.Linear) for m in plain.net) == 1
    decoder = ConvDecoder(6, 1, 16, 4, hidden=32)
    linear = [m for m in decoder.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(6, 32), (32, 32), (32, 8 * 16)]
    assert decoder(wide(torch.rand(2, 1, 16, 16))).shape == (2, 1, 16, 16)
    model = VAE(VAEConfig(image_size=16, channels=4, latent_dim=3, hidden=32))
    assert torch.isfinite(model(torch.rand(2, 1, 16, 16))["loss"])


# ----- numeric checks ----------------------------------------------------------------------


def test_closed_form_kl_equals_monte_carlo():
    model = _model("vae")
    x, _ = _batch()
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        # spread the posterior so the KL is far from 0
        mu, logvar = mu * 4 + 0.5, logvar * 4 - 0.5
        closed = gaussian_kl(mu, logvar)
        q = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
        z = q.sample((200_000,))
        samples = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)  # n b
    estimate, stderr = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert (closed.double() - estimate).abs().max() < 5 * stderr.max() + 1e-4
    assert closed.min() > 1.0
    out = model(x)
    mu, logvar = model.posterior(x)
    torch.testing.assert_close(out["kl"], gaussian_kl(mu, logvar).mean())


def test_contractive_penalty_is_the_exact_jacobian_norm():
    model = _model("contractive", latent_dim=3)
    x, _ = _batch(b=3)
    out = model(x)
    jac = torch.autograd.functional.jacobian(model.encode, x)  # b d b c h w
    expected = sum(jac[i, :, i].pow(2).sum() for i in range(3)) / 3
    torch.testing.assert_close(out["contractive"], expected, rtol=1e-5, atol=1e-8)
    out["contractive"].backward()  # the penalty trains the encoder
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # validation still reports it
        torch.testing.assert_close(model(x)["contractive"], expected, rtol=1e-5, atol=1e-8)


def test_ksparse_gradients_flow_only_through_kept_units():
    model = _model("ksparse", latent_dim=4, k=2)
    x, _ = _batch(b=6)
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    model.encoder.register_forward_hook(keep)
    out = model(x)
    out["loss"].backward()
    pre, kept = captured[0], out["z"] != 0
    assert torch.equal(kept.sum(1), torch.full((6,), 2))
    top = pre.topk(2, dim=1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter(1, top, True))
    assert torch.all(pre.grad[~kept] == 0)
    assert torch.all(pre.grad[kept] != 0)


def test_denoising_masks_exactly_the_fraction_and_leaves_x_alone():
    model = _model("denoising", noise_level=0.25)
    x, _ = _batch(b=5)
    original = x.clone()
    corrupted = model.corrupt(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, original)
    zeros = (corrupted == 0).flatten(1).sum(1)
    assert torch.equal(zeros, torch.full((5,), round(0.25 * 64)))
    kept = corrupted != 0
    assert torch.equal(corrupted[kept], x[kept])
    again = model.corrupt(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(corrupted, again)


def test_denoising_other_noises():
    x, _ = _batch(b=5)
    model = _model("denoising", noise="salt_and_pepper", noise_level=0.5)
    corrupted = model.corrupt(x, generator=torch.Generator().manual_seed(0))
    changed = corrupted != x
    assert torch.equal(changed.flatten(1).sum(1), torch.full((5,), 32))
    assert set(corrupted[changed].tolist()) == {0.0, 1.0}
    model = _model("denoising", noise="gaussian", noise_level=0.3)
    corrupted = model.corrupt(x)
    assert corrupted.min() >= 0 and corrupted.max() <= 1 and (corrupted != x).all()


def test_denoising_scores_the_clean_input_and_eval_does_not_corrupt():
    model = _model("denoising").train()
    x, _ = _batch()
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    corrupted = model.corrupt(x)
    assert not torch.equal(corrupted, x)
    logits = model.decoder(model.encoder(corrupted))
    torch.testing.assert_close(out["recon_logits"], logits)
    torch.testing.assert_close(out["recon"], reconstruction(logits, x, "bernoulli").mean())
    assert not torch.allclose(out["recon"], reconstruction(logits, corrupted, "bernoulli").mean())
    model.eval()
    out = model(x)
    torch.testing.assert_close(out["recon_logits"], model.decoder(model.encoder(x)))


def test_capacity_follows_the_optimizer_step(tmp_path):
    model = _model("beta_vae")  # capacity_max 5 nats over 10 steps
    x, _ = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for n in range(14):
        assert float(model.capacity()) == pytest.approx(5.0 * min(1.0, n / 10))
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        out = model(x)
        assert int(model.step) == n  # forward passes do not advance it
        torch.testing.assert_close(out["capacity"], model.capacity())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.advance()
        if n == 3:
            model.save(tmp_path / "vae")
    loaded = VAE.load(tmp_path / "vae")
    assert loaded.step.dtype == torch.int64 and int(loaded.step) == 4
    assert float(loaded.capacity()) == pytest.approx(2.0)
    off = _model("vae")
    off.advance()
    assert float(off.capacity()) == 0.0


def test_beta_weights_the_kl():
    model = _model("beta_vae", capacity_max=None)
    out = model(_batch()[0])
    torch.testing.assert_close(out["loss"], out["recon"] + 4.0 * out["kl"])
    assert float(out["capacity"]) == 0.0


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iw_nll_k1_is_the_negative_elbo_and_more_samples_tighten_it(likelihood):
    model = _model("vae", likelihood=likelihood).eval()
    x, _ = _batch()
    many = repeat(x, "b c h w -> (n b) c h w", n=500)
    torch.manual_seed(0)
    one = model.iw_nll(many, k=1)
    with torch.no_grad():
        out = model(many)
    elbo = out["recon"] + out["kl"]
    assert one.shape == (2000,) and torch.isfinite(one).all()
    assert abs(float(one.mean() - elbo)) < 5 * float(one.std()) / math.sqrt(2000)
    few = repeat(x, "b c h w -> (n b) c h w", n=25)
    tight = model.iw_nll(few, k=100, chunk=30)  # 4 chunks
    assert torch.isfinite(tight).all()
    assert tight.mean() <= model.iw_nll(few, k=1).mean()


def test_cvae_needs_labels_and_uses_them():
    model = _model("cvae").eval()
    x, labels = _batch()
    with pytest.raises(ValueError, match="labels are required"):
        model(x)
    with pytest.raises(ValueError, match="labels are required"):
        model.decode(torch.zeros(4, 4))
    z = model.encode(x, labels)
    assert not torch.equal(model.decode(z, labels), model.decode(z, (labels + 1) % 3))
    nll = model.iw_nll(x, k=8, labels=labels)
    assert nll.shape == (4,) and torch.isfinite(nll).all()


def test_contractive_penalty_on_a_subset_is_that_subsets_exact_penalty():
    x, _ = _batch(b=6)
    full = _model("contractive")
    part = _model("contractive", penalty_examples=2)
    _, per_example = full.code_and_penalty(x)
    out = part(x)
    torch.testing.assert_close(out["contractive"], per_example[:2].mean())
    torch.testing.assert_close(out["recon"], full(x)["recon"])  # the code is the full batch's
