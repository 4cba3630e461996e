"""Building blocks shared by several models. Shapes: ``b c h w``."""

from __future__ import annotations

from torch import nn


class ResBlock(nn.Module):
    """Residual block of VQ-VAE (van den Oord et al. 2017): x + conv1x1(relu(conv3x3(relu(x)))).

    Args:
        channels: Input and output channels.
        hidden: Channels of the 3x3 convolution.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)
