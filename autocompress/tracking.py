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

from .plantable import granularity_mix, plan_csv
from .storage import default_tracking_uri, fast_sqlite
from .trials import TrialState

__all__ = ["PARENT_TAG", "Tracker", "default_tracking_uri"]

PARENT_TAG = "autocompress.role"


class Tracker:
    """Logs a study to one MLflow experiment (named after the study)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import: mlflow sets its own level
        logging.getLogger("alembic").setLevel(logging.WARNING)

        fast_sqlite()  # before MLflow opens its store
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:  # a remote server keeps its own artifact root
            remote = tracking_uri.startswith(("http:", "https:"))
            location = Path(artifact_dir).absolute().as_uri() if artifact_dir and not remote else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            # the UI opens it on "Training runs" rather than the GenAI overview
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None
        self._monitor: Any = None

    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT_TAG: "study", **(tags or {})})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        self._monitor = self._system_metrics(self.parent_id)
        return self.parent_id

    def _system_metrics(self, run_id: str) -> Any:
        """MLflow's system metrics (CPU, memory, disk, network; GPU when present) for the parent run,
        sampled every 5 s; None without psutil or with MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
            return None
        try:
            import psutil  # noqa: F401  (the monitor needs it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=5, tracking_uri=self.uri)
            monitor.start()
            return monitor
        except Exception:
            return None

    def _finish_system_metrics(self) -> None:
        """Stop the monitor and log one last sample: it publishes only after each full interval, so a
        study shorter than one interval would otherwise end with no system metrics at all."""
        monitor, self._monitor = self._monitor, None
        try:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception:
            pass  # system metrics are a courtesy: never fail a study over them

    def start_trial(self, number: int, params: dict[str, Any], plan: dict[str, Any], role: str = "trial") -> str:
        """A child run for Optuna trial `number` (role "trial"; "final" for its longer re-fine-tune),
        holding the plan summary, the plan as JSON and as a per-layer CSV, and its granularity mix
        as a tag to filter on."""
        tags = {PARENT_TAG: role, "optuna.trial": str(number), "state": "running",
                "granularity": granularity_mix(plan)}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        name = f"trial-{number}" if role == "trial" else f"{role}-{number}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.client.log_text(run_id, json.dumps(plan, indent=1, sort_keys=True), "plan.json")
        self.client.log_text(run_id, plan_csv(plan), "plan.csv")
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self.log(run_id, metrics, step=step)

    def log(self, run_id: str, metrics: dict[str, float | None] | None = None, tags: dict[str, Any] | None = None,
            step: int | None = None, series: dict[str, list[float]] | None = None) -> None:
        """Metrics (at `step`), per-epoch series (steps 1..n) and tags in one write: each write is a
        transaction of the tracking store (about 7 ms on SQLite), and a trial made a dozen."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in (metrics or {}).items() if v is not None]
        items += [Metric(k, float(v), now, i + 1) for k, vs in (series or {}).items() for i, v in enumerate(vs)]
        labels = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(items), len(labels)), 100):  # MLflow takes at most 100 tags per batch
            if items[i:i + 100] or labels[i:i + 100]:
                self.client.log_batch(run_id, metrics=items[i:i + 100], tags=labels[i:i + 100])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_file(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.log(run_id, tags=tags)

    def end(self, run_id: str, state: TrialState, metrics: dict[str, float | None] | None = None,
            tags: dict[str, Any] | None = None, series: dict[str, list[float]] | None = None) -> None:
        """Close a run; `state` is the trial's (complete / early-stopped / infeasible / failed / ...).
        Its last metrics, series and tags go in the same write as the state tag."""
        status = {TrialState.FAILED: "FAILED", TrialState.INTERRUPTED: "KILLED"}.get(state, "FINISHED")
        if run_id == self.parent_id and self._monitor is not None:
            self._finish_system_metrics()
        self.log(run_id, metrics, {**(tags or {}), "state": TrialState(state).value}, series=series)
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
                self.client.set_tag(run_id, "state", TrialState.FAILED.value)
                self.client.set_terminated(run_id, "KILLED")
                closed += 1
        return closed

    def child_runs(self) -> list[Any]:
        """All trial runs of this experiment (any parent)."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'trial'",
                                       max_results=10000)
