"""User models that break during fine-tuning (not in eval mode): one raises, one produces NaN."""
from __future__ import annotations

import torch
from torch import nn


class Flaky(nn.Module):
    """conv + fc on small images; in training mode it either raises or returns NaN logits."""

    def __init__(self, how: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.flatten(torch.relu(self.conv(x)), 1))
        if self.training and self.how == "raise":
            raise RuntimeError("user model refuses to train")
        if self.training and self.how == "nan":
            y = y * float("nan")
        return y


def raising(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return Flaky("raise", num_classes, in_channels, image_size)


def nan(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return Flaky("nan", num_classes, in_channels, image_size)
