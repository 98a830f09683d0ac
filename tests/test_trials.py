"""Trial bookkeeping on a real (in-memory) Optuna study: states, best, Pareto front, finalists."""
from __future__ import annotations

import optuna
import pytest

from autocompress.trials import (Attr, StudyAttr, TrialState, best_final, best_trial, exported_trial, finalists,
                                 pareto_trials, trial_state)

DIST = {"x": optuna.distributions.FloatDistribution(0, 1)}


def _add(study, state=optuna.trial.TrialState.COMPLETE, value=None, **attrs):
    study.add_trial(optuna.create_trial(state=state, value=value, params={"x": 0.5}, distributions=DIST,
                                        user_attrs=attrs))
    return study.trials[-1]


@pytest.fixture
def study():
    s = optuna.create_study(direction="maximize")
    _add(s, value=0.80, **{Attr.SIZE_BYTES: 5_000, Attr.ARTIFACT: "a0"})
    _add(s, value=0.0, **{Attr.SIZE_BYTES: 90_000, Attr.INFEASIBLE: True})
    _add(s, value=0.90, **{Attr.SIZE_BYTES: 8_000, Attr.ARTIFACT: "a2"})
    _add(s, value=0.90, **{Attr.SIZE_BYTES: 7_000, Attr.ARTIFACT: "a3"})  # as accurate, smaller
    _add(s, value=0.85, **{Attr.SIZE_BYTES: 9_000, Attr.ARTIFACT: "a4"})  # dominated by 3
    _add(s, state=optuna.trial.TrialState.FAIL, **{Attr.FAIL_REASON: "boom"})
    _add(s, state=optuna.trial.TrialState.PRUNED)
    return s


def test_states_name_every_way_a_trial_ends(study):
    assert [trial_state(t) for t in study.trials] == [
        TrialState.COMPLETE, TrialState.INFEASIBLE, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE,
        TrialState.FAILED, TrialState.EARLY_STOPPED]
    assert f"{TrialState.EARLY_STOPPED:15s}|" == "early-stopped  |" and str(TrialState.FAILED) == "failed"
    assert TrialState.COMPLETE == "complete"  # rows and JSON keep the plain words


def test_best_is_the_most_accurate_feasible_trial_smaller_breaking_ties(study):
    assert best_trial(study).number == 3
    assert best_trial(optuna.create_study()) is None


def test_pareto_front_drops_the_infeasible_and_the_dominated(study):
    assert [t.number for t in pareto_trials(study)] == [3, 0]


def test_finalists_are_the_top_k_with_an_artifact(study):
    assert [t.number for t in finalists(study, 3)] == [3, 2, 4]


def test_the_exported_trial_is_the_best_refined_finalist_when_there_is_one(study):
    assert best_final(study) is None and exported_trial(study).number == 3
    study.set_user_attr(StudyAttr.FINAL, {"2": {"val_accuracy": 0.95, "size_bytes": 8_000},
                                          "3": {"val_accuracy": 0.93, "size_bytes": 7_000}})
    assert best_final(study)[0] == 2 and exported_trial(study).number == 2


def test_a_finalist_with_nan_validation_ranks_last():
    """A refined finalist whose logits were not finite has a NaN accuracy: max() with NaN keys
    picks by position, so it could have won. It ranks below every finite one."""
    from autocompress.trials import final_rank

    infos = [{"val_accuracy": float("nan"), "size_bytes": 10}, {"val_accuracy": 0.1, "size_bytes": 50},
             {"val_accuracy": 0.1, "size_bytes": 20}]
    assert max(infos, key=final_rank) is infos[2]
    assert sorted(infos, key=final_rank)[0] is infos[0]
