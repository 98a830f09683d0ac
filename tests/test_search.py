"""End to end: a real Optuna study in SQLite and real MLflow runs, on scikit-learn's digits."""
from __future__ import annotations

import json
import os

import optuna
import pytest
from mlflow.tracking import MlflowClient

from autocompress.api import search
from autocompress.artifact import load
from autocompress.train import evaluate

QUICK = dict(model="lenet5", data="digits", trials=3, epochs=1, baseline_epochs=3, max_batches=4,
             progress=False, seed=0, final_top=0)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    outcome = search("8x", out=str(out), study="s", **QUICK)
    return out, outcome


def _client(out):
    return MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")


def test_three_trials_in_sqlite_and_three_child_runs_under_one_parent(first):
    out, outcome = first
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out}/optuna.db")
    assert len(study.trials) == 3
    client = _client(out)
    exp = client.get_experiment_by_name("s")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("autocompress.role") == "study"]
    children = [r for r in runs if r.data.tags.get("autocompress.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2]
    for c in children:
        state = c.data.tags["state"]
        assert c.info.status == ("FAILED" if state == "failed" else "FINISHED")
        arts = [a.path for a in client.list_artifacts(c.info.run_id)]
        assert "plan.json" in arts
        plan = json.loads(open(client.download_artifacts(c.info.run_id, "plan.json")).read())
        assert set(plan["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
        assert "mean_bits" in c.data.params
        assert state == "failed" or "size_bytes" in c.data.metrics
    assert parents[0].data.metrics["best_test_accuracy"] == pytest.approx(outcome.test_accuracy)


def test_reported_size_is_the_artifact_size_and_load_matches_evaluation(first):
    out, outcome = first
    best = outcome.best
    assert best is not None
    assert os.path.getsize(best.user_attrs["artifact"]) == best.user_attrs["size_bytes"]
    assert os.path.getsize(outcome.best_path) == best.user_attrs["size_bytes"] <= outcome.limit
    for t in outcome.study.trials:
        if "artifact" in t.user_attrs:
            assert os.path.getsize(t.user_attrs["artifact"]) == t.user_attrs["size_bytes"]
    # the loaded artifact scores on the validation split exactly what the trial reported
    from autocompress.data import load_data

    bundle = load_data("digits", seed=0)
    model = load(outcome.best_path)
    assert evaluate(model, bundle.val) == pytest.approx(best.value, abs=1e-9)
    assert outcome.test_accuracy == pytest.approx(evaluate(model, bundle.test), abs=1e-9)


def test_resume_adds_trials_instead_of_starting_over(first, tmp_path):
    out, outcome = first
    before = {t.number: (t.params, t.value) for t in outcome.study.trials}
    again = search("8x", out=str(out), study="s", **{**QUICK, "trials": 5})
    trials = again.study.trials
    assert len(trials) == 5
    assert {t.number: (t.params, t.value) for t in trials[:3]} == before
    client = _client(out)
    exp = client.get_experiment_by_name("s")
    runs = client.search_runs([exp.experiment_id])
    assert sum(r.data.tags.get("autocompress.role") == "trial" for r in runs) == 5
    assert sum(r.data.tags.get("autocompress.role") == "study" for r in runs) == 2


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
