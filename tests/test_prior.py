"""Code prior on tiny configs: shapes, causality, cached == uncached sampling, CFG, save/load."""

import math

import pytest
import torch
from einops import rearrange

from models.prior import CodePrior, PriorConfig
from models.prior_sampling import (
    CachedDecoder,
    check_precision,
    fp16_weights_available,
    sample_token,
)


def _prior(**changes) -> CodePrior:
    torch.manual_seed(0)
    config = dict(
        grid=[4, 4],
        codebook_size=16,
        context_grids={"top": [2, 2]},
        context_codebook_sizes={"top": 8},
        num_classes=3,
        hidden_size=32,
        layers=2,
        heads=2,
    )
    return CodePrior(PriorConfig(**{**config, **changes}))


def _batch(b=3):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, 16, (b, 4, 4), generator=g),
        {"top": torch.randint(0, 8, (b, 2, 2), generator=g)},
        torch.tensor([0, 2, -1])[:b],
    )


@pytest.mark.parametrize("patch", [[1, 1], [2, 2]])
def test_shapes_loss_keys_and_initial_nll(patch):
    prior = _prior(patch=patch).eval()
    codes, context, labels = _batch()
    out = prior(codes, context, labels)
    assert set(out) == {"logits", "nll", "loss"}
    assert out["logits"].shape == (3, 16, 16)
    assert torch.isfinite(out["loss"])
    assert abs(out["nll"].item() - math.log(16)) < 0.5  # near uniform at initialisation


def test_logits_are_causal():
    prior = _prior().eval()
    codes, context, labels = _batch()
    base = prior(codes, context, labels)["logits"]
    changed = codes.clone()
    changed[:, 2, 1] = (changed[:, 2, 1] + 1) % 16  # flat position 9
    after = prior(changed, context, labels)["logits"]
    torch.testing.assert_close(after[:, :10], base[:, :10])  # logits for codes 0..9 unchanged
    assert not torch.allclose(after[:, 10:], base[:, 10:])
    other_context = {"top": (context["top"] + 1) % 8}
    assert not torch.allclose(prior(codes, other_context, labels)["logits"][:, :1], base[:, :1])


def test_patch_logits_are_causal_in_patch_order():
    prior = _prior(patch=[2, 2]).eval()
    codes, context, labels = _batch()

    def in_patch_order(logits):  # b (h w) k -> b (n s) k
        grid = rearrange(logits, "b (h w) k -> b h w k", h=4)
        return rearrange(prior.to_patches(grid), "b n s k -> b (n s) k")

    base = in_patch_order(prior(codes, context, labels)["logits"])
    changed = codes.clone()
    changed[:, 1, 0] = (changed[:, 1, 0] + 1) % 16  # patch 0, third code
    after = in_patch_order(prior(changed, context, labels)["logits"])
    torch.testing.assert_close(after[:, :3], base[:, :3])  # it and the codes before it
    for later in range(3, 16):  # the rest of its patch and every later patch see it
        assert not torch.allclose(after[:, later], base[:, later])


@pytest.mark.parametrize("patch", [[1, 1], [2, 2]])
def test_greedy_sampling_agrees_with_the_teacher_forced_logits(patch):
    """Sampling and training share one model: greedy codes are the forward's argmax."""
    prior = _prior(patch=patch).eval()
    _, context, labels = _batch()
    codes = prior.sample(3, context, labels, temperature=0.0).clone()
    with torch.no_grad():
        logits = prior(codes, context, labels)["logits"]
    assert torch.equal(logits.argmax(-1), rearrange(codes, "b h w -> b (h w)"))


@pytest.mark.parametrize("kv_heads", [0, 2, 1])
def test_cached_decoder_matches_the_transformers_forward(kv_heads):
    prior = _prior(layers=3, heads=4, kv_heads=kv_heads).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        reference = prior.decoder(inputs_embeds=x).last_hidden_state
        cached = CachedDecoder(prior.decoder, batch=2, length=9, like=x)
        parts = [cached(x[:, :4]), cached(x[:, 4:5]), cached(x[:, 5:7]), cached(x[:, 7:])]
    torch.testing.assert_close(torch.cat(parts, 1), reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        cached(x[:, :1])


@pytest.mark.parametrize(
    "precision,cache_dtype,tolerance",
    [
        ("bf16", torch.bfloat16, 0.01),
        pytest.param(
            "fp16_weights",
            torch.float32,
            2e-3,
            marks=pytest.mark.skipif(not fp16_weights_available(), reason="needs fbgemm (x86)"),
        ),
    ],
)
def test_lower_precision_decoder_stays_close_to_fp32_and_samples_valid_codes(
    precision, cache_dtype, tolerance
):
    prior = _prior(layers=3, heads=4, kv_heads=2).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        reference = prior.decoder(inputs_embeds=x).last_hidden_state
        cached = CachedDecoder(prior.decoder, batch=2, length=9, like=x, precision=precision)
        out = torch.cat([cached(x[:, :4]), cached(x[:, 4:5]), cached(x[:, 5:])], 1)
    assert cached.keys.dtype == cache_dtype and out.dtype == torch.float32
    assert not torch.equal(out, reference)  # rounded products: close, but not the fp32 numbers
    assert (out - reference).norm() / reference.norm() < tolerance
    _, context, labels = _batch()
    codes = [
        prior.sample(
            3, context, labels, generator=torch.Generator().manual_seed(0), precision=precision
        )
        for _ in range(2)
    ]
    assert codes[0].shape == (3, 4, 4) and 0 <= int(codes[0].min()) and int(codes[0].max()) < 16
    assert torch.equal(codes[0], codes[1])  # same seed, same codes


def test_unknown_or_unavailable_precision_is_refused():
    prior = _prior().eval()
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, fp16_weights"):
        prior.sample(3, _batch()[1], precision="fp8")
    with pytest.raises(ValueError, match="fp16_weights runs on x86 CPUs, not on cuda; use fp32"):
        check_precision("fp16_weights", torch.device("cuda"))


@pytest.mark.parametrize("patch,kv_heads", [([1, 1], 0), ([2, 2], 0), ([1, 4], 0), ([1, 1], 1)])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_sampling_equals_full_recompute(guidance, patch, kv_heads):
    prior = _prior(patch=patch, kv_heads=kv_heads).eval()
    _, context, labels = _batch()
    samples = [
        prior.sample(
            3,
            context,
            labels,
            temperature=1.0,
            top_k=8,
            top_p=0.9,
            guidance=guidance,
            generator=torch.Generator().manual_seed(7),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert samples[0].shape == (3, 4, 4)
    assert torch.equal(samples[0], samples[1])


def test_same_seed_same_samples_other_seed_other_samples():
    prior = _prior().eval()
    _, context, labels = _batch()
    a = prior.sample(3, context, labels, generator=torch.Generator().manual_seed(3))
    b = prior.sample(3, context, labels, generator=torch.Generator().manual_seed(3))
    c = prior.sample(3, context, labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_token(logits, 1.0, 2, 1.0, g).tolist()) <= {2, 3}
    assert set(sample_token(logits, 1.0, 0, 0.5, g).tolist()) <= {3, 2}
    assert set(sample_token(logits, 0.0, 0, 1.0, g).tolist()) == {3}


def test_sampling_draws_from_the_softmax():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4])
    logits = probs.log().repeat(40_000, 1)  # log 0 = -inf: never drawn
    draws = sample_token(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=5) / len(draws)
    assert frequencies[1] == 0
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=0.01)  # ~4 standard errors


def test_class_dropout_only_in_training_and_one_step_learns():
    prior = _prior(class_dropout=0.5)
    codes, context, labels = _batch()
    prior.eval()
    assert torch.equal(
        prior(codes, context, labels)["logits"], prior(codes, context, labels)["logits"]
    )
    prior.train()
    opt = torch.optim.AdamW(prior.parameters(), 3e-3)
    first = None
    for _ in range(30):
        out = prior(codes, context, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < first  # fits the tiny batch


@pytest.mark.parametrize("patch", [[1, 1], [2, 2]])
def test_save_load_identical(tmp_path, patch):
    prior = _prior(patch=patch).eval()
    prior.save(tmp_path)
    loaded = CodePrior.load(tmp_path).eval()
    codes, context, labels = _batch()
    torch.testing.assert_close(
        prior(codes, context, labels)["logits"],
        loaded(codes, context, labels)["logits"],
        rtol=0,
        atol=0,
    )
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        CodePrior.load(tmp_path)


def test_config_checks():
    with pytest.raises(ValueError, match="hidden_size: 30 is not divisible by heads 4"):
        PriorConfig(hidden_size=30, heads=4)
    with pytest.raises(ValueError, match=r"patch: must be two positive sizes that divide"):
        PriorConfig(grid=[4, 4], patch=[3, 2])
    with pytest.raises(ValueError, match=r"kv_heads: must divide heads \(4\), got 3"):
        PriorConfig(heads=4, kv_heads=3)
