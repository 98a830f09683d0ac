from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Baselines trained by tests go to a temporary cache, never the user's."""
    old = os.environ.get("AUTOCOMPRESS_CACHE")
    os.environ["AUTOCOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("AUTOCOMPRESS_CACHE", None)
    else:
        os.environ["AUTOCOMPRESS_CACHE"] = old


@pytest.fixture(scope="module")
def lenet():
    """An untrained LeNet-5 (weights seeded) for compression and export tests."""
    from autocompress.models import LeNet5

    torch.manual_seed(0)
    return LeNet5().eval()


@pytest.fixture(scope="module")
def data():
    """32 random 28x28 images: (inputs, two calibration batches)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return x, [(x[:16], y[:16]), (x[16:], y[16:])]
