"""MLflow tracking: one parent run per search invocation, one nested child run per trial.

Uses `MlflowClient` with explicit run ids (never the global "active run"), so each trial logs
to its own run even when several trials run at once, and a crash leaves runs that the next
invocation can find and close.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

PARENT_TAG = "autocompress.role"


def default_tracking_uri(out_dir: str) -> str:
    """A local SQLite MLflow store under the output folder (`mlflow ui --backend-store-uri` opens it)."""
    return f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'mlflow.db'))}"


class Tracker:
    """Logs a study to one MLflow experiment (named after the study)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import: mlflow sets its own level
        logging.getLogger("alembic").setLevel(logging.WARNING)

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = Path(artifact_dir).absolute().as_uri() if artifact_dir else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None

    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT_TAG: "study", **(tags or {})})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_trial(self, number: int, params: dict[str, Any], plan: dict[str, Any], role: str = "trial") -> str:
        """A child run for Optuna trial `number` (role "trial"; "final" for its longer re-fine-tune),
        holding the plan summary and the plan JSON."""
        tags = {PARENT_TAG: role, "optuna.trial": str(number), "state": "running"}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        name = f"trial-{number}" if role == "trial" else f"{role}-{number}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.client.log_text(run_id, json.dumps(plan, indent=1, sort_keys=True), "plan.json")
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_file(self, run_id: str, path: str) -> None:
        self.client.log_artifact(run_id, path)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def end(self, run_id: str, state: str) -> None:
        """Close a run; `state` is the trial's (complete / early-stopped / infeasible / failed / ...)."""
        status = {"complete": "FINISHED", "infeasible": "FINISHED", "early-stopped": "FINISHED",
                  "failed": "FAILED", "interrupted": "KILLED"}.get(state, "FINISHED")
        self.client.set_tag(run_id, "state", state)
        self.client.set_terminated(run_id, status)

    def close_stale(self, run_ids: list[str]) -> int:
        """Mark runs still RUNNING (their process died) as KILLED; returns how many were closed."""
        closed = 0
        for run_id in run_ids:
            try:
                run = self.client.get_run(run_id)
            except Exception:
                continue
            if run.info.status == "RUNNING":
                self.client.set_tag(run_id, "state", "failed")
                self.client.set_terminated(run_id, "KILLED")
                closed += 1
        return closed

    def child_runs(self) -> list[Any]:
        """All trial runs of this experiment (any parent)."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'trial'",
                                       max_results=10000)
