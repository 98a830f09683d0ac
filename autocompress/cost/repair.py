"""Repair an over-budget plan into the budget before any training.

A proposal that misses the budget is tightened rather than thrown away: every prunable layer's
amount moves toward the space's maximum by the same fraction t (dense and N:M layers turn
unstructured at their current sparsity when the space allows it) (the smallest t that fits, found
by bisection on the exact artifact size); if even t = 1 is too big, weight bits also step down
one choice at a time. The result stays inside the search space's choices.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from ..plan import CompressionPlan, LayerPlan

TIGHTENABLE = ("unstructured", "block", "channel")


def _amount(choice, current: float, t: float) -> float:  # choice: space.Choice
    if choice.low is not None:
        target = current + t * (choice.high - current)
        if choice.step:
            steps = math.ceil((target - choice.low) / choice.step - 1e-9)
            target = choice.low + steps * choice.step
        return round(min(max(target, current), choice.high), 6)
    values = sorted(float(v) for v in choice.values)
    target = current + t * (values[-1] - current)
    return next((v for v in values if v >= target - 1e-9), values[-1])


def _bits(choice, current: int, steps: int) -> int:
    values = sorted(int(v) for v in choice.values)
    below = [v for v in values if v <= current]
    idx = values.index(below[-1]) if below else 0
    return values[max(idx - steps, 0)]


def tighten(plan: CompressionPlan, layers: dict, t: float, bit_steps: int, loosen_nm: bool = False) -> CompressionPlan:
    """The plan with amounts moved a fraction t toward their maximum and bits lowered `bit_steps`
    choices; with loosen_nm, N:M layers become unstructured at their sparsity first."""
    out: dict[str, LayerPlan] = {}
    for name, lp in plan.layers.items():
        c = layers.get(name, {})
        changes: dict = {}
        prune = lp.prune
        current = lp.amount
        if (prune == "none" or prune == "nm" and loosen_nm) and t > 0 and "unstructured" in c["prune"].values and "amount" in c:
            prune, current = "unstructured", lp.sparsity  # an N:M layer becomes as sparse, then sparser
            changes["prune"] = prune
        if prune in TIGHTENABLE and "amount" in c:
            changes["amount"] = _amount(c["amount"], current, t)
        if bit_steps and "bits" in c:
            changes["bits"] = _bits(c["bits"], lp.bits, bit_steps)
        out[name] = replace(lp, **changes) if changes else lp
    return replace(plan, layers=out)


def repair(plan: CompressionPlan, layers: dict, size_of: Callable[[CompressionPlan], int], limit: int,
           iterations: int = 7) -> CompressionPlan | None:
    """The least-tightened plan whose size fits `limit`, or None when even the tightest does not.

    `layers` is BoundSpace.layers (the per-layer choices); `size_of` gives a plan's artifact bytes.
    """
    max_steps = max((len(c["bits"].values) for c in layers.values() if "bits" in c), default=1)
    for loosen_nm in (False, True):
        for steps in range(max_steps):
            plan_at = lambda t: tighten(plan, layers, t, steps, loosen_nm)  # noqa: E731
            if size_of(plan_at(1.0)) > limit:
                continue
            if steps > 0 and size_of(plan_at(0.0)) <= limit:
                return plan_at(0.0)
            lo, hi = 0.0, 1.0
            for _ in range(iterations):
                mid = (lo + hi) / 2
                if size_of(plan_at(mid)) <= limit:
                    hi = mid
                else:
                    lo = mid
            return plan_at(hi)
    return None
