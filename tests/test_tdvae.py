"""TD-VAE on a tiny CPU config: per-sequence (t1, Δ), jump-conditioned transition, exact KL
against Monte Carlo, loss terms, one optimizer step, save -> load, prediction shapes."""

import torch
from torch.distributions import Normal

from models.losses import gaussian_kl_between
from models.tdvae import TDVAE, TDVAEConfig

TINY = TDVAEConfig(
    image_size=8, channels=4, frame_features=16, belief_dim=16, hidden_dim=16, latent_dim=3,
    layers=2, max_jump=4,
)  # fmt: skip


def _model(**changes) -> TDVAE:
    torch.manual_seed(0)
    from dataclasses import replace

    return TDVAE(replace(TINY, **changes))


def _frames(b: int = 6, t: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 1, 8, 8, generator=g) * 0.8 + 0.1


def test_pairs_differ_across_the_sequences_of_one_batch():
    model = _model()
    t1, delta = model.sample_pairs(64, 10, torch.Generator().manual_seed(0))
    assert len(set(delta.tolist())) == TINY.max_jump  # every jump size occurs
    assert len(set(t1.tolist())) > 3
    assert bool((delta >= 1).all()) and bool((t1 + delta <= 9).all()) and bool((t1 >= 0).all())
    out = model(_frames(b=16, t=10), generator=torch.Generator().manual_seed(1))
    assert len(set(zip(out["t1"].tolist(), out["delta"].tolist(), strict=True))) > 1


def test_jump_sizes_limited_by_sequence_length():
    t1, delta = _model().sample_pairs(200, 3, torch.Generator().manual_seed(0))
    assert set(delta.tolist()) == {1, 2}
    assert bool((t1 + delta <= 2).all())


def test_transition_output_changes_with_the_jump_size():
    model = _model()
    z = torch.randn(5, TINY.layers * TINY.latent_dim)
    means = []
    for jump in (1, 2, 3):
        params, _ = model.transition(z, torch.full((5,), jump))
        means.append(torch.cat([mu for mu, _ in params], -1))
    assert not torch.allclose(means[0], means[1])
    assert not torch.allclose(means[1], means[2])


def test_exact_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    logvar_q, logvar_p = torch.randn(4, 3, generator=g) * 0.5, torch.randn(4, 3, generator=g) * 0.5
    exact = gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p)
    q = Normal(mu_q, (0.5 * logvar_q).exp())
    p = Normal(mu_p, (0.5 * logvar_p).exp())
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(exact, monte_carlo, atol=0.03, rtol=0.02)
    same = gaussian_kl_between(mu_q, logvar_q, mu_q, logvar_q)
    torch.testing.assert_close(same, torch.zeros(4), atol=1e-6, rtol=0)


def test_loss_terms_are_named_finite_and_combine():
    out = _model()(_frames())
    assert set(out) == {
        "loss", "recon", "kl", "belief_t2", "transition", "info_weight", "t1", "delta"
    }  # fmt: skip
    for key in ("loss", "recon", "kl", "belief_t2", "transition"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    expected = out["recon"] + out["kl"] + out["belief_t2"] - out["transition"]
    torch.testing.assert_close(out["loss"], expected)
    assert out["kl"] >= 0


def test_warmup_weight_follows_optimizer_steps():
    model = _model(warmup_steps=4)
    frames = _frames()
    weights = []
    for _ in range(6):
        out = model(frames)
        weights.append(float(out["info_weight"]))
        info = out["kl"] + out["belief_t2"] - out["transition"]
        torch.testing.assert_close(out["loss"], out["recon"] + out["info_weight"] * info)
        model.advance()
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    model.eval()
    model(frames)  # forward passes never advance it
    assert int(model.step) == 6


def test_given_pairs_pick_the_target_frame():
    model = _model()
    frames = _frames(b=2)
    frames[1, 5] = 0.0  # the target of sequence 1 is black: a very different recon term
    t1, delta = torch.tensor([0, 2]), torch.tensor([1, 3])
    torch.manual_seed(0)
    a = model(frames, t1, delta)
    frames2 = frames.clone()
    frames2[1, 6] = 1.0  # not a frame the pair reads
    torch.manual_seed(0)
    b = model(frames2, t1, delta)
    # frame 6 comes after t2 = 5: beliefs up to t2 and the target are unchanged
    torch.testing.assert_close(a["loss"], b["loss"])


def test_one_optimizer_step_changes_every_part():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(_frames())["loss"].backward()
    optimizer.step()
    changed = {
        k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])
    }
    assert {
        "encoder",
        "belief",
        "belief_heads",
        "smoothing_heads",
        "transition_heads",
        "decoder",
    } <= changed


def test_save_load_identical(tmp_path):
    model = _model()
    model.save(tmp_path)
    loaded = TDVAE.load(tmp_path)
    frames = _frames()
    torch.manual_seed(3)
    a = model(frames, torch.tensor([0] * 6), torch.tensor([2] * 6))
    torch.manual_seed(3)
    b = loaded(frames, torch.tensor([0] * 6), torch.tensor([2] * 6))
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_predict_and_rollout_shapes_and_seeded():
    model = _model().eval()
    context = _frames(b=3, t=4)
    pred = model.predict(context, [1, 2, 3], samples=2, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 3, 3, 1, 8, 8)
    assert float(pred.min()) >= 0 and float(pred.max()) <= 1
    roll = model.rollout(
        context, steps=5, jump=2, samples=2, generator=torch.Generator().manual_seed(0)
    )
    again = model.rollout(
        context, steps=5, jump=2, samples=2, generator=torch.Generator().manual_seed(0)
    )
    assert roll.shape == (2, 3, 5, 1, 8, 8)
    assert torch.equal(roll, again)
    assert not torch.equal(roll[0], roll[1])  # two samples differ


def test_several_independent_pairs_per_sequence():
    out = _model(pairs=3)(_frames(b=6, t=10), generator=torch.Generator().manual_seed(0))
    assert out["t1"].shape == (18,) and out["delta"].shape == (18,)
    pairs = list(zip(out["t1"].tolist(), out["delta"].tolist(), strict=True))
    assert len(set(pairs[0::6])) > 1  # sequence 0's three pairs are drawn independently
    assert torch.isfinite(out["loss"])


def test_frame_skip_belief_sees_the_current_frame_but_not_later_ones():
    model = _model(frame_skip=True)
    frames = _frames(b=2, t=5)
    beliefs = model.beliefs(frames)
    assert beliefs.shape == (2, 5, TINY.belief_dim + TINY.frame_features)
    changed = frames.clone()
    changed[:, 3] = 1 - changed[:, 3]
    after = model.beliefs(changed)
    torch.testing.assert_close(after[:, :3], beliefs[:, :3], rtol=0, atol=0)  # causal
    skip = slice(TINY.belief_dim, None)  # the current frame's own features
    assert not torch.allclose(after[:, 3, skip], beliefs[:, 3, skip])
    torch.testing.assert_close(after[:, 4, skip], beliefs[:, 4, skip], rtol=0, atol=0)
    out = model(frames, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    assert model.predict(frames[:, :3], [1, 2], samples=2).shape == (2, 2, 2, 1, 8, 8)
