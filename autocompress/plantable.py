"""A plan as a table and as short text: the per-layer rows of plan.csv, the granularity mix, and
the one-line summaries shown per trial on the console, in tables and in summary.md.

It reads plan dicts (the JSON form kept in trial attributes) and CompressionPlans, and imports
nothing above `plan`, so tracking, report and review can all use it.
"""
from __future__ import annotations

import csv
import io
from typing import Any

from .plan import PRUNE_KINDS, CompressionPlan, LayerPlan

CSV_COLUMNS = ("layer", "prune", "amount", "sparsity", "nm", "block_size", "importance", "bits",
               "rank_ratio", "act_bits")

_SHORT = {"none": "", "unstructured": "u", "channel": "ch", "block": "blk"}


def granularity_mix(plan: dict[str, Any]) -> str:
    """The pruning kinds a plan uses, in a fixed order, joined by '+': 'unstructured+nm', or 'none'."""
    used = {lp.get("prune", "none") for lp in plan.get("layers", {}).values()}
    return "+".join(k for k in PRUNE_KINDS if k in used and k != "none") or "none"


def plan_rows(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per layer of a plan dict, with the columns of CSV_COLUMNS."""
    rows = []
    for name, lp in plan.get("layers", {}).items():
        prune = lp.get("prune", "none")
        rows.append({
            "layer": name, "prune": prune, "amount": lp.get("amount", 0.0),
            "sparsity": round(LayerPlan.from_dict(lp).sparsity, 4), "nm": f"{lp['n']}:{lp['m']}" if prune == "nm" else "",
            "block_size": lp.get("block_size") if prune == "block" else "", "importance": lp.get("importance", ""),
            "bits": lp.get("bits", 32), "rank_ratio": lp.get("rank_ratio", 1.0), "act_bits": lp.get("act_bits", 32),
        })
    return rows


def plan_csv(plan: dict[str, Any]) -> str:
    """The per-layer plan as CSV text (header row first)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(plan_rows(plan))
    return buf.getvalue()


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


PER_LAYER_UP_TO = 8  # plans with more layers are shown as one compact summary (plan_digest)
_SPARSITY_BINS = ((0.0, "0%"), (0.5, "<50%"), (0.9, "<90%"), (1.01, ">=90%"))


def _mix(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items() if v)


def plan_digest(plan: CompressionPlan) -> str:
    """One line for a plan of any length: how many layers at each bit width, in each sparsity band
    and of each pruning kind, e.g. '52 layers; bits 4:30 8:20 32:2; sparsity 0%:5 <90%:30 >=90%:17;
    unstructured:40 channel:10 nm:2; low-rank 3; act-quant 0'."""
    lps = list(plan.layers.values())
    bits: dict[str, int] = {}
    for b in sorted({lp.bits for lp in lps}):
        bits[str(b)] = sum(lp.bits == b for lp in lps)
    bands = {label: 0 for _, label in _SPARSITY_BINS}
    for lp in lps:
        s = lp.sparsity
        label = "0%" if s == 0 else next(lab for top, lab in _SPARSITY_BINS[1:] if s < top)
        bands[label] += 1
    kinds = {k: sum(lp.prune == k for lp in lps) for k in PRUNE_KINDS if k != "none"}
    text = f"{len(lps)} layers; bits {_mix(bits)}; sparsity {_mix(bands)}"
    if any(kinds.values()):
        text += f"; {_mix(kinds)}"
    lowrank, act = sum(lp.rank_ratio < 1 for lp in lps), sum(lp.act_bits < 32 for lp in lps)
    if lowrank:
        text += f"; low-rank {lowrank}"
    if act:
        text += f"; act-quant {act}"
    return text


def plan_text(plan: CompressionPlan, per_layer_up_to: int = PER_LAYER_UP_TO) -> str:
    """The per-layer tokens for a small plan, the one-line digest for a large one (50-300 layers):
    what tables and summary.md show per trial. The per-layer detail is always in plan.csv."""
    return layer_summary(plan) if len(plan.layers) <= per_layer_up_to else plan_digest(plan)
