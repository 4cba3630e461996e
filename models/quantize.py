"""Vector quantizer (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Shapes: inputs ``b d h w`` (d = code dimension), indices ``b h w``; internally the vectors are
flattened to ``n d`` with n = b*h*w.

Loss terms (Eq. 3 of the paper):
- ``commitment`` = ||z_e - sg[e]||^2 (mean over elements), weighted by ``commitment_cost`` (beta);
- ``codebook`` = ||sg[z_e] - e||^2, only with ``update="gradient"``; with ``update="ema"`` the
  codebook follows exponential moving averages of the assigned encoder outputs instead
  (Appendix A.1), with Laplace-smoothed cluster sizes, and this term is zero.
Gradients reach the encoder through the straight-through estimator.

Codebook health:
- the codebook is initialised from the first training batch (k-means++ seeding);
- a code unused for ``dead_code_steps`` consecutive training steps is restarted at a random
  encoder output of the current batch, and its EMA statistics are reset to that vector;
- under torch.distributed the batch statistics (counts, sums) are all-reduced and restart
  vectors broadcast from rank 0, so every replica holds the same codebook every step.
All statistics are kept in fp32, also under bf16 autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class QuantizerOutput:
    """What one quantizer call returns.

    Attributes:
        quantized: ``b d h w`` codebook vectors (straight-through in training).
        indices: ``b h w`` int64 code indices.
        commitment: ||z_e - sg[e]||^2, unweighted.
        codebook: ||sg[z_e] - e||^2, unweighted (zero for EMA codebooks).
        perplexity: exp(entropy) of this batch's code histogram (all ranks).
        usage: fraction of codes used by this batch (all ranks).
        restarts: number of dead codes restarted by this call.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    restarts: int


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with EMA or gradient-trained codebook.

    Args:
        codebook_size: Number of codes K.
        dim: Code dimension D.
        commitment_cost: beta of the commitment term (paper default 0.25).
        update: ``ema`` (paper's Appendix A.1) or ``gradient``.
        decay: EMA decay gamma (default 0.99).
        eps: Laplace smoothing of the EMA cluster sizes.
        dead_code_steps: Restart a code unused for this many training steps (0: never).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_cost: float = 0.25,
        update: str = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_steps: int = 100,
    ):
        super().__init__()
        if update not in ("ema", "gradient"):
            raise ValueError(f"update must be 'ema' or 'gradient', got {update!r}")
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_cost, self.update = commitment_cost, update
        self.decay, self.eps, self.dead_code_steps = decay, eps, dead_code_steps
        embed = torch.randn(codebook_size, dim) / dim**0.5
        if update == "ema":
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))

    # ----- assignment --------------------------------------------------------------------

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of ``n d``."""
        embed = self.embed.float()
        distances = (
            flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.pow(2).sum(1)[None]
        )
        return distances.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for ``b h w`` indices, as ``b d h w``."""
        return rearrange(F.embedding(indices, self.embed.float()), "b h w d -> b d h w")

    # ----- forward -----------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            flat = rearrange(z, "b d h w -> (b h w) d")
            if self.training and not bool(self.initialized):
                self._init_from_data(flat.detach())
            indices = self.nearest(flat.detach())
            counts = torch.bincount(indices, minlength=self.codebook_size).float()
            if self.training and _distributed():
                dist.all_reduce(counts)
            # the codes this batch was assigned to, before this step's codebook update
            quantized_flat = F.embedding(indices, self.embed.float())
            if self.update == "ema":
                quantized_flat = quantized_flat.clone()
            restarts = 0
            if self.training:
                if self.update == "ema":
                    self._ema_update(flat.detach(), indices, counts)
                restarts = self._restart_dead(flat.detach(), counts)
            commitment = F.mse_loss(flat, quantized_flat.detach())
            if self.update == "gradient":
                codebook = F.mse_loss(quantized_flat, flat.detach())
            else:
                codebook = torch.zeros((), device=z.device)
            quantized = rearrange(quantized_flat, "(b h w) d -> b d h w", b=b, h=h, w=w)
            if self.training:
                quantized = z + (quantized - z).detach()  # straight-through estimator
            probs = counts / counts.sum().clamp(min=1)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
            usage = (counts > 0).float().mean()
        return QuantizerOutput(
            quantized=quantized,
            indices=rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w),
            commitment=commitment,
            codebook=codebook,
            perplexity=perplexity,
            usage=usage,
            restarts=restarts,
        )

    # ----- codebook maintenance (no gradients) -------------------------------------------

    @torch.no_grad()
    def _init_from_data(self, flat: torch.Tensor) -> None:
        """k-means++ seeding on the first batch; rank 0's choice is broadcast."""
        centers = _kmeans_pp(flat, self.codebook_size)
        if _distributed():
            dist.broadcast(centers, src=0)
        self.embed.data.copy_(centers)
        if self.update == "ema":
            self.embed_sum.copy_(centers)
            self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, counts: torch.Tensor) -> int:
        if self.dead_code_steps <= 0:
            return 0
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.unused_steps >= self.dead_code_steps
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        picks = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        fresh = flat[picks]
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.embed.data[dead] = fresh
        if self.update == "ema":
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
        self.unused_steps[dead] = 0
        return n_dead


def _kmeans_pp(flat: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding: each next center drawn with probability proportional to D(x)^2."""
    n = flat.shape[0]
    if n < k:  # too few vectors: repeat them with a little noise
        reps = flat[torch.randint(0, n, (k,), device=flat.device)]
        return reps + 0.01 * reps.std() * torch.randn_like(reps)
    centers = torch.empty(k, flat.shape[1], device=flat.device, dtype=flat.dtype)
    centers[0] = flat[torch.randint(0, n, (1,), device=flat.device)]
    closest = (flat - centers[0]).pow(2).sum(1)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:
            idx = torch.randint(0, n, (1,), device=flat.device)
        else:
            idx = torch.multinomial(closest / total, 1)
        centers[i] = flat[idx]
        closest = torch.minimum(closest, (flat - centers[i]).pow(2).sum(1))
    return centers
