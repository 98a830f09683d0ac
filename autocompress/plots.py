"""Plots of a study as PNG files: accuracy vs size with the budget and the Pareto front, the
optimisation history, the best plan per layer, and a sensitivity heat map.

Each plot is drawn by a `*_figure` function on a plain matplotlib Figure (no pyplot, so no global
state and no display: it renders with Agg) that tests can inspect; the public functions save it
and return the PNG's path. Inputs are plain data: the rows of `report.trial_rows`, a plan dict.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from matplotlib.figure import Figure

from .plan import LayerPlan, format_bytes
from .trials import TrialState

_GREY, _FRONT, _BUDGET = "#999999", "#d62728", "#2ca02c"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (size, accuracy) points, smallest first: no other point is at most as large
    and at least as accurate, and strictly better in one of the two."""
    front: list[tuple[float, float]] = []
    for size, acc in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((size, acc))
    return front


def save(fig: Figure, path: str) -> str:
    """Write `fig` as a PNG (creating the folder) and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _scored(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("val_accuracy") is not None and r.get("size_bytes")]


def _stopped(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Early-stopped trials with their last reported accuracy (row key 'last_val'): shown, never scored."""
    return [r for r in rows if r.get("state") == TrialState.EARLY_STOPPED and r.get("last_val") is not None]


def accuracy_size_figure(rows: Sequence[dict[str, Any]], limit: int | None,
                         baseline: tuple[float, float] | None = None) -> Figure:
    """Validation accuracy against artifact bytes (log scale): trials, Pareto front, budget line,
    early-stopped trials hollow at their last reported accuracy, over-budget trials as crosses on
    the bottom edge, and the fp32 baseline as a star."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ok = _scored(rows)
    ax.scatter([r["size_bytes"] for r in ok], [r["val_accuracy"] for r in ok], s=28, alpha=0.7, label="trials")
    front = pareto_front([(r["size_bytes"], r["val_accuracy"]) for r in ok])
    if front:
        ax.plot(*zip(*front), "o-", color=_FRONT, drawstyle="steps-post", label="Pareto front")
        for r in ok:
            if (r["size_bytes"], r["val_accuracy"]) in front:
                ax.annotate(str(r["trial"]), (r["size_bytes"], r["val_accuracy"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=_FRONT)
    stopped = [r for r in _stopped(rows) if r.get("size_bytes")]
    if stopped:
        ax.scatter([r["size_bytes"] for r in stopped], [r["last_val"] for r in stopped], s=28,
                   facecolors="none", edgecolors=_GREY, label="early-stopped (last val)")
    over = [r["size_bytes"] for r in rows if r.get("state") == TrialState.INFEASIBLE and r.get("size_bytes")]
    if over:
        ax.plot(over, [0.02] * len(over), "x", color=_GREY, transform=ax.get_xaxis_transform(),
                label="over budget (not trained)")
    if baseline is not None:
        ax.plot([baseline[0]], [baseline[1]], "*", color="black", markersize=12, label="baseline fp32")
    if limit:
        ax.axvline(limit, color=_BUDGET, linestyle="--", label=f"budget {format_bytes(limit)}")
    ax.set_xscale("log")
    ax.set_xlabel("artifact size (bytes)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def history_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Validation accuracy per trial number with the best-so-far line; early-stopped trials as hollow
    circles at their last reported accuracy; infeasible and failed ones as crosses on the bottom edge."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ok = sorted(_scored(rows), key=lambda r: r["trial"])
    ax.scatter([r["trial"] for r in ok], [r["val_accuracy"] for r in ok], s=28, label="trial")
    best, steps = -math.inf, []
    for r in ok:
        best = max(best, r["val_accuracy"])
        steps.append((r["trial"], best))
    if steps:
        last = max(r["trial"] for r in rows)
        xs, ys = zip(*(steps + [(last, steps[-1][1])]))
        ax.plot(xs, ys, color=_FRONT, drawstyle="steps-post", label="best so far")
    stopped = _stopped(rows)
    if stopped:
        ax.scatter([r["trial"] for r in stopped], [r["last_val"] for r in stopped], s=28,
                   facecolors="none", edgecolors=_GREY, label="early-stopped (last val)")
    rest = [r["trial"] for r in rows if r not in ok and r not in stopped]
    if rest:
        ax.plot(rest, [0.02] * len(rest), "x", color=_GREY, transform=ax.get_xaxis_transform(),
                label="no score (infeasible / failed)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title("optimisation history")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _prune_label(lp: dict[str, Any]) -> str:
    if lp.get("prune") == "nm":
        return f"{lp['n']}:{lp['m']}"
    if lp.get("prune", "none") == "none" or not lp.get("amount"):
        return ""
    return {"unstructured": "u", "channel": "ch", "block": "blk"}.get(lp["prune"], lp["prune"])


def plan_figure(plan: dict[str, Any], title: str = "plan per layer") -> Figure:
    """Two panels over the layers of a plan dict: weight bits (log2 axis, rank ratio noted when
    factorised) and sparsity (pruning kind noted)."""
    layers = plan.get("layers", {})
    names = list(layers)
    fig = Figure(figsize=(max(5.0, 0.9 * len(names) + 2), 5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = range(len(names))
    bits = [layers[n].get("bits", 32) for n in names]
    top.bar(xs, bits, color="#1f77b4")
    top.set_yscale("log", base=2)
    top.set_ylim(0.8, 48)
    top.set_yticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])
    top.set_ylabel("weight bits")
    for x, n in zip(xs, names):
        lp = layers[n]
        note = f"{lp.get('bits', 32)}b" + (f" r{lp['rank_ratio']:.2f}" if lp.get("rank_ratio", 1) < 1 else "")
        note += f" a{lp['act_bits']}" if lp.get("act_bits", 32) < 32 else ""
        top.annotate(note, (x, bits[x]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    sparsity = [LayerPlan.from_dict(layers[n]).sparsity for n in names]
    bottom.bar(xs, sparsity, color="#ff7f0e")
    bottom.set_ylim(0, 1.1)
    bottom.set_ylabel("sparsity")
    for x, n in zip(xs, names):
        bottom.annotate(_prune_label(layers[n]), (x, sparsity[x]), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=8)
    bottom.set_xticks(list(xs), names, rotation=30 if len(names) > 6 else 0)
    fig.suptitle(title)
    return fig


def sensitivity_figure(table: dict[str, dict[str, float]]) -> Figure:
    """Layers (rows) x settings (columns) -> accuracy drop, with the values written in the cells."""
    layers = list(table)
    settings: list[str] = []
    for row in table.values():
        settings += [s for s in row if s not in settings]
    values = [[table[layer].get(s, math.nan) for s in settings] for layer in layers]
    fig = Figure(figsize=(max(4.0, 0.9 * len(settings) + 2.5), max(3.0, 0.5 * len(layers) + 1.5)),
                 layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(settings)), settings, rotation=30 if len(settings) > 5 else 0)
    ax.set_yticks(range(len(layers)), layers)
    top = max((v for row in values for v in row if not math.isnan(v)), default=0.0)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if top > 0 and v > 0.6 * top else "black")
    fig.colorbar(image, ax=ax, label="accuracy drop")
    ax.set_title("sensitivity")
    return fig


def accuracy_vs_size(rows: Sequence[dict[str, Any]], limit: int | None, path: str,
                     baseline: tuple[float, float] | None = None) -> str:
    """PNG of `accuracy_size_figure`; returns `path`."""
    return save(accuracy_size_figure(rows, limit, baseline), path)


def history(rows: Sequence[dict[str, Any]], path: str) -> str:
    """PNG of `history_figure`; returns `path`."""
    return save(history_figure(rows), path)


def plan_layers(plan: dict[str, Any], path: str, title: str = "plan per layer") -> str:
    """PNG of `plan_figure`; returns `path`."""
    return save(plan_figure(plan, title), path)


def sensitivity_heatmap(table: dict[str, dict[str, float]], path: str) -> str:
    """PNG of `sensitivity_figure` (layers x settings -> accuracy drop); returns `path`."""
    return save(sensitivity_figure(table), path)
