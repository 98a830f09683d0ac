from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from autocompress import data as data_mod
from autocompress.data import TensorData, default_data, load_data
from autocompress.errors import UserError

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def rows(t: TensorData) -> set[bytes]:
    return {r.tobytes() for r in t.x.flatten(1).numpy()}


def test_digits_sizes_add_up_and_splits_are_disjoint(digits):
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert abs(len(digits.test) - 0.2 * 1797) <= 1
    assert abs(len(digits.val) - 0.1 * (1797 - len(digits.test))) <= 1
    train, val, test = rows(digits.train), rows(digits.val), rows(digits.test)
    assert len(train) == len(digits.train)  # digits has no duplicate images
    assert not train & val and not train & test and not val & test
    assert digits.train.x.dtype == torch.float32 and digits.train.y.dtype == torch.int64
    assert digits.train.x.shape[1:] == (1, 8, 8)
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)


def test_val_is_stratified(digits):
    train = np.bincount(digits.train.y.numpy(), minlength=10) / len(digits.train)
    val = np.bincount(digits.val.y.numpy(), minlength=10) / len(digits.val)
    assert np.abs(train - val).max() < 0.02


def test_normalised_with_train_statistics(digits):
    assert abs(float(digits.train.x.mean())) < 1e-4
    assert abs(float(digits.train.x.std()) - 1) < 1e-3


def test_seed_decides_the_split():
    a, b, c = (load_data("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.y, c.val.y) or not torch.equal(a.val.x, c.val.x)


def test_limit_caps_training_pool_stratified():
    b = load_data("digits", limit=300, seed=0)
    assert len(b.train) + len(b.val) == 300
    assert len(b.test) == 359
    assert set(b.train.y.tolist()) == set(range(10)) and set(b.val.y.tolist()) == set(range(10))


def test_batches_and_subset(digits):
    t = digits.train
    seen = torch.cat([y for _, y in t.batches(100, shuffle=True, seed=3)])
    assert len(seen) == len(t) and torch.equal(seen.sort().values, t.y.sort().values)
    again = torch.cat([y for _, y in t.batches(100, shuffle=True, seed=3)])
    assert torch.equal(seen, again)
    assert len(list(t.batches(100, shuffle=False, limit=2))) == 2
    first = next(t.batches(50, shuffle=False))
    assert torch.equal(first[0], t.x[:50])
    s = t.subset(200, seed=0)
    assert len(s) == 200 and set(s.y.tolist()) == set(range(10))
    assert len(t.to("cpu")) == len(t)


def test_unknown_spec_lists_forms():
    with pytest.raises(UserError, match="imagefolder:DIR"):
        load_data("no-such-data")


def test_module_callable_datasets(tmp_path):
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def make():\n"
        "    rng = np.random.default_rng(0)\n"
        "    item = lambda i: (rng.integers(0, 255, (5, 5), dtype=np.uint8), i % 3)\n"
        "    return [item(i) for i in range(30)], [item(i) for i in range(9)]\n")
    b = load_data(f"{tmp_path / 'mydata.py'}:make", val_fraction=0.2)
    assert (len(b.train), len(b.val), len(b.test)) == (24, 6, 9)
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 1, 5)


def _hide_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "CACHE_ROOT", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "SYSTEM_FASHION_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("AUTOCOMPRESS_DATA", raising=False)

    def no_network() -> None:
        raise OSError("no network")

    monkeypatch.setattr(data_mod, "_download_fashion", no_network)


def test_fashion_missing_is_a_user_error(monkeypatch, tmp_path):
    _hide_fashion(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")


def test_default_falls_back_to_digits(monkeypatch, tmp_path):
    _hide_fashion(monkeypatch, tmp_path)
    b = default_data(seed=0)
    assert b.name == "digits" and b.notice and "\n" not in b.notice
    assert "Fashion-MNIST" in b.notice


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST files not installed")
def test_fashion_mnist_loads():
    b = load_data("fashion-mnist", data_dir=FASHION, limit=2000)
    assert len(b.train) + len(b.val) == 2000 and len(b.val) == 200
    assert len(b.test) == 10000
    assert b.train.x.shape[1:] == (1, 28, 28) and b.num_classes == 10


def test_image_size_resizes_tensor_data():
    b = load_data("digits", image_size=16, seed=0)
    assert b.train.x.shape[1:] == (1, 16, 16) and b.test.x.shape[1:] == (1, 16, 16) and b.image_size == 16
    assert abs(float(b.train.x.mean())) < 1e-4  # normalised after resizing
    with pytest.raises(UserError, match="--image-size"):
        load_data("digits", image_size=0)


def test_val_data_replaces_the_carved_split(tmp_path):
    """--val-data: every sample of the held-out spec is the validation split, normalised with the
    training split's statistics; nothing is carved from the training data."""
    (tmp_path / "held.py").write_text(
        "import numpy as np\n"
        "from sklearn.datasets import load_digits\n"
        "def make():\n"
        "    d = load_digits()\n"
        "    x = (d.images[:50] * 16).astype(np.uint8)\n"
        "    items = [(x[i], int(d.target[i])) for i in range(50)]\n"
        "    return items[:30], items[30:]\n")
    plain = load_data("digits", seed=0)
    held = load_data("digits", seed=0, val_data=f"{tmp_path / 'held.py'}:make")
    assert len(held.val) == 50 and len(held.train) == len(plain.train) + len(plain.val)
    assert len(held.test) == len(plain.test)
    assert "(--val-data)" in held.val_source and "carved" in plain.val_source
    assert held.val.x.shape[1:] == held.train.x.shape[1:]


def test_val_data_of_another_shape_or_more_classes_is_refused(tmp_path):
    (tmp_path / "wide.py").write_text(
        "import numpy as np\n"
        "def make():\n"
        "    item = lambda i: (np.zeros((5, 5), dtype=np.uint8), i)\n"
        "    return [item(i) for i in range(12)], [item(i) for i in range(12)]\n")
    with pytest.raises(UserError, match="images are"):
        load_data("digits", val_data=f"{tmp_path / 'wide.py'}:make")
    with pytest.raises(UserError, match="labels up to 11"):
        load_data("digits", val_data=f"{tmp_path / 'wide.py'}:make", image_size=8)
