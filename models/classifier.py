"""Small convolutional image classifier: the feature extractor of the sample-quality figures.

Shapes: images ``b c H W`` in [-1, 1] (any H, W: global average pooling before the head).
Three conv blocks (conv 3x3, BatchNorm, ReLU, 2x2 max-pool), global average pooling, a
``feature_dim`` penultimate layer (the features the Fréchet distance is computed on) and a
linear head. This is our own small MNIST-scale network, not Inception: distances computed on its
features are not comparable to published FID figures.

Loss: ``ce`` = mean cross-entropy; ``loss`` = ``ce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.io import load_model, save_model


@dataclass(frozen=True)
class ClassifierConfig:
    """Classifier hyper-parameters.

    Args:
        in_channels: Image channels.
        num_classes: Output classes.
        channels: Channels of the three conv blocks.
        feature_dim: Width of the penultimate (feature) layer.
        dropout: Dropout before the head.
    """

    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.2

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes: needs at least 2, got {self.num_classes}")
        if len(self.channels) != 3:
            raise ValueError(f"channels: three conv widths, got {list(self.channels)}")


class Classifier(nn.Module):
    """Conv classifier with an exposed penultimate feature layer."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        blocks, in_ch = [], c.in_channels
        for ch in c.channels:
            blocks += [
                nn.Conv2d(in_ch, ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_ch = ch
        self.body = nn.Sequential(*blocks)
        self.features_layer = nn.Linear(in_ch, c.feature_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``b c H W`` -> ``b feature_dim`` penultimate features (after ReLU)."""
        pooled = self.body(x).mean(dim=(2, 3))
        return F.relu(self.features_layer(pooled))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Logits, and ``ce`` / ``loss`` when labels are given."""
        logits = self.head(self.dropout(self.features(x)))
        out = {"logits": logits}
        if labels is not None:
            ce = F.cross_entropy(logits.float(), labels)
            out.update(ce=ce, loss=ce)
        return out

    def save(self, directory: Path) -> None:
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> Classifier:
        return load_model(cls, ClassifierConfig, directory, map_location)
