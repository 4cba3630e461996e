"""Likelihood and KL terms used identically by the autoencoder families.

Shapes: images ``b c h w`` with values in [0, 1]; codes ``b d``. Every function returns one value
per example (``b``), summed over data or latent dimensions and computed in fp32; the models
average over the batch, so that weights such as beta keep their meaning (DESIGN, "Known
pitfalls").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import reduce

LOG_2PI = math.log(2 * math.pi)
LIKELIHOODS = ("bernoulli", "gaussian")


def reconstruction(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Negative log-likelihood ``-log p(x | decoder output)`` per example, in nats.

    ``bernoulli``: binary cross-entropy with the decoder output as logits (the Bernoulli decoder
    of Kingma & Welling 2014, Appendix C.1; for grey values in [0, 1] the usual relaxation).
    ``gaussian``: the decoder output is the mean of a unit-variance Gaussian (Appendix C.2 with
    sigma = 1), ``0.5 * (x - mean)**2 + 0.5 * log(2 pi)`` per dimension: squared error up to a
    factor 1/2 and a constant, so autoencoder and VAE numbers are in the same units.

    Args:
        logits: Decoder output ``b c h w``.
        x: Target images ``b c h w`` in [0, 1].
        likelihood: ``bernoulli`` or ``gaussian``.

    Returns:
        ``b`` fp32, summed over ``c h w``.
    """
    logits, x = logits.float(), x.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        nll = 0.5 * (logits - x).pow(2) + 0.5 * LOG_2PI
    else:
        raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {likelihood!r}")
    return reduce(nll, "b c h w -> b", "sum")


def to_image(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Mean of the likelihood in image space [0, 1]: sigmoid (Bernoulli) or clamp (Gaussian).

    Args:
        logits: Decoder output ``b c h w``.
        likelihood: ``bernoulli`` or ``gaussian``.
    """
    if likelihood == "bernoulli":
        return torch.sigmoid(logits)
    if likelihood == "gaussian":
        return logits.clamp(0.0, 1.0)
    raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {likelihood!r}")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, closed form (Kingma & Welling 2014, App. B).

    ``-0.5 * sum_j (1 + logvar_j - mu_j**2 - exp(logvar_j))``. The caller clamps `logvar`.

    Args:
        mu: Posterior means ``b d``.
        logvar: Posterior log-variances ``b d``.

    Returns:
        ``b`` fp32, summed over ``d``.
    """
    mu, logvar = mu.float(), logvar.float()
    return reduce(-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()), "b d -> b", "sum")


def gaussian_kl_between(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) of diagonal Gaussians, closed form.

    ``0.5 * sum_j (logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)**2) / exp(logvar_p) - 1)``
    over the last dimension, in fp32. The caller clamps the log-variances.

    Args:
        mu_q, logvar_q: Parameters of q, ``... d``.
        mu_p, logvar_p: Parameters of p, broadcastable to q's.

    Returns:
        ``...`` (the last dimension summed out).
    """
    mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in (mu_q, logvar_q, mu_p, logvar_p))
    ratio = (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p)
    return 0.5 * (logvar_p - logvar_q + ratio - 1).sum(-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the last dimension, fp32.

    Args:
        z: Points ``... d``.
        mu: Means, broadcastable to `z`.
        logvar: Log-variances, broadcastable to `z`.

    Returns:
        ``...`` (the last dimension summed out).
    """
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return (-0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)).sum(-1)
