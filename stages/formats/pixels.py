"""Stored pixels as model inputs, and back.

Shapes: stored images are uint8 ``b h w c`` (sequences ``b t h w c``), as the image and
sequence tables hold them; model inputs are float ``b c h w`` (``b t c h w``).
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

CPU = torch.device("cpu")


def to_signed(
    batch: np.ndarray | torch.Tensor, device: torch.device = CPU, channels_last: bool = False
) -> torch.Tensor:
    """uint8 ``b h w c`` -> float ``b c h w`` in [-1, 1] (VQ-VAE-2's and the classifier's input).

    Args:
        batch: The images.
        device: Where the result lives.
        channels_last: Return the channels-last memory format (faster convolutions).
    """
    x = torch.as_tensor(batch).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def to_unit(
    batch: torch.Tensor,
    device: torch.device,
    binarize: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 ``b h w c`` -> float ``b c h w`` in [0, 1] (the non-quantized families' input).

    Args:
        batch: The images.
        device: Where the result lives.
        binarize: ``none`` keeps grey levels; ``threshold`` maps pixels above 0.5 to 1;
            ``dynamic`` draws each pixel as 1 with its intensity as probability.
        generator: The random generator of the ``dynamic`` draws.
    """
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if binarize == "threshold":
        x = (x > 0.5).float()
    elif binarize == "dynamic":
        x = torch.bernoulli(x, generator=generator)
    return x.to(device, non_blocking=True)


def to_frames(
    batch: torch.Tensor, device: torch.device, binarize: str, generator=None
) -> torch.Tensor:
    """uint8 ``b t h w c`` -> float ``b t c h w`` in [0, 1] (binarized as `to_unit` does)."""
    t = batch.shape[1]
    x = to_unit(rearrange(batch, "b t h w c -> (b t) h w c"), device, binarize, generator)
    return rearrange(x, "(b t) c h w -> b t c h w", t=t)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``b c h w`` in [0, 1] (clamped) -> uint8 ``b h w c``, for figures."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
