"""Trials whose worker is gone: Optuna's heartbeat fails them; this module retries them once and
closes their MLflow runs, so a killed worker leaves no trial and no run RUNNING forever.

Both a heartbeat-stale trial (SIGKILL, a lost machine) and an interrupted one (Ctrl-C) are
re-queued as a WAITING trial with the same parameters; the failed original stays in the study
(state FAIL) and `retried_numbers` lets the trial count skip it.
"""
from __future__ import annotations

import os
from typing import Any

import optuna

from .trials import Attr, TrialState

FAILED_TRIAL = "failed_trial"  # the system attr Optuna's own retry callback uses
MAX_RETRY = 1


def heartbeat_defaults() -> tuple[int, int]:
    """(interval, grace period) in seconds: 30 and 90, or $AUTOCOMPRESS_HEARTBEAT_INTERVAL and
    $AUTOCOMPRESS_GRACE_PERIOD (tests use a few seconds to see a killed worker's trial retried)."""
    interval = int(os.environ.get("AUTOCOMPRESS_HEARTBEAT_INTERVAL", "30"))
    grace = int(os.environ.get("AUTOCOMPRESS_GRACE_PERIOD", str(3 * interval)))
    return max(interval, 1), max(grace, interval + 1)


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue a WAITING copy of `trial` (same params, no user attrs); False when its retries are used up."""
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRY:
        return False
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={Attr.RETRY_OF: trial.number},
        system_attrs={FAILED_TRIAL: history[0], "retry_history": history}))
    return True


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that a later trial retries (they do not count towards --trials)."""
    return {h for t in trials for h in t.system_attrs.get("retry_history", [])}


class StaleTrialCallback:
    """Optuna's heartbeat_stale_trial_callback: retry the dead worker's trial, close its MLflow run."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retried = retry_trial(study, trial)
        run_id = trial.user_attrs.get(Attr.MLFLOW_RUN_ID)
        if run_id:
            close_run(self.tracking_uri, run_id, "worker stopped sending heartbeats (killed or lost)"
                      + ("; retried" if retried else ""))


def close_run(tracking_uri: str, run_id: str, reason: str, status: str = "KILLED") -> bool:
    """End an MLflow run still RUNNING as `status` with state=failed and the reason; False if not running."""
    from mlflow.tracking import MlflowClient

    client: Any = MlflowClient(tracking_uri=tracking_uri)
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except Exception:
        return False
    client.set_tag(run_id, "state", TrialState.FAILED.value)
    client.set_tag(run_id, "fail_reason", reason)
    client.set_terminated(run_id, status)
    return True
