"""Vector quantizer: nearest code, EMA update by hand, dead-code restart, gradients."""

import torch

from models.quantize import VectorQuantizer, _kmeans_pp


def _ready(q: VectorQuantizer, codebook: torch.Tensor) -> VectorQuantizer:
    """Sets a known codebook and marks it initialised (skips data init)."""
    q.embed.data.copy_(codebook)
    if q.update == "ema":
        q.embed_sum.copy_(codebook)
        q.cluster_size.fill_(1.0)
    q.initialized.fill_(True)
    return q


def test_nearest_code_equals_brute_force_cdist():
    torch.manual_seed(0)
    q = _ready(VectorQuantizer(37, 5), torch.randn(37, 5))
    z = torch.randn(4, 5, 6, 7)
    q.eval()
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    expected = torch.cdist(flat, q.embed).argmin(1).reshape(4, 6, 7)
    assert torch.equal(out.indices, expected)
    # quantized vectors are exactly the chosen codes in eval mode
    assert torch.equal(out.quantized, q.embed[expected].permute(0, 3, 1, 2))


def test_ema_update_matches_hand_computation():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]])
    q = _ready(VectorQuantizer(3, 2, decay=0.5, eps=1e-5, dead_code_steps=0), codebook.clone())
    # four vectors: three near code 0, one near code 1, none near code 2
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 11.0]])
    z = vectors.t().reshape(1, 2, 1, 4)  # b d h w with h=1, w=4
    q.train()
    q(z)
    counts = torch.tensor([3.0, 1.0, 0.0])
    sums = torch.stack([vectors[:3].sum(0), vectors[3], torch.zeros(2)])
    cluster = 0.5 * torch.ones(3) + 0.5 * counts
    embed_sum = 0.5 * codebook + 0.5 * sums
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + 3 * 1e-5) * n
    expected = embed_sum / smoothed[:, None]
    torch.testing.assert_close(q.cluster_size, cluster)
    torch.testing.assert_close(q.embed_sum, embed_sum)
    torch.testing.assert_close(q.embed, expected)


def test_dead_codes_are_restarted_to_encoder_outputs():
    torch.manual_seed(0)
    codebook = torch.cat([torch.zeros(1, 3), 100 + torch.randn(7, 3)])  # 7 codes far away
    q = _ready(VectorQuantizer(8, 3, dead_code_steps=3), codebook)
    q.train()
    z = 0.1 * torch.randn(2, 3, 4, 4)
    restarts = [q(z).restarts for _ in range(3)]
    assert restarts == [0, 0, 7]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # every restarted code is now one of the batch's encoder outputs, with fresh statistics
    for code in q.embed[1:]:
        assert torch.isclose(flat, code).all(1).any()
    assert torch.all(q.unused_steps == 0)
    assert torch.all(q.cluster_size[1:] == 1.0)
    out = q(z)
    assert out.usage > 1 / 8  # the restarted codes are used now


def test_first_training_batch_initialises_the_codebook():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4)
    z = torch.randn(8, 4, 4, 4) * 5 + 3
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    q.eval()
    q(z)
    assert not bool(q.initialized)  # evaluation never initialises
    q.train()
    seeds = []
    original = q._init_from_data
    q._init_from_data = lambda x: (original(x), seeds.append(q.embed.clone()))
    q(z)
    assert bool(q.initialized) and len(seeds) == 1
    # k-means++ seeds are 16 distinct data points
    assert all(torch.isclose(flat, c).all(1).any() for c in seeds[0])
    assert len({tuple(c.tolist()) for c in seeds[0]}) == 16
    q(z)
    assert len(seeds) == 1  # only once
    assert _kmeans_pp(flat[:5], 16).shape == (16, 4)  # fewer vectors than codes still works


def test_straight_through_and_commitment_gradients():
    torch.manual_seed(0)
    q = _ready(VectorQuantizer(8, 3, dead_code_steps=0), torch.randn(8, 3))
    q.train()
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity
    z.grad = None
    codebook = q.embed.clone()
    q(z).commitment.backward()  # updates the codebook (EMA) after assigning with the old one
    target = codebook[torch.cdist(z.detach().permute(0, 2, 3, 1), codebook).argmin(-1)]
    target = target.permute(0, 3, 1, 2)
    torch.testing.assert_close(z.grad, 2 * (z - target).detach() / z.numel())


def test_gradient_codebook_gets_codebook_loss():
    torch.manual_seed(0)
    q = _ready(VectorQuantizer(8, 3, update="gradient", dead_code_steps=0), torch.randn(8, 3))
    q.train()
    out = q(torch.randn(2, 3, 2, 2))
    assert out.codebook > 0
    out.codebook.backward()
    assert q.embed.grad is not None and q.embed.grad.abs().sum() > 0
