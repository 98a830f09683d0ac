"""Small real models for the compression tests: a residual CNN with BatchNorm and a grouped conv."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class TinyResNet(nn.Module):
    """Stem 8 ch, one identity block, one downsampling block to 16 ch, global pool, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class GroupedNet(nn.Module):
    """A net with a grouped convolution (cannot be factorised)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv2(torch.relu(self.conv1(x))), 1))


def warm_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine params, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()
