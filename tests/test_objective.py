"""One trial end to end: over-budget plans are recorded and never trained, repaired into the
budget, or stopped early when hopeless."""
from __future__ import annotations

import os

import optuna
import pytest
from mlflow.tracking import MlflowClient

from autocompress.api import search

pytestmark = pytest.mark.slow

QUICK = dict(model="lenet5", data="digits", trials=3, epochs=1, baseline_epochs=3, max_batches=4,
             progress=False, seed=0, final_top=0,
             stop_at_baseline=False)  # these tests count trials: digits' weak baseline is matched at once


def _client(out):
    return MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")


def test_over_budget_plan_is_never_fine_tuned(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("layer:\n  prune: [none]\n  bits: [2, 32]\nrecovery:\n  distill: [0.0]\n")
    from autocompress.settings import SearchSettings
    from autocompress.study import open_study
    from autocompress.plan import parse_budget

    study = open_study(SearchSettings(budget=parse_budget("8x"), out=str(tmp_path), study="b"))
    for bits in (32, 2):  # all-fp32 is 1x: far over an 8x budget; all-2-bit fits
        study.enqueue_trial({f"{n}.bits": bits for n in ("conv1", "conv2", "fc1", "fc2")})
    outcome = search("8x", out=str(tmp_path), study="b", space=str(space), repair=False, **{**QUICK, "trials": 2})
    over, fits = outcome.study.trials
    assert over.user_attrs["infeasible"] and over.user_attrs["constraint"] > 0
    assert "artifact" not in over.user_attrs and over.intermediate_values == {}
    assert fits.intermediate_values and not fits.user_attrs.get("infeasible")
    client = _client(tmp_path)
    run = client.get_run(over.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "infeasible" and "val_accuracy" not in run.data.metrics
    assert outcome.best.number == fits.number


def test_over_budget_proposal_is_repaired_into_the_budget(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("layer:\n  prune: [unstructured]\n  amount: {low: 0.0, high: 0.98, step: 0.02}\n"
                     "  bits: [4, 8]\nrecovery:\n  distill: [0.0]\n")
    from autocompress.plan import parse_budget
    from autocompress.settings import SearchSettings
    from autocompress.study import open_study

    study = open_study(SearchSettings(budget=parse_budget("40x"), out=str(tmp_path), study="r"))
    study.enqueue_trial({**{f"{n}.amount": 0.0 for n in ("conv1", "conv2", "fc1", "fc2")},
                         **{f"{n}.bits": 8 for n in ("conv1", "conv2", "fc1", "fc2")}})  # 4x: far over 40x
    outcome = search("40x", out=str(tmp_path), study="r", space=str(space), **{**QUICK, "trials": 1})
    t = outcome.study.trials[0]
    assert t.user_attrs["repaired"] and not t.user_attrs.get("infeasible")
    assert t.user_attrs["size_bytes"] <= outcome.limit
    assert os.path.getsize(t.user_attrs["artifact"]) == t.user_attrs["size_bytes"]
    assert t.user_attrs["proposed_plan"]["layers"]["fc1"]["bits"] == 8
    assert t.intermediate_values  # it was fine-tuned


def test_early_stopping_stops_a_hopeless_trial(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("layer:\n  prune: [unstructured]\n  amount: [0.0, 0.98]\n  bits: [1, 8]\n"
                     "recovery:\n  distill: [0.0]\n")
    from autocompress.plan import parse_budget
    from autocompress.settings import SearchSettings
    from autocompress.study import open_study

    study = open_study(SearchSettings(budget=parse_budget("3x"), out=str(tmp_path), study="e"))
    names = ("conv1", "conv2", "fc1", "fc2")
    for _ in range(4):
        study.enqueue_trial({**{f"{n}.amount": 0.0 for n in names}, **{f"{n}.bits": 8 for n in names}})
    study.enqueue_trial({**{f"{n}.amount": 0.98 for n in names}, **{f"{n}.bits": 1 for n in names}})
    outcome = search("3x", out=str(tmp_path), study="e", space=str(space),
                     **{**QUICK, "trials": 5, "epochs": 3, "max_batches": 2, "warm_start": False})
    hopeless = outcome.study.trials[4]
    assert hopeless.state == optuna.trial.TrialState.PRUNED
    assert list(hopeless.intermediate_values) == [1]  # stopped after its first epoch, not run to the end
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in outcome.study.trials[:4])
