"""Tables of a study's trials, readable for 4 layers and for 300."""
from __future__ import annotations

import json

import optuna

from autocompress.plan import CompressionPlan, LayerPlan
from autocompress.report import format_table, rows_json, trial_rows
from autocompress.trials import Attr, StudyAttr

DIST = {"x": optuna.distributions.FloatDistribution(0, 1)}


def plan_of(n: int, bits: int = 4) -> dict:
    return CompressionPlan(layers={f"blocks.{i}.fc": LayerPlan(prune="unstructured", amount=0.9, bits=bits)
                                   for i in range(n)}).to_dict()


def study_of(n_layers: int) -> optuna.Study:
    """A real in-memory study: two complete trials, one infeasible, one failed, one running."""
    s = optuna.create_study(direction="maximize", study_name="t")
    s.set_user_attr(StudyAttr.IDENTITY, {"budget_bytes": 10_000})
    s.set_user_attr(StudyAttr.BASELINE, {"val_accuracy": 0.9, "fp32_bytes": 100_000})
    add = s.add_trial
    TS = optuna.trial.TrialState
    add(optuna.create_trial(value=0.80, params={"x": 0.1}, distributions=DIST,
                            user_attrs={Attr.PLAN: plan_of(n_layers), Attr.SIZE_BYTES: 9_000, Attr.RATIO: 11.1}))
    add(optuna.create_trial(value=0.85, params={"x": 0.2}, distributions=DIST,
                            user_attrs={Attr.PLAN: plan_of(n_layers, 8), Attr.SIZE_BYTES: 9_500, Attr.RATIO: 10.5}))
    add(optuna.create_trial(value=0.0, params={"x": 0.3}, distributions=DIST,
                            user_attrs={Attr.PLAN: plan_of(n_layers, 32), Attr.SIZE_BYTES: 90_000,
                                        Attr.INFEASIBLE: True}))
    add(optuna.create_trial(state=TS.FAIL, params={"x": 0.4}, distributions=DIST,
                            user_attrs={Attr.FAIL_REASON: "RuntimeError: boom"}))
    add(optuna.create_trial(state=TS.RUNNING, params={"x": 0.5}, distributions=DIST))
    return s


def test_rows_are_best_first_with_plain_states_and_skip_running():
    rows = trial_rows(study_of(4), original_bytes=100_000)
    assert [(r["trial"], r["state"]) for r in rows] == [(1, "complete"), (0, "complete"), (3, "failed"),
                                                        (2, "infeasible")]
    assert rows[0]["ratio"] == 100_000 / 9_500 and rows[2]["fail_reason"] == "RuntimeError: boom"
    assert json.loads(rows_json(rows))[3]["state"] == "infeasible"


def test_small_models_are_listed_per_layer():
    table = format_table(trial_rows(study_of(4)))
    assert "per-layer plan" in table.splitlines()[0]
    assert "blocks.0.fc u90%/8b blocks.1.fc u90%/8b" in table


def test_a_300_layer_model_gets_one_short_summary_per_trial():
    table = format_table(trial_rows(study_of(300)))
    lines = table.splitlines()
    assert "plan summary" in lines[0] and len(lines) == 2 + 4
    assert max(len(line) for line in lines) < 160
    assert "300 layers; bits 8:300; sparsity >=90%:300; unstructured:300" in lines[2]
    assert "blocks.0.fc" not in table
