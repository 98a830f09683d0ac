"""What a person reviews after a search: plots, a Markdown summary, the per-layer plan as CSV, and
the best model as an MLflow pytorch model (optionally registered).

`log_review` is called once at the end of `orchestrate.run_search`; `write_plots` is shared with
`autocompress report`. Everything is read from the Optuna study (trial user attrs, the study's
`identity` and `baseline` attrs), so a resumed or finished study gives the same plots.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import optuna

from .context import SearchOutcome
from .plan import CompressionPlan, format_bytes
from .plantable import CSV_COLUMNS, PER_LAYER_UP_TO, plan_digest, plan_rows
from .report import plan_column, trial_rows
from .tracking import Tracker
from .trials import Attr, StudyAttr, accuracy, exported_trial

def write_plots(study: optuna.Study, folder: str) -> list[str]:
    """Write the study's PNGs into `folder`: accuracy vs size, history, the best plan per layer, and
    the sensitivity heat map when the study holds one (user attr 'sensitivity')."""
    from . import plots

    rows = trial_rows(study)
    last = {t.number: _last_val(t) for t in study.get_trials(deepcopy=False)}
    for r in rows:
        r["last_val"] = last.get(r["trial"])
    limit = study.user_attrs.get(StudyAttr.IDENTITY, {}).get("budget_bytes")
    base = study.user_attrs.get(StudyAttr.BASELINE) or {}
    point = (base["fp32_bytes"], base["val_accuracy"]) if base else None
    paths = [plots.accuracy_vs_size(rows, limit, os.path.join(folder, "accuracy_vs_size.png"), point),
             plots.history(rows, os.path.join(folder, "history.png"))]
    best = exported_trial(study)
    if best is not None:
        paths.append(plots.plan_layers(best.user_attrs[Attr.PLAN], os.path.join(folder, "best_plan_layers.png"),
                                       f"best plan: trial {best.number}"))
    if study.user_attrs.get(StudyAttr.SENSITIVITY):
        paths.append(plots.sensitivity_heatmap(study.user_attrs[StudyAttr.SENSITIVITY],
                                               os.path.join(folder, "sensitivity.png")))
    return paths


def _last_val(t: optuna.trial.FrozenTrial) -> float | None:
    """The last validation accuracy a trial reported (multi-objective studies keep it in a user attr)."""
    curve = t.intermediate_values or {int(k): v for k, v in t.user_attrs.get(Attr.VAL_BY_EPOCH, {}).items()}
    return curve[max(curve)] if curve else None


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def summary_markdown(study: optuna.Study, outcome: SearchOutcome | None = None, top: int = 10) -> str:
    """A Markdown page: budget, baseline, best trial, top trials, and the best plan per layer."""
    limit = study.user_attrs.get(StudyAttr.IDENTITY, {}).get("budget_bytes")
    base = study.user_attrs.get(StudyAttr.BASELINE) or {}
    rows = trial_rows(study)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [f"# Study {study.study_name}", ""]
    if limit:
        lines.append(f"- budget: {format_bytes(limit)} ({limit} bytes)")
    if base:
        lines.append(f"- baseline: val accuracy {_fmt(base.get('val_accuracy'))}, test accuracy "
                     f"{_fmt(getattr(outcome, 'baseline_test_accuracy', None))}, fp32 parameters "
                     f"{format_bytes(base['fp32_bytes'])} ({base['fp32_bytes']} bytes)")
    lines.append("- trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    best = exported_trial(study)
    if best is not None:
        size = best.user_attrs[Attr.SIZE_BYTES]
        val = getattr(outcome, "best_val", None)  # a refined finalist's own val accuracy
        val = accuracy(best) if val is None else val
        lines.append(f"- best: trial {best.number}, val accuracy {val:.4f}, test accuracy "
                     f"{_fmt(getattr(outcome, 'test_accuracy', None))}, {format_bytes(size)} ({size} bytes, "
                     f"{best.user_attrs.get(Attr.RATIO, 0):.1f}x)")
    lines += ["", "## Top trials", "", "| trial | state | val accuracy | size | ratio | mean bits | mean sparsity "
              f"| {plan_column(rows[:top])} |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows[:top]:
        s = r["summary"]
        lines.append(f"| {r['trial']} | {r['state']} | {_fmt(r['val_accuracy'])} | "
                     f"{format_bytes(r['size_bytes']) if r['size_bytes'] else '-'} | "
                     f"{_fmt(r['ratio'], '.1f')} | {s.get('mean_bits', '-')} | {s.get('mean_sparsity', '-')} | "
                     f"{r['layers']} |")
    if best is not None and len(best.user_attrs[Attr.PLAN]["layers"]) > PER_LAYER_UP_TO:
        lines += ["", f"## Best plan (trial {best.number})", "",
                  plan_digest(CompressionPlan.from_dict(best.user_attrs[Attr.PLAN])), "",
                  "Per layer: plan.csv in the trial's MLflow run."]
    elif best is not None:
        lines += ["", f"## Best plan per layer (trial {best.number})", "",
                  "| " + " | ".join(CSV_COLUMNS) + " |", "|" + "---|" * len(CSV_COLUMNS)]
        for row in plan_rows(best.user_attrs[Attr.PLAN]):
            lines.append("| " + " | ".join(str(row[c]) for c in CSV_COLUMNS) + " |")
    shown = (["accuracy_vs_size", "history"] + (["best_plan_layers"] if best is not None else [])
             + (["sensitivity"] if study.user_attrs.get(StudyAttr.SENSITIVITY) else []))
    lines += ["", "Plots: " + ", ".join(f"plots/{n}.png" for n in shown), ""]
    return "\n".join(lines)


def log_best_model(tracker: Tracker, run_id: str, artifact: str, register: str | None = None) -> Any:
    """Log `autocompress.load(artifact)` to run `run_id` as an MLflow pytorch model named 'model',
    registered as `register` when given; returns mlflow's ModelInfo.

    mlflow.pytorch.log_model only knows the global tracking URI, so it is set to the tracker's for
    the call and restored after. The module is pickled (any batch size, the very module `load`
    returns), so loading it back needs autocompress importable (its model classes)."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from .artifact import load, read_header

    model = load(artifact)
    example = torch.zeros(1, *read_header(artifact)["record"]["input_shape"])
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    # created here so that it belongs to the study's experiment, not the global default one
    logged = tracker.client.create_logged_model(tracker.experiment_id, name="model", source_run_id=run_id)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # None unsets it again
    mlflow.set_tracking_uri(tracker.uri)
    quiet = logging.getLogger("mlflow.pytorch")  # its warning about pickle: chosen on purpose, see above
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return mlflow.pytorch.log_model(model, name="model", run_id=run_id, model_id=logged.model_id,
                                        signature=signature,
                                        registered_model_name=register, serialization_format="pickle",
                                        pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    finally:
        quiet.setLevel(level)
        mlflow.set_tracking_uri(previous)


def log_review(tracker: Tracker, outcome: SearchOutcome, out: str, register: str | None = None) -> list[str]:
    """At the end of a search: plots (also kept in OUT/plots/STUDY), summary.md and the best model
    on the parent run. Returns the local plot paths. A failure here is printed, not raised: the
    search's results (study, best.acz) are already safe."""
    study, parent = outcome.study, outcome.parent_run_id
    paths: list[str] = []
    try:
        paths = write_plots(study, os.path.join(out, "plots", study.study_name))
        for path in paths:
            tracker.log_file(parent, path, "plots")
        tracker.log_text(parent, summary_markdown(study, outcome), "summary.md")
        if outcome.best_path:
            info = log_best_model(tracker, parent, outcome.best_path, register)
            if register:
                print(f"registered MLflow model {register!r} version {info.registered_model_version}")
    except Exception as e:
        print(f"autocompress: warning: review artifacts incomplete ({type(e).__name__}: {e})".splitlines()[0])
    return paths
