from __future__ import annotations

import time

import pytest
import torch

from autocompress import train as train_mod
from autocompress.data import load_data
from autocompress.errors import UserError
from autocompress.models import ModelSpec, build_model
from autocompress.train import baseline, evaluate, train_model


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def spec_for(data, name: str = "mlp") -> ModelSpec:
    return ModelSpec(name, data.num_classes, data.in_channels, data.image_size)


def test_train_model_learns(digits):
    torch.manual_seed(0)
    model = build_model(spec_for(digits))
    before = evaluate(model, digits.val)
    losses = train_model(model, digits.train, epochs=5, lr=0.05, progress=False)
    assert len(losses) == 5 and losses[-1] < losses[0]
    after = evaluate(model, digits.val)
    assert 0.0 <= before <= 1.0 and after > 0.85 and after > before


def test_evaluate_restores_mode(digits):
    model = build_model(spec_for(digits))
    model.train()
    evaluate(model, digits.val)
    assert model.training


def test_baseline_is_cached(digits, tmp_path, monkeypatch, capsys):
    spec = spec_for(digits)
    t0 = time.perf_counter()
    first, acc1 = baseline(spec, digits, epochs=4, cache_dir=str(tmp_path), progress=False)
    t1 = time.perf_counter()
    assert "training" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(train_mod, "train_model", must_not_train)
    second, acc2 = baseline(spec, digits, epochs=4, cache_dir=str(tmp_path), progress=False)
    t2 = time.perf_counter()
    assert "cached" in capsys.readouterr().err
    assert t2 - t1 < t1 - t0
    assert acc1 == acc2 and acc1 > 0.85 and not second.training
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k


def test_cache_key_depends_on_epochs_and_seed(digits):
    spec = spec_for(digits)
    keys = {train_mod.cache_key(spec, digits, e, s, 0.05) for e, s in ((1, 0), (2, 0), (1, 1))}
    assert len(keys) == 3


def test_unreadable_cache_entry_is_retrained(digits, tmp_path):
    spec = spec_for(digits)
    baseline(spec, digits, epochs=1, cache_dir=str(tmp_path), progress=False)
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"garbage")
    model, acc = baseline(spec, digits, epochs=1, cache_dir=str(tmp_path), progress=False)
    assert acc > 0.5 and entry.stat().st_size > 100


def test_weights_are_loaded_without_training(digits, tmp_path, monkeypatch):
    spec = spec_for(digits)
    source = build_model(spec)
    train_model(source, digits.train, epochs=1, lr=0.05, progress=False)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    monkeypatch.setattr(train_mod, "train_model", lambda *a, **k: pytest.fail("trained"))
    model, acc = baseline(spec, digits, epochs=5, weights=str(path), cache_dir=str(tmp_path / "c"))
    assert acc == evaluate(source, digits.val)
    assert not (tmp_path / "c").exists()


def test_corrupt_checkpoint_is_a_user_error(digits, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        baseline(spec_for(digits), digits, epochs=1, weights=str(path), cache_dir=str(tmp_path))


def test_evaluate_is_nan_when_logits_are_not_finite():
    """NaN logits would argmax to class 0 and score as many hits as there are class-0 samples (a
    compressed EfficientNet-B6 'scored' 10% that way): evaluate() says NaN, and a trial fails on it."""
    from torch import nn

    from autocompress.data import TensorData
    from autocompress.train import evaluate

    data = TensorData(torch.zeros(20, 4), torch.zeros(20, dtype=torch.long))
    broken = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        broken[0].bias.fill_(float("nan"))
    assert evaluate(broken, data) != evaluate(broken, data)  # NaN, though every label is class 0
    fine = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        fine[0].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    assert evaluate(fine, data) == 1.0


def test_batchnorm_statistics_are_the_trained_models(digits):
    """A BatchNorm with TensorFlow's momentum (torchvision's MNASNet: 0.0003) barely moves its
    running averages in a short training; train_model re-estimates them, so the eval-mode model
    normalises with the statistics of its own activations."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, momentum=0.0003), nn.ReLU(),
                          nn.Linear(32, 10))
    train_model(model, digits.train, epochs=5, lr=0.05, progress=False)
    with torch.no_grad():
        pre = model[1](model[0](digits.train.x))
    bn = model[2]
    assert torch.allclose(bn.running_mean, pre.mean(0), atol=0.1 * float(pre.mean(0).abs().max()) + 0.05)
    assert torch.allclose(bn.running_var, pre.var(0), rtol=0.2, atol=0.05)
    assert evaluate(model, digits.val) > 0.85


def test_checkpoint_saved_as_a_plain_dict_loads_into_mnasnet(tmp_path):
    """`{k: v.cpu() for k, v in sd.items()}` drops the version metadata MNASNet insists on
    ("version should be set to 1 or 2"); it is the model's own, so the checkpoint loads."""
    from autocompress.models import load_weights

    spec = ModelSpec("torchvision:mnasnet0_5", 10, 1, 28)
    torch.manual_seed(1)
    source = build_model(spec)
    path = tmp_path / "plain.pt"
    torch.save({k: v.clone() for k, v in source.state_dict().items()}, path)
    model = build_model(spec)
    load_weights(model, str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))
