"""Trial bookkeeping: what state a trial ended in, the names of the attributes a trial and a study
carry, and the questions every layer above asks of a study (accuracy, best, Pareto front,
finalists, refined results).

The bottom of the orchestration layer: it imports only Optuna, so storage, tracking, report,
review, refine, the objective and the search all read trials the same way.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any

import optuna

TS = optuna.trial.TrialState
FINISHED = (TS.COMPLETE, TS.PRUNED, TS.FAIL)


class TrialState(str, Enum):
    """A trial's state as shown in tables, on the console and in MLflow's `state` tag."""

    COMPLETE = "complete"
    INFEASIBLE = "infeasible"  # over a budget: recorded, never fine-tuned
    EARLY_STOPPED = "early-stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    RUNNING = "running"
    WAITING = "waiting"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Attr:
    """Keys of a trial's user attributes."""

    PLAN = "plan"  # the plan dict that was compressed (after repair)
    PROPOSED_PLAN = "proposed_plan"  # the sampler's plan, when repair changed it
    REPAIRED = "repaired"
    SIZE_BYTES = "size_bytes"  # bytes of the artifact the plan writes
    RATIO = "ratio"
    CONSTRAINT = "constraint"  # size - budget (<= 0: fits)
    INFEASIBLE = "infeasible"
    PREDICTED_LATENCY_MS = "predicted_latency_ms"
    ARTIFACT = "artifact"  # absolute path of the trial's .acz
    MLFLOW_RUN_ID = "mlflow_run_id"
    FAIL_REASON = "fail_reason"
    SECONDS = "seconds"
    OVERHEAD_SECONDS = "overhead_seconds"
    VAL_BY_EPOCH = "val_by_epoch"  # multi-objective studies: {epoch: val accuracy}
    WORKER = "worker"  # host:pid that ran the trial
    WARM_START = "warm_start"  # name of the warm-start plan it was enqueued as
    RETRY_OF = "retry_of"


class StudyAttr:
    """Keys of a study's user attributes."""

    IDENTITY = "identity"  # budget, model, data, space params, objectives: fixed for a study
    BASELINE = "baseline"  # {val_accuracy, fp32_bytes}
    SENSITIVITY = "sensitivity"  # the warm start's per-layer table
    FINAL = "final"  # refined finalists: trial number -> results
    UNTOUCHABLE = "untouchable_bytes"  # artifact bytes no plan can touch (cost.space_untouchable)
    MATCHED = "matched_baseline"  # {trial, val_accuracy, baseline, standard_error, trials_left}: exploring stopped


def trial_state(t: optuna.trial.FrozenTrial) -> TrialState:
    """complete / infeasible / early-stopped / failed / running / waiting."""
    if t.state == TS.COMPLETE:
        return TrialState.INFEASIBLE if t.user_attrs.get(Attr.INFEASIBLE) else TrialState.COMPLETE
    return {TS.PRUNED: TrialState.EARLY_STOPPED, TS.FAIL: TrialState.FAILED, TS.RUNNING: TrialState.RUNNING,
            TS.WAITING: TrialState.WAITING}[t.state]


def accuracy(t: optuna.trial.FrozenTrial) -> float:
    """The trial's validation accuracy (its first objective, in single- and multi-objective studies)."""
    return t.values[0]


def finetune_seconds(t: optuna.trial.FrozenTrial) -> float | None:
    """Seconds the trial spent fine-tuning and evaluating (its time less its overhead); None when
    it did not record both (it never trained, or an older study)."""
    if Attr.SECONDS not in t.user_attrs or Attr.OVERHEAD_SECONDS not in t.user_attrs:
        return None
    return t.user_attrs[Attr.SECONDS] - t.user_attrs[Attr.OVERHEAD_SECONDS]


def feasible(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials within every budget, with a value."""
    return [t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
            if not t.user_attrs.get(Attr.INFEASIBLE) and t.values]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The feasible completed trial with the highest validation accuracy (smaller size breaks ties)."""
    ok = feasible(study)
    return max(ok, key=lambda t: (accuracy(t), -t.user_attrs.get(Attr.SIZE_BYTES, 0))) if ok else None


def matching_trial(study: optuna.Study, bar: float) -> optuna.trial.FrozenTrial | None:
    """The best trial, when its validation accuracy is at least `bar` (the baseline's on the same
    samples, less its standard error): no plan can then be more accurate than the original, only
    as accurate."""
    best = best_trial(study)
    return best if best is not None and accuracy(best) >= bar else None


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Feasible completed trials not dominated in (accuracy up, size down, predicted latency down)."""
    ok = [t for t in feasible(study) if Attr.SIZE_BYTES in t.user_attrs]
    pts = [(accuracy(t), -t.user_attrs[Attr.SIZE_BYTES], -t.user_attrs.get(Attr.PREDICTED_LATENCY_MS, 0.0))
           for t in ok]
    front = [t for t, p in zip(ok, pts)
             if not any(all(x2 >= x for x2, x in zip(q, p)) and q != p for q in pts)]
    return sorted(front, key=lambda t: -accuracy(t))


def finalists(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k feasible completed trials with an artifact and the best validation accuracy (smaller
    size breaks ties)."""
    ok = [t for t in feasible(study) if Attr.ARTIFACT in t.user_attrs]
    ok.sort(key=lambda t: (-accuracy(t), t.user_attrs.get(Attr.SIZE_BYTES, 0)))
    return ok[:k]


def final_results(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """trial number (str) -> {val_accuracy, size_bytes, artifact, epochs} of the refined finalists."""
    return dict(study.user_attrs.get(StudyAttr.FINAL, {}))


def final_rank(info: dict[str, Any]) -> tuple[float, int]:
    """Sort key of a refined finalist: validation accuracy (a NaN one, whose logits were not
    finite, below every other), then the smaller file."""
    acc = info["val_accuracy"]
    return (acc if math.isfinite(acc) else -math.inf), -info["size_bytes"]


def best_final(study: optuna.Study) -> tuple[int, dict[str, Any]] | None:
    """The refined finalist with the highest validation accuracy, if any were refined."""
    res = final_results(study)
    if not res:
        return None
    num, info = max(res.items(), key=lambda kv: final_rank(kv[1]))
    return int(num), info


def exported_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial whose plan is exported: the best refined finalist if any, else the best trial."""
    final = best_final(study)
    if final is not None:
        return next(t for t in study.get_trials(deepcopy=False) if t.number == final[0])
    return best_trial(study)
