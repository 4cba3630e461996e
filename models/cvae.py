"""Class-conditional VAE (Sohn et al. 2015, "Learning Structured Output Representation using Deep
Conditional Generative Models"; conditioning as in Kingma et al. 2014's M2 with observed labels).

Shapes: images ``b c h w`` in [0, 1]; labels ``b`` (int64 class indices); latents ``b d``. The
label's one-hot vector ``y`` conditions both networks: the encoder q(z|x, y) sees it as
``num_classes`` constant input planes next to the image, the decoder p(x|z, y) sees ``[z, y]``.
The prior is N(0, I), independent of y (M2's p(z)).

Loss terms, each summed over data or latent dimensions and averaged over the batch: ``recon`` =
``-log p(x|z, y)`` for one reparameterized sample z (`models.losses.reconstruction`); ``kl`` =
``KL(q(z|x, y) || N(0, I))`` in closed form (fp32); ``capacity`` = 0 (no capacity control here;
kept so the terms match `models.vae.VAE`); ``loss`` = ``recon + kl``, the negative conditional
ELBO (Sohn et al. Eq. 4). ``logvar`` is clamped to [-30, 20].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
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
class ConditionalVAEConfig:
    """Conditional VAE hyper-parameters.

    Args:
        family: Always ``cvae``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Latent width ``d``.
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs the
            mean of a unit-variance Gaussian).
        num_classes: Number of label classes (>= 2).
    """

    family: Literal["cvae"] = "cvae"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    num_classes: int = 10

    def __post_init__(self):
        if self.family != "cvae":
            raise ValueError(f"family: must be 'cvae', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: needs at least 2, got {self.num_classes}")


class ConditionalVAE(nn.Module):
    """Gaussian VAE conditioned on a class label. See the module docstring."""

    def __init__(self, config: ConditionalVAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(
            c.in_channels + c.num_classes, c.image_size, c.channels, 2 * c.latent_dim
        )
        self.decoder = ConvDecoder(
            c.latent_dim + c.num_classes, c.in_channels, c.image_size, c.channels
        )

    def _one_hot(self, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "ConditionalVAE: labels are required (``b`` int64 class indices); pass labels="
            )
        return F.one_hot(labels.long(), self.config.num_classes).to(dtype)

    def _decode_logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, y.to(z.dtype)], dim=1))

    def posterior(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x, y): ``(mu, logvar)``, each ``b d``; `labels` required."""
        y = self._one_hot(labels, x.dtype)
        planes = repeat(y, "b k -> b k h w", h=x.shape[2], w=x.shape[3])
        mu, logvar = self.encoder(torch.cat([x, planes], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """One-sample conditional ELBO terms (z is sampled in training and eval mode alike).

        Args:
            x: Images ``b c h w`` in [0, 1].
            labels: Class indices ``b`` (required).

        Returns:
            dict with ``loss`` (``recon + kl``), ``recon``, ``kl``, ``capacity`` (0),
            ``recon_logits`` (decoder output ``b c h w``) and ``z`` (the sample ``b d``).
        """
        mu, logvar = self.posterior(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self._decode_logits(z, self._one_hot(labels, z.dtype))
        recon = reconstruction(logits, x, self.config.likelihood).mean()
        kl = gaussian_kl(mu, logvar).mean()
        return {
            "loss": recon + kl,
            "recon": recon,
            "kl": kl,
            "capacity": torch.zeros((), device=kl.device),
            "recon_logits": logits,
            "z": z,
        }

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean ``b d`` of images ``b c h w`` given their labels ``b`` (required)."""
        return self.posterior(x, labels)[0]

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean images ``b c h w`` in [0, 1] from latents ``b d`` and labels ``b`` (required)."""
        logits = self._decode_logits(z, self._one_hot(labels, z.dtype))
        return to_image(logits, self.config.likelihood)

    @torch.no_grad()
    def iw_nll(
        self, x: torch.Tensor, k: int, labels: torch.Tensor | None = None, chunk: int = 64
    ) -> torch.Tensor:
        """Importance-weighted estimate of ``-log p(x|y)`` per example, in nats (Burda et al.
        2016, Eq. 8, conditioned on y).

        Args:
            x: Images ``b c h w`` in [0, 1].
            k: Importance samples per example (>= 1).
            labels: Class indices ``b`` (required).
            chunk: Samples decoded at once (memory is ``chunk * b`` images).

        Returns:
            ``b`` fp32.
        """
        if k < 1 or chunk < 1:
            raise ValueError(f"iw_nll: k and chunk must be >= 1, got k={k}, chunk={chunk}")
        mu, logvar = self.posterior(x, labels)
        y = self._one_hot(labels, mu.dtype)
        log_w = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            eps = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps  # n b d
            logits = self._decode_logits(
                rearrange(z, "n b d -> (n b) d"), repeat(y, "b k -> (n b) k", n=n)
            )
            target = repeat(x, "b c h w -> (n b) c h w", n=n)
            log_px = rearrange(
                -reconstruction(logits, target, self.config.likelihood), "(n b) -> n b", n=n
            )
            log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
            log_qz = gaussian_log_prob(z, mu, logvar)
            log_w.append(log_px + log_pz - log_qz)
        return -(torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k))

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> ConditionalVAE:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, ConditionalVAEConfig, directory, map_location)
