"""Running the real CLI in a subprocess, and reading a study and its MLflow runs back."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--budget", "8x", "--model", "lenet5", "--data", "digits", "--epochs", "1", "--baseline-epochs", "3",
         "--max-batches", "3", "--no-progress", "--seed", "0", "--no-warm-start", "--final-top", "0",
         "--no-stop-at-baseline"]  # the tests count trials: digits' weak baseline is matched at once


def cli_env() -> dict[str, str]:
    """This checkout first on the path; heartbeats every second, a trial stale after 3 s."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "AUTOCOMPRESS_HEARTBEAT_INTERVAL": "1", "AUTOCOMPRESS_GRACE_PERIOD": "3"}


def start_search(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autocompress", "search", *QUICK, *args], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for(find: Callable[[], Any], proc: subprocess.Popen, timeout: float = 150.0) -> Any:
    """Poll `find()` every 50 ms until it returns something; fail if the process ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            found = find()
        except Exception:  # the study or its tables do not exist yet
            found = None
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"search ended (rc {proc.returncode}) first:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def reader(storage: str) -> optuna.storages.RDBStorage:
    """A storage for polling a running search: it never races the search creating the tables, and
    closes its connection after each query (a pooled engine per 50 ms poll holds its connection
    until garbage collection, enough to exhaust PostgreSQL's max_connections)."""
    return optuna.storages.RDBStorage(storage, skip_table_creation=True,
                                      engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})


def fine_tuning_trial(storage: str, study: str, min_number: int = 0) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial past its size check (within budget, so fine-tuning), with its MLflow run open."""
    for t in optuna.load_study(study_name=study, storage=reader(storage)).get_trials(deepcopy=False):
        if (t.state == optuna.trial.TrialState.RUNNING and t.number >= min_number and "mlflow_run_id" in t.user_attrs
                and t.user_attrs.get("constraint", 1) <= 0 and "worker" in t.user_attrs):
            return t
    return None


def trial_runs(tracking_uri: str, study: str) -> list[Any]:
    """The MLflow child runs (one per Optuna trial) of the study's experiment."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("autocompress.role") == "trial"]


def parent_runs(tracking_uri: str, study: str) -> list[Any]:
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("autocompress.role") == "study"]
