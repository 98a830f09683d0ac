from __future__ import annotations

import pytest

from autocompress.plan import Budget, CompressionPlan, LayerPlan, PlanError, parse_budget


@pytest.mark.parametrize("text,expected", [
    ("50KB", 50_000), ("50kb", 50_000), ("1.5MB", 1_500_000), ("2GB", 2 * 10**9), ("2000B", 2000),
    ("200KiB", 200 * 1024), ("1MiB", 2**20), ("1GiB", 2**30), (" 3 MB ", 3_000_000),
])
def test_parse_budget_sizes(text, expected):
    b = parse_budget(text)
    assert b.bytes == expected and b.ratio is None
    assert b.limit(10**12) == expected


def test_parse_budget_ratio_limit_is_original_over_ratio():
    b = parse_budget("20x")
    assert b.ratio == 20 and b.bytes is None
    assert b.limit(1_724_320) == 86_216
    assert str(b) == "20x"


@pytest.mark.parametrize("text", ["", "abc", "50", "50 parsecs", "-5MB", "0KB", "0x", "1x", "MB", "5..2MB", "nanMB"])
def test_parse_budget_rejects(text):
    with pytest.raises(PlanError) as e:
        parse_budget(text)
    assert "budget" in str(e.value)


def test_plan_json_round_trip():
    plan = CompressionPlan(layers={
        "conv1": LayerPlan(bits=8),
        "conv2": LayerPlan(prune="nm", n=2, m=4, bits=4, symmetric=False),
        "fc1": LayerPlan(prune="unstructured", amount=0.96, bits=3, importance="taylor", act_bits=8),
        "fc2": LayerPlan(prune="channel", amount=0.25, bits=6, rank_ratio=0.5),
    }, distill=0.5, temperature=2.0, l1=1e-5, float_bits=16)
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan
    assert list(again.layers) == list(plan.layers)
    assert again.layers["conv2"].sparsity == 0.5


def test_plan_from_dict_rejects_unknown_keys_and_versions():
    with pytest.raises(PlanError, match="unknown layer-plan key"):
        CompressionPlan.from_dict({"layers": {"fc1": {"bitz": 4}}})
    with pytest.raises(PlanError, match="unknown plan key"):
        CompressionPlan.from_dict({"layers": {}, "distil": 0.5})
    with pytest.raises(PlanError, match="version"):
        CompressionPlan.from_dict({"version": 99, "layers": {}})


@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 9}, "bits"), ({"bits": 0}, "bits"), ({"prune": "magic"}, "prune"), ({"amount": 1.0}, "amount"),
    ({"prune": "nm", "n": 4, "m": 4}, "N:M"), ({"rank_ratio": 0.0}, "rank_ratio"), ({"act_bits": 3}, "act_bits"),
])
def test_layer_plan_validation_names_the_layer(kwargs, needle):
    with pytest.raises(PlanError) as e:
        CompressionPlan(layers={"fc1": LayerPlan(**kwargs)}).validate()
    assert "fc1" in str(e.value) and needle in str(e.value)


def test_summary_counts_granularities():
    plan = CompressionPlan.uniform(["a", "b", "c"], prune="unstructured", amount=0.9, bits=4)
    s = plan.summary()
    assert s["n_unstructured"] == 3 and s["mean_bits"] == 4 and s["mean_sparsity"] == pytest.approx(0.9)
    assert Budget(ratio=40).limit(1_724_320) == 43_108
