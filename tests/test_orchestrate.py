"""The search loop end to end: a real Optuna study in SQLite and real MLflow runs, on scikit-learn's digits."""
from __future__ import annotations

import json
import os
import re

import optuna
import pytest
from mlflow.tracking import MlflowClient

from autocompress.api import search
from autocompress.artifact import load
from autocompress.train import evaluate

pytestmark = pytest.mark.slow

QUICK = dict(model="lenet5", data="digits", trials=3, epochs=1, baseline_epochs=3, max_batches=4,
             progress=False, seed=0, final_top=0,
             stop_at_baseline=False)  # these tests count trials: digits' weak baseline is matched at once


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


def test_pareto_mode_returns_only_non_dominated_trials(tmp_path):
    from autocompress.trials import pareto_trials

    outcome = search("6x", out=str(tmp_path), study="p", objectives="accuracy,size",
                     **{**QUICK, "trials": 5, "warm_start": False})
    study = outcome.study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("infeasible")]
    front = pareto_trials(study)
    assert front
    for t in front:
        a, s = t.values
        assert s == t.user_attrs["size_bytes"]
        assert not any(o.values[0] >= a and o.values[1] <= s and (o.values[0] > a or o.values[1] < s) for o in done)
    for t in done:
        if t not in front:
            assert any(f.values[0] >= t.values[0] and f.values[1] <= t.values[1] for f in front)


def test_exploring_stops_once_a_trial_matches_the_baseline_and_that_trial_alone_gets_the_time_left(tmp_path, capsys):
    """At a mild budget a plan can be as accurate as the original (the README's 50 KB run: its
    first trial reads 0.9157-0.9175 against the baseline's 0.9168 ± 0.0036), and no plan can then
    do better, only as well: the trials left and the finalists' epochs all go to fine-tuning that
    one. Digits' 3-epoch baseline is matched by the first warm-start trial at 8x."""
    from autocompress.trials import StudyAttr, final_results

    options = {**QUICK, "trials": 4, "final_top": 2, "final_epochs": 1, "stop_at_baseline": True}
    outcome = search("8x", out=str(tmp_path), study="m", **options)
    study = outcome.study
    matched = study.user_attrs[StudyAttr.MATCHED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in complete] == [matched["trial"]] == [0]
    baseline, error = matched["baseline"], matched["standard_error"]
    assert baseline == study.user_attrs[StudyAttr.BASELINE]["val_accuracy"] and 0 < error < 0.05
    assert matched["val_accuracy"] >= baseline - error  # within one standard error of the baseline
    assert matched["trials_left"] == 3
    final = final_results(study)
    assert list(final) == ["0"] and final["0"]["epochs"] == 2 * 1 + 3 * 1  # two finalists' epochs + three trials'
    assert outcome.best.number == 0 and outcome.best_path
    parent = [r for r in _client(tmp_path).search_runs([_client(tmp_path).get_experiment_by_name("m").experiment_id])
              if r.data.tags.get("autocompress.role") == "study"]
    assert parent[0].data.tags["matched_baseline_trial"] == "0"
    printed = capsys.readouterr().out
    assert "3 waiting; exploring stopped when trial 0 matched the baseline" in printed  # the table says why ...
    assert not re.search(r"^\s+\d+\s+waiting", printed, re.M)  # ... and lists no row for the plans left queued

    again = search("8x", out=str(tmp_path), study="m", **options)  # a resumed search keeps to the stop
    assert [t.number for t in again.study.trials if t.state == optuna.trial.TrialState.COMPLETE] == [0]
    assert final_results(again.study) == final
