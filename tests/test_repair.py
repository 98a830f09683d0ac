from __future__ import annotations

import pytest
import torch

from autocompress.compression import compress
from autocompress.cost import artifact_size
from autocompress.cost.repair import repair, tighten
from autocompress.models import LeNet5, ModelSpec
from autocompress.plan import CompressionPlan, LayerPlan
from autocompress.space import load_space


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LeNet5().eval()
    spec = ModelSpec("lenet5", 10, 1, 28)
    example = torch.randn(2, 1, 28, 28)
    layers = load_space(None).bind(model).layers
    size_of = lambda p: artifact_size(compress(model, p, example), spec)  # noqa: E731
    return model, layers, size_of


def test_repaired_plan_fits_and_stays_in_the_space(setup):
    model, layers, size_of = setup
    plan = CompressionPlan(layers={
        "conv1": LayerPlan(prune="unstructured", amount=0.1, bits=8),
        "conv2": LayerPlan(prune="nm", n=2, m=4, bits=6),
        "fc1": LayerPlan(prune="unstructured", amount=0.5, bits=5),
        "fc2": LayerPlan(prune="block", amount=0.2, bits=6),
    })
    limit = 1_724_320 // 60
    assert size_of(plan) > limit
    fixed = repair(plan, layers, size_of, limit)
    assert fixed is not None and size_of(fixed) <= limit
    for name, lp in fixed.layers.items():
        assert lp.prune == plan.layers[name].prune            # granularity kept
        assert lp.amount >= plan.layers[name].amount - 1e-9  # only tightened
        assert lp.bits in layers[name]["bits"].values
        assert lp.amount <= 0.9975 + 1e-9 and abs(lp.amount / 0.0025 - round(lp.amount / 0.0025)) < 1e-6


def test_impossible_budget_cannot_be_repaired(setup):
    model, layers, size_of = setup
    plan = CompressionPlan.uniform(list(layers), prune="unstructured", amount=0.5, bits=8)
    assert repair(plan, layers, size_of, 500) is None


def test_tighten_zero_is_identity(setup):
    _, layers, _ = setup
    plan = CompressionPlan.uniform(list(layers), prune="unstructured", amount=0.3, bits=4)
    assert tighten(plan, layers, 0.0, 0) == plan
    full = tighten(plan, layers, 1.0, 1)
    assert all(lp.amount == pytest.approx(0.9975) and lp.bits == 3 for lp in full.layers.values())


def test_nm_layer_is_loosened_into_unstructured_when_that_is_the_only_way(setup):
    model, layers, size_of = setup
    plan = CompressionPlan(layers={
        "conv1": LayerPlan(prune="unstructured", amount=0.6, bits=8),
        "conv2": LayerPlan(prune="nm", n=1, m=4, bits=6),
        "fc1": LayerPlan(prune="nm", n=2, m=4, bits=3),
        "fc2": LayerPlan(prune="block", amount=0.68, bits=2),
    })
    limit = 50_000
    fixed = repair(plan, layers, size_of, limit)
    assert fixed is not None and size_of(fixed) <= limit
    assert fixed.layers["fc1"].prune == "unstructured" and fixed.layers["fc1"].amount >= 0.5
