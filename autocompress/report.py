"""Tables of a study's trials: the top configurations with accuracy, size, ratio and per-layer plan."""
from __future__ import annotations

import json
from typing import Any

import optuna

from .plan import CompressionPlan, LayerPlan, format_bytes

_SHORT = {"none": "", "unstructured": "u", "channel": "ch", "block": "blk"}


def layer_summary(plan: CompressionPlan) -> str:
    """One compact token per layer: 'fc1 u96%/3b', 'conv2 nm2:4/4b', 'fc2 8b r0.50'."""
    return " ".join(f"{name} {_layer_token(lp)}" for name, lp in plan.layers.items())


def _layer_token(lp: LayerPlan) -> str:
    if lp.prune == "nm":
        tok = f"nm{lp.n}:{lp.m}/"
    elif lp.prune == "none" or lp.amount == 0:
        tok = ""
    else:
        tok = f"{_SHORT[lp.prune]}{lp.amount * 100:.0f}%/"
    tok += f"{lp.bits}b"
    if lp.rank_ratio < 1:
        tok += f" r{lp.rank_ratio:.2f}"
    if lp.act_bits < 32:
        tok += f" a{lp.act_bits}"
    return tok


def trial_rows(study: optuna.Study, original_bytes: int | None = None) -> list[dict[str, Any]]:
    """One dict per finished trial, best first (feasible by val accuracy, then the rest)."""
    from .search import trial_state

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            continue
        size = t.user_attrs.get("size_bytes")
        plan = CompressionPlan.from_dict(t.user_attrs["plan"]) if "plan" in t.user_attrs else None
        rows.append({
            "trial": t.number, "state": trial_state(t),
            "val_accuracy": t.values[0] if trial_state(t) == "complete" else None,
            "size_bytes": size,
            "ratio": (original_bytes / size) if (size and original_bytes) else t.user_attrs.get("ratio"),
            "seconds": t.user_attrs.get("seconds"),
            "layers": layer_summary(plan) if plan else "",
            "summary": plan.summary() if plan else {},
            "fail_reason": t.user_attrs.get("fail_reason"),
            "worker": t.user_attrs.get("worker"),
        })
    rows.sort(key=lambda r: (r["val_accuracy"] is None, -(r["val_accuracy"] or 0), r["size_bytes"] or 0))
    return rows


def format_table(rows: list[dict[str, Any]], top: int = 10) -> str:
    """A fixed-width text table of the first `top` rows."""
    head = f"{'trial':>5}  {'state':13s} {'val acc':>8} {'size':>10} {'ratio':>7}  per-layer plan"
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
    print(f"\ntop trials (budget {format_bytes(limit)}; "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")")
    print(format_table(rows, top))


def rows_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)
