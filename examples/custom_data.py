"""Your own data: a callable returning (train_dataset, test_dataset) of (image, label) items.

    autocompress search --data examples/custom_data.py:loaders --model mlp --budget 20x
or, for images on disk laid out as DIR/train/CLASS/*.png and DIR/test/CLASS/*.png:
    autocompress search --data imagefolder:DIR --model lenet5 --budget 20x
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def loaders(seed: int = 0):
    """Two noisy Gaussian blobs per class in 1x8x8 'images': a stand-in for your Dataset objects."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 1, 8, 8, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, 4, (n,), generator=g)
        x = centres[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
        return TensorDataset(x, y)

    return make(2000), make(500)
