"""Tables of a study's trials: the top configurations with accuracy, size, ratio and their plan
(per layer for small models, one compact summary for large ones: see plantable.plan_text)."""
from __future__ import annotations

import json
from typing import Any

import optuna

from .plan import CompressionPlan, format_bytes
from .plantable import PER_LAYER_UP_TO, plan_text
from .trials import TS, Attr, StudyAttr, TrialState, accuracy, trial_state


def trial_rows(study: optuna.Study, original_bytes: int | None = None) -> list[dict[str, Any]]:
    """One dict per finished trial, best first (feasible by val accuracy, then the rest)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TS.RUNNING:
            continue
        size = t.user_attrs.get(Attr.SIZE_BYTES)
        plan = CompressionPlan.from_dict(t.user_attrs[Attr.PLAN]) if Attr.PLAN in t.user_attrs else None
        state = trial_state(t)
        rows.append({
            "trial": t.number, "state": state.value,
            "val_accuracy": accuracy(t) if state == TrialState.COMPLETE else None,
            "size_bytes": size,
            "ratio": (original_bytes / size) if (size and original_bytes) else t.user_attrs.get(Attr.RATIO),
            "seconds": t.user_attrs.get(Attr.SECONDS),
            "layers": plan_text(plan) if plan else "",
            "summary": plan.summary() if plan else {},
            "fail_reason": t.user_attrs.get(Attr.FAIL_REASON),
            "worker": t.user_attrs.get(Attr.WORKER),
        })
    rows.sort(key=lambda r: (r["val_accuracy"] is None, -(r["val_accuracy"] or 0), r["size_bytes"] or 0))
    return rows


def plan_column(rows: list[dict[str, Any]]) -> str:
    """'per-layer plan', or 'plan summary' when some plan has too many layers to list."""
    big = any(r["summary"].get("layers", 0) > PER_LAYER_UP_TO for r in rows if r.get("summary"))
    return "plan summary" if big else "per-layer plan"


def format_table(rows: list[dict[str, Any]], top: int = 10) -> str:
    """A fixed-width text table of the first `top` rows."""
    head = f"{'trial':>5}  {'state':13s} {'val acc':>8} {'size':>10} {'ratio':>7}  {plan_column(rows[:top])}"
    lines = [head, "-" * len(head)]
    for r in rows[:top]:
        acc = f"{r['val_accuracy']:.4f}" if r["val_accuracy"] is not None else "-"
        size = format_bytes(r["size_bytes"]) if r["size_bytes"] else "-"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
        lines.append(f"{r['trial']:>5}  {r['state']:13s} {acc:>8} {size:>10} {ratio:>7}  {r['layers']}")
    return "\n".join(lines)


def print_table(study: optuna.Study, original_bytes: int, limit: int, top: int = 10) -> None:
    rows = trial_rows(study, original_bytes)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    matched = study.user_attrs.get(StudyAttr.MATCHED)
    print(f"\ntop trials (budget {format_bytes(limit)}; "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + (f"; exploring stopped when trial {matched['trial']} matched the baseline" if matched else "") + ")")
    print(format_table([r for r in rows if r["state"] != TrialState.WAITING.value], top))  # queued: nothing to show yet


def rows_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)
