"""Ctrl-C: the current trial is recorded as interrupted, the parent run closed, exit code 130; the
same command resumes the study, repeats the interrupted plan and ends with the trials asked for."""
from __future__ import annotations

import signal

import optuna
import pytest

from autocompress.cli import main
from autocompress.workers import counted_trials
from helpers_cli import fine_tuning_trial, parent_runs, start_search, trial_runs, wait_for

pytestmark = pytest.mark.slow  # end-to-end searches


def test_sigint_records_the_trial_as_interrupted_and_the_study_resumes(tmp_path):
    out = tmp_path / "out"
    storage, mlflow = f"sqlite:///{out}/optuna.db", f"sqlite:///{out}/mlflow.db"
    # 4 epochs of up to 3 batches: long enough a trial that the signal lands inside one
    args = ("--study", "s", "--out", str(out), "--trials", "4", "--epochs", "4")
    p = start_search(*args)
    wait_for(lambda: fine_tuning_trial(storage, "s", min_number=1), p)
    p.send_signal(signal.SIGINT)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 130, log
    study = optuna.load_study(study_name="s", storage=storage)
    # the trial that was fine-tuning when the signal arrived (on a fast machine the one first seen
    # running may just have finished): exactly one, recorded as interrupted
    (victim,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert victim.number >= 1 and victim.user_attrs["fail_reason"].startswith("interrupted")
    run = {r.info.run_id: r for r in trial_runs(mlflow, "s")}[victim.user_attrs["mlflow_run_id"]]
    assert run.info.status == "KILLED" and run.data.tags["state"] == "interrupted"
    (parent,) = parent_runs(mlflow, "s")
    assert parent.info.status == "KILLED"
    # the best trial so far is exported after the interruption
    assert main(["export", "--runs", str(out), "--out", str(tmp_path / "best.acz")]) == 0

    p = start_search(*args)
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log
    study = optuna.load_study(study_name="s", storage=storage)
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == victim.params and retry.state != optuna.trial.TrialState.FAIL
    assert len(counted_trials(study)) == 4
    runs = trial_runs(mlflow, "s")
    assert len(runs) == len(study.trials) and all(r.info.status != "RUNNING" for r in runs)
    assert sorted(r.info.status for r in parent_runs(mlflow, "s")) == ["FINISHED", "KILLED"]
