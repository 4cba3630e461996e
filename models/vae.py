"""Variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") with the
beta-VAE weight (Higgins et al. 2017) and capacity control (Burgess et al. 2017, "Understanding
disentangling in beta-VAE").

Shapes: images ``b c h w`` in [0, 1]; latents ``b d``. The encoder outputs ``mu`` and ``logvar``
of the diagonal Gaussian q(z|x) (``logvar`` clamped to [-30, 20]); ``z = mu + exp(logvar / 2) *
eps`` with ``eps ~ N(0, I)`` (reparameterization, Sec. 2.4); the decoder gives the logits of a
Bernoulli or the mean of a unit-variance Gaussian p(x|z). The prior is N(0, I).

Loss terms, each summed over data or latent dimensions and averaged over the batch:
``recon`` = ``-log p(x|z)`` for one sample z (`models.losses.reconstruction`); ``kl`` =
``KL(q(z|x) || N(0, I))`` in closed form (Appendix B, fp32); ``capacity`` = the current target C.
``loss`` = ``recon + beta * kl`` (the negative ELBO of Eq. 10 when beta = 1; Higgins et al. Eq. 4)
or, with capacity control, ``recon + gamma * |kl - C|`` with ``C = capacity_max * min(1, step /
capacity_steps)`` (Burgess et al.). ``step`` is a buffer saved with the weights that counts
optimizer steps: the training loop calls `VAE.advance` once after each optimizer step; forward
passes never change it.

`VAE.iw_nll` gives the importance-weighted bound of Burda et al. 2016 (Eq. 8) as an NLL estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange, repeat
from torch import nn

from models.conv import ConvDecoder, ConvEncoder, check_image_size
from models.io import load_model, save_model
from models.losses import (
    LIKELIHOODS,
    gaussian_kl,
    gaussian_log_prob,
    reconstruction,
    to_image,
)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(frozen=True)
class VAEConfig:
    """VAE / beta-VAE hyper-parameters.

    Args:
        family: ``vae`` (beta = 1, no capacity control) or ``beta_vae``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Latent width ``d``.
        hidden: Width of the two fully connected layers between the 4x4 feature map and the
            latents, in encoder and decoder (0: none; Burgess et al. 2017 use 256 on dSprites).
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs the
            mean of a unit-variance Gaussian).
        beta: Weight of ``kl`` (Higgins et al. 2017); 1 gives the ELBO.
        capacity_max: Final KL target C_max in nats (Burgess et al. 2017); None turns capacity
            control off.
        capacity_steps: Optimizer steps over which C grows linearly from 0 to ``capacity_max``.
        gamma: Weight of ``|kl - C|`` with capacity control (1000 in Burgess et al.).
    """

    family: Literal["vae", "beta_vae"] = "vae"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    hidden: int = 0
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    beta: float = 1.0
    capacity_max: float | None = None
    capacity_steps: int = 100_000
    gamma: float = 1000.0

    def __post_init__(self):
        if self.family not in ("vae", "beta_vae"):
            raise ValueError(f"family: must be 'vae' or 'beta_vae', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.hidden < 0:
            raise ValueError(f"hidden: must be >= 0 (0: none), got {self.hidden}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0, got {self.beta}")
        if self.capacity_max is not None and self.capacity_max < 0:
            raise ValueError(f"capacity_max: nats, must be >= 0 or None, got {self.capacity_max}")
        if self.capacity_steps < 1:
            raise ValueError(f"capacity_steps: must be >= 1, got {self.capacity_steps}")
        if self.gamma < 0:
            raise ValueError(f"gamma: must be >= 0, got {self.gamma}")
        if self.family == "vae" and (self.beta != 1.0 or self.capacity_max is not None):
            raise ValueError(
                "family: 'vae' means beta = 1 and no capacity control; set family: beta_vae to "
                f"use beta={self.beta} / capacity_max={self.capacity_max}"
            )


class VAE(nn.Module):
    """Gaussian VAE / beta-VAE. See the module docstring for shapes and the loss."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(
            c.in_channels, c.image_size, c.channels, 2 * c.latent_dim, hidden=c.hidden
        )
        self.decoder = ConvDecoder(
            c.latent_dim, c.in_channels, c.image_size, c.channels, hidden=c.hidden
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # ----- capacity schedule -------------------------------------------------------------

    @torch.no_grad()
    def advance(self) -> None:
        """Counts one optimizer step; call once after each ``optimizer.step()``."""
        self.step.add_(1)

    def capacity(self) -> torch.Tensor:
        """Current KL target C (fp32 scalar tensor; 0 with capacity control off)."""
        c = self.config
        if c.capacity_max is None:
            return torch.zeros((), device=self.step.device)
        fraction = (self.step.double() / c.capacity_steps).clamp(max=1.0)
        return (c.capacity_max * fraction).float()

    # ----- model -------------------------------------------------------------------------

    def posterior(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x): ``(mu, logvar)``, each ``b d``; `labels` ignored."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """One-sample ELBO terms for `x` (z is sampled in training and eval mode alike).

        Args:
            x: Images ``b c h w`` in [0, 1].
            labels: Ignored (the model is unconditional).

        Returns:
            dict with ``loss``, ``recon``, ``kl``, ``capacity`` (see the module docstring),
            ``recon_logits`` (decoder output ``b c h w``) and ``z`` (the sample ``b d``).
        """
        c = self.config
        mu, logvar = self.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.decoder(z)
        recon = reconstruction(logits, x, c.likelihood).mean()
        kl = gaussian_kl(mu, logvar).mean()
        capacity = self.capacity()
        if c.capacity_max is None:
            loss = recon + c.beta * kl
        else:
            loss = recon + c.gamma * (kl - capacity).abs()
        return {
            "loss": loss,
            "recon": recon,
            "kl": kl,
            "capacity": capacity,
            "recon_logits": logits,
            "z": z,
        }

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean ``b d`` of images ``b c h w`` (`labels` ignored)."""
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean images ``b c h w`` in [0, 1] from latents ``b d`` (`labels` ignored)."""
        return to_image(self.decoder(z), self.config.likelihood)

    @torch.no_grad()
    def iw_nll(
        self, x: torch.Tensor, k: int, labels: torch.Tensor | None = None, chunk: int = 64
    ) -> torch.Tensor:
        """Importance-weighted NLL estimate per example, in nats (Burda et al. 2016, Eq. 8).

        ``-log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)`` with ``z_i ~ q(z|x)``: the negative of
        the k-sample bound, an upper bound on ``-log p(x)`` that tightens as k grows (k = 1: the
        negative ELBO with a sampled KL). For the Gaussian likelihood ``p(x|z)`` has unit
        variance.

        Args:
            x: Images ``b c h w`` in [0, 1].
            k: Importance samples per example (>= 1).
            labels: Ignored (the model is unconditional).
            chunk: Samples decoded at once (memory is ``chunk * b`` images).

        Returns:
            ``b`` fp32.
        """
        if k < 1 or chunk < 1:
            raise ValueError(f"iw_nll: k and chunk must be >= 1, got k={k}, chunk={chunk}")
        mu, logvar = self.posterior(x)
        log_w = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            eps = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps  # n b d
            logits = self.decoder(rearrange(z, "n b d -> (n b) d"))
            target = repeat(x, "b c h w -> (n b) c h w", n=n)
            log_px = -reconstruction(logits, target, self.config.likelihood)
            log_px = rearrange(log_px, "(n b) -> n b", n=n)
            log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            log_qz = gaussian_log_prob(z, mu, logvar)
            log_w.append(log_px + log_pz - log_qz)
        return -(torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k))

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (weights and the ``step`` buffer)."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> VAE:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, VAEConfig, directory, map_location)
