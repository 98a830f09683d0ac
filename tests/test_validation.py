"""Honest validation with a user's checkpoint: the search header says which validation split ranks
the trials and whether the checkpoint has been trained on it (real Fashion-MNIST subset, real MLP)."""
from __future__ import annotations

import pytest
import torch

from autocompress.api import has_seen, prepare
from autocompress.data import TensorData, load_data
from autocompress.models import build_model
from autocompress.settings import SearchSettings
from autocompress.train import train_model

LIMIT = 3000  # 2,700 train + 300 validation samples; the whole 10,000-sample test split


def _checkpoint(path, with_val: bool) -> str:
    """An MLP over-trained on the training split, or on the training and validation splits."""
    data = load_data("fashion-mnist", seed=0, limit=LIMIT)
    seen = TensorData(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, data.val.y])) \
        if with_val else data.train
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, 28)
    train_model(model, seen, epochs=25, lr=0.05, progress=False)
    torch.save(model.state_dict(), path)
    return str(path)


def _prepare(tmp_path, weights: str, capsys):
    settings = SearchSettings.from_options("20x", model="mlp", data="fashion-mnist", limit=LIMIT, weights=weights,
                                           out=str(tmp_path / "runs"), progress=False)
    _, ctx = prepare(settings)
    return ctx, capsys.readouterr().out


def test_checkpoint_trained_on_the_validation_split_is_detected(tmp_path, capsys):
    ctx, out = _prepare(tmp_path, _checkpoint(tmp_path / "all.pt", with_val=True), capsys)
    assert ctx.baseline_saw_val is True
    line = next(ln for ln in out.splitlines() if ln.startswith("validation:"))
    assert "carved from the training data" in line and "--val-data" in line and "most likely" in line


def test_checkpoint_trained_without_it_is_not_flagged(tmp_path, capsys):
    ctx, out = _prepare(tmp_path, _checkpoint(tmp_path / "train.pt", with_val=False), capsys)
    assert ctx.baseline_saw_val is False
    assert "no sign that it has seen them" in out


def test_has_seen_needs_more_than_sampling_noise():
    assert has_seen(0.99, 300, 0.85, 10000)
    assert not has_seen(0.87, 300, 0.85, 10000)  # 2 points on 300 samples is noise
    assert not has_seen(0.85, 6000, 0.85, 10000)


@pytest.mark.slow
def test_search_with_val_data_says_so(tmp_path, capsys):
    from autocompress.api import search

    (tmp_path / "held.py").write_text(
        "from autocompress.data import load_data\n"
        "def make():\n"
        "    d = load_data('fashion-mnist', limit=400, seed=5, val_fraction=0.5)\n"
        "    return list(zip(d.train.x, d.train.y.tolist())), list(zip(d.val.x, d.val.y.tolist()))\n")
    search("20x", model="mlp", data="fashion-mnist", limit=LIMIT, val_data=f"{tmp_path / 'held.py'}:make",
           out=str(tmp_path / "runs"), trials=2, max_batches=2, baseline_epochs=1, final_top=0, progress=False)
    out = capsys.readouterr().out
    assert "validation: 400 samples of" in out and "(--val-data)" in out
