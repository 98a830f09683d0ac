"""Least-squares refit of the Linear layers whose inputs lost channels (compression/reconstruct.py)."""
from __future__ import annotations

import pytest
import torch

from autocompress.artifact import export
from autocompress.compression import calibrate_model, compress
from autocompress.cost import artifact_size
from autocompress.data import load_data
from autocompress.models import LeNet5, ModelSpec
from autocompress.plan import CompressionPlan
from autocompress.train import evaluate, train_model

SPEC = ModelSpec("lenet5", 10, 1, 8)


@pytest.fixture(scope="module")
def trained():
    digits = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = LeNet5(image_size=8)
    train_model(model, digits.train, epochs=8, lr=0.05, progress=False)
    return model.eval(), digits


def _plan(fc2: dict) -> CompressionPlan:
    return CompressionPlan.from_dict({"version": 1, "layers": {
        "conv1": {"prune": "channel", "amount": 0.25, "bits": 6}, "conv2": {"prune": "channel", "amount": 0.5, "bits": 4},
        "fc1": {"prune": "channel", "amount": 0.9, "bits": 4}, "fc2": {"bits": 6, **fc2}}})


def test_channel_pruned_network_is_refitted_to_the_original_outputs(trained, tmp_path):
    model, digits = trained
    calib = list(digits.train.batches(128, shuffle=True, seed=0, limit=4))
    plan = _plan({"prune": "none"})
    before = compress(model, plan, digits.train.x[:2], calibrate=False)
    calibrate_model(before, calib)  # without the source model: nothing to refit against
    after = compress(model, plan, digits.train.x[:2], calib)
    with torch.no_grad():
        target = model(digits.val.x)
        err = [float((m.eval()(digits.val.x) - target).pow(2).mean()) for m in (before, after)]
    assert err[1] < 0.5 * err[0]  # on held-out samples, not only the calibration ones
    assert evaluate(after, digits.val) > evaluate(before, digits.val) + 0.05
    assert not torch.equal(after.fc2.parametrizations.weight.original, before.fc2.parametrizations.weight.original)
    # the bytes do not depend on the refit: a plan sized uncalibrated is written at that size
    size = artifact_size(before, SPEC)
    assert artifact_size(after, SPEC) == size == export(after, str(tmp_path / "a.acz"), SPEC)


def test_masked_layers_keep_the_mask_they_were_sized_with(trained):
    """A refit solves for every weight of a layer, and a mask then zeroes some of them: a layer
    pruned unstructured is left as it is (its inputs lost channels too), the dense one before it
    is refitted."""
    model, digits = trained
    calib = list(digits.train.batches(128, shuffle=True, seed=0, limit=4))
    plan = _plan({"prune": "unstructured", "amount": 0.5})
    before = compress(model, plan, digits.train.x[:2], calibrate=False)
    calibrate_model(before, calib)
    after = compress(model, plan, digits.train.x[:2], calib)
    assert torch.equal(after.fc2.parametrizations.weight.original, before.fc2.parametrizations.weight.original)
    assert not torch.equal(after.fc1.parametrizations.weight.original, before.fc1.parametrizations.weight.original)


class _Shared(torch.nn.Module):
    """A Linear applied twice per forward (tied weights): no single refit matches both calls."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, width), torch.nn.Linear(64, width)
        self.mid = torch.nn.Linear(width, 32)
        self.out = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.out(torch.relu(self.mid(torch.relu(self.a(x)))) + torch.relu(self.mid(torch.relu(self.b(x)))))


def test_a_layer_called_twice_per_forward_is_left_alone():
    from autocompress.compression import reconstruct

    torch.manual_seed(0)
    source, pruned = _Shared().eval(), _Shared(width=16).eval()  # as if a and b had lost half their outputs
    x = torch.randn(256, 64)
    before = pruned.mid.weight.clone()
    assert reconstruct.reconstruct(source, pruned, ["mid"], [], [(x, None)]) == []
    assert torch.equal(pruned.mid.weight, before)
    single = _Shared(width=16).eval()
    single.forward = lambda x: single.out(torch.relu(single.mid(torch.relu(single.a(x.flatten(1))))))
    source.forward = lambda x: source.out(torch.relu(source.mid(torch.relu(source.a(x.flatten(1))))))
    assert reconstruct.reconstruct(source, single, ["mid"], [], [(x, None)]) == ["mid"]  # called once: refitted
