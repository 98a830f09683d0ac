"""Several worker processes on one PostgreSQL study: shared trials, nothing lost when one is killed.

Needs a PostgreSQL server: AUTOCOMPRESS_TEST_PG=postgresql://user@127.0.0.1:PORT/DB (`.ci/run` starts
one); AUTOCOMPRESS_TEST_PG_MLFLOW, when set, is a second database for MLflow (else SQLite in the
output folder).
"""
from __future__ import annotations

import os
import signal
import uuid

import optuna
import pytest

from autocompress.cli import main
from autocompress.storage import database_url
from autocompress.trials import best_trial
from autocompress.workers import counted_trials
from helpers_cli import fine_tuning_trial, parent_runs, reader, start_search, trial_runs, wait_for

PG = database_url(os.environ.get("AUTOCOMPRESS_TEST_PG"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PG, reason="AUTOCOMPRESS_TEST_PG is not set (no PostgreSQL server to test on; "
                                 "`.ci/run` starts one)")]


@pytest.fixture
def where(tmp_path):
    """(study name, Optuna storage, MLflow tracking URI, out folder) for one fresh study."""
    name = f"w-{uuid.uuid4().hex[:8]}"
    mlflow = database_url(os.environ.get("AUTOCOMPRESS_TEST_PG_MLFLOW")) or f"sqlite:///{tmp_path}/mlflow.db"
    return name, PG, mlflow, tmp_path / "out"


def _args(where, *extra: str) -> list[str]:
    name, storage, mlflow, out = where
    return ["--study", name, "--storage", storage, "--tracking-uri", mlflow, "--out", str(out), *extra]


def test_three_workers_share_one_study_each_trial_once(where):
    name, storage, mlflow, _ = where
    p = start_search(*_args(where, "--workers", "3", "--trials", "4"))
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log
    assert log.count("baseline: training") <= 1 and log.count("baseline: using cached") >= 3  # workers reuse it
    trials = optuna.load_study(study_name=name, storage=storage).trials
    runs = trial_runs(mlflow, name)
    assert len(counted_trials(optuna.load_study(study_name=name, storage=storage))) == 4
    assert len(trials) == len(runs) == 4
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == [t.number for t in trials]
    assert {r.info.run_id for r in runs} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the trials really were shared
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no two workers proposed the same plan
    (parent,) = parent_runs(mlflow, name)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and all(r.info.status != "RUNNING" for r in runs)


def test_worker_killed_mid_trial_is_retried_and_nothing_is_lost(where, tmp_path):
    name, storage, mlflow, _ = where
    # trials long enough (about a second of fine-tune) to be caught fine-tuning by a 50 ms poll
    p = start_search(*_args(where, "--workers", "2", "--trials", "4", "--epochs", "4", "--max-batches", "12",
                            "--early-stopping", "none"))
    victim = wait_for(lambda: fine_tuning_trial(storage, name), p)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    # mid-study, the best trial so far can be exported
    wait_for(lambda: best_trial(optuna.load_study(study_name=name, storage=reader(storage))), p)
    assert main(["export", "--storage", storage, "--study", name, "--out", str(tmp_path / "mid.acz")]) == 0
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log
    assert "exit -9" in log
    study = optuna.load_study(study_name=name, storage=storage)
    killed = study.trials[victim.number]
    assert killed.state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == victim.params and retry.state != optuna.trial.TrialState.FAIL
    assert len(counted_trials(study)) == 4 and len(study.trials) == 5
    runs = {r.info.run_id: r for r in trial_runs(mlflow, name)}
    assert len(runs) == len(study.trials) and all(r.info.status != "RUNNING" for r in runs.values())
    dead = runs[victim.user_attrs["mlflow_run_id"]]
    assert dead.info.status == "KILLED" and "heartbeat" in dead.data.tags["fail_reason"]
    assert runs[retry.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
