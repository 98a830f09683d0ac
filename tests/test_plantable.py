"""A plan as rows (plan.csv), as per-layer tokens, and as one compact line for large models."""
from __future__ import annotations

import csv
import io

from autocompress.plan import CompressionPlan, LayerPlan
from autocompress.plantable import (CSV_COLUMNS, PER_LAYER_UP_TO, granularity_mix, layer_summary, plan_csv,
                                    plan_digest, plan_text)


def _big(n: int = 60) -> CompressionPlan:
    layers = {}
    for i in range(n):
        if i % 3 == 0:
            lp = LayerPlan(prune="unstructured", amount=0.95, bits=4)
        elif i % 3 == 1:
            lp = LayerPlan(prune="channel", amount=0.3, bits=8, rank_ratio=0.5)
        else:
            lp = LayerPlan(prune="none", bits=32)
        layers[f"features.{i}.conv"] = lp
    return CompressionPlan(layers=layers)


def test_small_plans_are_listed_per_layer():
    plan = CompressionPlan(layers={"fc1": LayerPlan(prune="unstructured", amount=0.96, bits=3),
                                   "fc2": LayerPlan(prune="nm", n=2, m=4, bits=4)})
    assert layer_summary(plan) == "fc1 u96%/3b fc2 nm2:4/4b"
    assert plan_text(plan) == layer_summary(plan)


def test_large_plans_are_one_line_of_mixes_that_add_up():
    plan = _big(60)
    text = plan_text(plan)
    assert text == plan_digest(plan) and "\n" not in text and len(text) < 200
    assert text == ("60 layers; bits 4:20 8:20 32:20; sparsity 0%:20 <50%:20 >=90%:20; "
                    "unstructured:20 channel:20; low-rank 20")
    assert "features.0.conv" not in text
    assert plan_text(_big(PER_LAYER_UP_TO)) == layer_summary(_big(PER_LAYER_UP_TO))


def test_plan_csv_has_one_row_per_layer_of_any_plan():
    plan = _big(300).to_dict()
    rows = list(csv.DictReader(io.StringIO(plan_csv(plan))))
    assert len(rows) == 300 and tuple(rows[0]) == CSV_COLUMNS
    assert rows[1]["prune"] == "channel" and rows[1]["bits"] == "8" and rows[0]["sparsity"] == "0.95"


def test_granularity_mix_in_a_fixed_order():
    assert granularity_mix(_big(6).to_dict()) == "unstructured+channel"
    assert granularity_mix({"layers": {"a": {"prune": "none"}}}) == "none"
