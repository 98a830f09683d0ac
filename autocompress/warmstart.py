"""Warm-start plans, tried before the sampler takes over.

- Uniform plans: one global magnitude threshold over all layers and the same bits everywhere,
  at the smallest sparsity whose real artifact fits the budget (bisection on exact sizes).
- Channel plans: every layer that may lose channels loses the same fraction of them, or a
  fraction that grows with the layer's size (a power of its share: the big fully connected layers
  lose most, the small first convolution little; the two largest powers that fit the budget);
  physically removed, so no mask is stored; the least pruning that fits. The same bits
  everywhere, except in the smallest layers (together at most EDGE_SHARE of the weights: in
  LeNet-5 the first convolution and the classifier), which keep EDGE_BITS: they cost almost
  nothing and are the most fragile. At high ratios these beat unstructured plans, whose masks cost
  ~log2(1/density) bits per kept weight; and they are faster, not only smaller.
- A sensitivity-allocated plan: a multiple-choice knapsack over per-layer (amount, bits) options
  that minimises the summed per-layer accuracy drops under the byte budget.
All are mapped onto the search space's choices so they can be enqueued as Optuna trials.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .models import layer_numel, layer_weight, prunable_layers
from .plan import CompressionPlan, LayerPlan
from .sensitivity import Sensitivity

SizeFn = Callable[[CompressionPlan], int]

EDGE_SHARE = 0.05  # the smallest layers holding together at most this share of the weights ...
EDGE_BITS = 6  # ... keep at least this many bits in a channel plan
# exponents p of the size-weighted channel plans: layer amount = fraction * (layer size / largest)^p,
# tried largest first; the first SIZE_WEIGHTED that fit the budget become plans, beside p = 0 (the
# same fraction everywhere). The higher the ratio, the milder the power that still fits; the two
# largest that fit tested 1-4 points above the same fraction everywhere (100 s of fine-tuning,
# seed 0, one process beside another; bench/results/channel_powers.md):
# - LeNet-5 at 200x (3 bits, conv1 and fc2 at 6): p = 0.25 (conv2 keeps half its channels, fc1 3%)
#   90.5%, p = 0.125 90.7% (p = 0: 89.3% in an earlier measurement); p = 0.5 does not fit;
# - LeNet-5 at 300x: p = 0.125 90.2%, p = 0.0625 90.0%; p = 0.25 does not fit; four processes at
#   once: p = 0.125 90.0%, p = 0 86.5%;
# - mnasnet0_5 at 20x (4 bits, 300 s): p = 0.5 80.65%, p = 0.25 79.98%, p = 0 79.04%.
CHANNEL_POWERS = (0.5, 0.25, 0.125, 0.0625)
SIZE_WEIGHTED = 2
# the largest fraction of a layer's channels a warm-start plan removes: LeNet-5 at 200x, 4 bits,
# p = 0.25 fits with fc1 losing 98.75% and tests 89.9% after 100 s, p = 0.125 (94.75%) 90.5%; at
# 300x, p = 0.125 fits at 4 bits with 98% and tests 89.5%, at 3 bits with 96% 90.0%
MOST_CHANNELS = 0.975


def global_amounts(model: nn.Module, sparsity: float, layers: list[str] | None = None) -> dict[str, float]:
    """Per-layer pruning amounts implied by one global magnitude threshold at `sparsity`."""
    names = layers or prunable_layers(model)
    weights = {n: layer_weight(model.get_submodule(n)).detach().abs().flatten().cpu() for n in names}
    if sparsity <= 0:
        return {n: 0.0 for n in names}
    # the k-th smallest magnitude by an in-place selection on one concatenated copy: kthvalue on
    # the concatenation took 3x the model's fp32 bytes more (a copy and int64 indices), which
    # AlexNet's 57M weights did not get within an 8 GiB address space
    allw = np.concatenate([w.numpy() for w in weights.values()])
    k = max(int(sparsity * allw.size), 1)
    allw.partition(k - 1)
    thr = torch.tensor(allw[k - 1])
    del allw
    return {n: min(float((w <= thr).float().mean()), 0.999) for n, w in weights.items()}


def uniform_plan(model: nn.Module, sparsity: float, bits: int, layers: list[str] | None = None) -> CompressionPlan:
    """Global-threshold unstructured pruning at `sparsity` + `bits` for every layer."""
    amounts = global_amounts(model, sparsity, layers)
    return CompressionPlan(layers={n: LayerPlan(prune="unstructured" if a > 0 else "none", amount=a, bits=bits)
                                   for n, a in amounts.items()})


def least_that_fits(bytes_at: Callable[[float], int], limit: int, top: float, tol: float) -> float | None:
    """The smallest x in [0, top] (within tol) with bytes_at(x) <= limit; None if even `top` does not
    fit. bytes_at is assumed to decrease with x (more pruning, fewer bytes).

    Each sizing compresses the whole model (a minute for a channel plan of DenseNet-201 on one CPU
    thread), so the bracket is narrowed by the ITP method (Oliveira and Takahashi, 2020) rather
    than by bisection: its probes follow false position, taken in log(bytes) against log(1 - x)
    (the bytes follow a power of what is kept), and it never needs more than one sizing beyond
    bisection's. On simulated byte curves it takes 8.6 sizings on average where bisection takes
    12 (10.7 where the bytes move in coarse steps)."""
    u = lambda x: math.log(max(1.0 - x, 1e-9))  # noqa: E731
    g = lambda x: math.log(max(bytes_at(x), 1)) - math.log(max(limit, 1))  # noqa: E731  (<= 0: fits)
    g_lo = g(0.0)
    if g_lo <= 0:
        return 0.0
    g_hi = g(top)
    if g_hi > 0:
        return None
    lo, hi = 0.0, top
    most = math.ceil(math.log2(top / tol)) + 1  # bisection's count, plus one
    k1 = 0.2 / top
    for j in itertools.count():
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        slack = tol / 2 * 2 ** (most - j) - (hi - lo) / 2  # how far from the middle the probe may go
        guess = 1.0 - math.exp(u(lo) + g_lo * (u(hi) - u(lo)) / (g_lo - g_hi))  # false position; g_lo > 0 >= g_hi
        sign = 1.0 if mid >= guess else -1.0
        shifted = guess + sign * k1 * (hi - lo) ** 2 if k1 * (hi - lo) ** 2 <= abs(mid - guess) else mid
        x = shifted if abs(shifted - mid) <= slack else mid - sign * slack
        gx = g(x)
        lo, g_lo, hi, g_hi = (lo, g_lo, x, gx) if gx <= 0 else (x, gx, hi, g_hi)
    return hi


def fit_uniform(model: nn.Module, bits: int, size_of: SizeFn, limit: int, layers: list[str] | None = None,
                max_sparsity: float = 0.998, tol: float = 0.001) -> tuple[float, CompressionPlan] | None:
    """The smallest global sparsity (within tol) at which the uniform plan fits `limit` bytes."""
    x = least_that_fits(lambda sp: size_of(uniform_plan(model, sp, bits, layers)), limit, max_sparsity, tol)
    return None if x is None else (x, uniform_plan(model, x, bits, layers))


def channel_plan(space_layers: dict, fraction: float, bits: int, weights: dict[str, float] | None = None,
                 small: frozenset[str] = frozenset()) -> CompressionPlan:
    """Channel pruning of every layer whose space allows it by `fraction` (times the layer's weight
    in `weights`, if given; capped at the space's largest amount); the others unpruned; `bits`
    everywhere, but at least EDGE_BITS (as the space allows) in the `small` layers."""
    layers = {}
    for name, c in space_layers.items():
        amount = fraction * (weights or {}).get(name, 1.0)
        b = edge_bits(c, bits) if name in small else bits
        if "channel" in c["prune"].values and amount > 0:
            layers[name] = LayerPlan(prune="channel", amount=_on_grid(c["amount"], amount), bits=b)
        else:
            layers[name] = LayerPlan(prune="none", bits=b)
    return CompressionPlan(layers=layers)


def edge_bits(choices: dict, bits: int) -> int:
    """The fewest bits of at least max(bits, EDGE_BITS) the layer's space offers (else `bits`)."""
    more = [b for b in choices["bits"].values if max(bits, EDGE_BITS) <= b <= 8]
    return min(more) if more else bits


def small_layers(model: nn.Module, layers: list[str], share: float = EDGE_SHARE) -> frozenset[str]:
    """The smallest layers that together hold at most `share` of the weights (LeNet-5: conv1 and
    fc2, 1.3% of them). More bits there cost almost nothing, and they are the most fragile: the
    first sees the raw pixels, the last writes the logits."""
    numel = sorted((layer_numel(model.get_submodule(n)), n) for n in layers)
    total, out, acc = sum(v for v, _ in numel), set(), 0
    for v, n in numel:
        acc += v
        if acc > share * total:
            break
        out.add(n)
    return frozenset(out)


def size_weights(model: nn.Module, layers: list[str], power: float) -> dict[str, float]:
    """(parameters / the largest layer's)^power: big layers lose most channels, small ones few."""
    numel = {n: layer_numel(model.get_submodule(n)) for n in layers}
    top = max(numel.values())
    return {n: (v / top) ** power for n, v in numel.items()}


def fit_channels(space_layers: dict, bits: int, size_of: SizeFn, limit: int, weights: dict[str, float] | None = None,
                 tol: float = 0.01, small: frozenset[str] = frozenset()) -> tuple[float, CompressionPlan] | None:
    """The smallest channel fraction (within tol, on the space's amount grid, at most
    MOST_CHANNELS) whose channel plan fits `limit` bytes; None if the space allows no channel
    pruning or none fits."""
    prunable = [c for c in space_layers.values() if "channel" in c["prune"].values and "amount" in c]
    if not prunable:
        return None
    top = min([MOST_CHANNELS] + [c["amount"].high if c["amount"].low is not None else max(c["amount"].values)
                                 for c in prunable])
    plan = lambda f: channel_plan(space_layers, f, bits, weights, small)  # noqa: E731
    x = least_that_fits(lambda f: size_of(plan(f)), limit, top, tol)
    return None if x is None else (x, plan(x))


def fast_plans(model: nn.Module, space_layers: dict, cost_of: SizeFn, limit: int) -> list[tuple[str, CompressionPlan]]:
    """Under a latency budget: the channel plans (the same fraction everywhere, and by layer size)
    at 8 bits whose `cost_of` (bytes, raised to the budget's share of the latency when that is the
    larger) fits `limit`. Int8 kernels run a 3-bit layer no faster than an 8-bit one, so below 8
    bits a plan loses accuracy and gains no speed; the size-driven plans above all have 3-5 bits."""
    if not all(8 in c["bits"].values for c in space_layers.values()):
        return []
    return [(f"fast-{kind}-8bit-{fraction:.2f}", plan) for kind, fraction, plan in channel_fits(
        model, space_layers, 8, cost_of, limit)]


def channel_fits(model: nn.Module, space_layers: dict, bits: int, size_of: SizeFn, limit: int,
                 small: frozenset[str] = frozenset()) -> list[tuple[str, float, CompressionPlan]]:
    """(kind, fraction, plan) of the channel plans at `bits` that fit `limit`: the size-weighted
    ones at the SIZE_WEIGHTED largest CHANNEL_POWERS that fit (a power that does not fit costs two
    sizings), then the same fraction everywhere (at fraction 0: the dense plan, when that fits)."""
    layers, out, size_of = list(space_layers), [], remembered(size_of)
    for power in CHANNEL_POWERS:
        fit = fit_channels(space_layers, bits, size_of, limit, size_weights(model, layers, power), small=small)
        if fit is not None and fit[0] > 0:
            out.append((f"channels-by-size-p{power:g}", *fit))
            if len(out) == SIZE_WEIGHTED:
                break
    fit = fit_channels(space_layers, bits, size_of, limit, small=small)
    return out + ([("channels", *fit)] if fit is not None else [])


def remembered(size_of: SizeFn) -> SizeFn:
    """`size_of` that sizes each distinct plan once: every power's fit starts by sizing the same
    unpruned plan, and a sizing compresses the whole model (a minute for DenseNet-201 on one CPU
    thread)."""
    seen: dict[str, int] = {}

    def sized(plan: CompressionPlan) -> int:
        key = json.dumps(plan.to_dict(), sort_keys=True)
        if key not in seen:
            seen[key] = size_of(plan)
        return seen[key]
    return sized


def _entropy_bits(n: int, density: float) -> float:
    if density <= 0 or density >= 1:
        return 0.0
    return n * -(density * math.log2(density) + (1 - density) * math.log2(1 - density))


def estimate_layer_bytes(numel: int, out_channels: int, amount: float, bits: int) -> float:
    """Rough packed size of one layer: kept codes + coded mask (near entropy) + fp16 scales."""
    kept = numel * (1 - amount)
    mask = min(_entropy_bits(numel, 1 - amount) * 1.08, numel) if amount > 0 else 0.0
    return (kept * bits + mask) / 8 + 2 * out_channels


def knapsack_plan(model: nn.Module, sens: Sensitivity, budget_bytes: float, amounts: list[float],
                  bits: list[int], layers: list[str] | None = None, bins: int = 400) -> CompressionPlan | None:
    """Per-layer (amount, bits) minimising the summed estimated accuracy drop within `budget_bytes`
    (multiple-choice knapsack by dynamic programming over a discretised byte budget)."""
    names = layers or sens.layers
    unit = budget_bytes / bins
    options: list[list[tuple[int, float, float, int]]] = []
    for n in names:
        w = layer_weight(model.get_submodule(n))
        opts = []
        for a in amounts:
            for b in bits:
                cost = math.ceil(estimate_layer_bytes(w.numel(), w.shape[0], a, b) / unit)
                opts.append((cost, sens.drop(n, a, b), a, b))
        options.append(opts)
    inf = float("inf")
    best = [0.0] + [inf] * bins  # best[c] = least drop using exactly <= c units so far
    choice: list[list[Any]] = []
    for opts in options:
        new = [inf] * (bins + 1)
        pick: list[Any] = [None] * (bins + 1)
        for c in range(bins + 1):
            if best[c] == inf:
                continue
            for i, (cost, drop, _, _) in enumerate(opts):
                nc = c + cost
                if nc <= bins and best[c] + drop < new[nc]:
                    new[nc], pick[nc] = best[c] + drop, (c, i)
        best = new
        choice.append(pick)
    end = min(range(bins + 1), key=lambda c: best[c])
    if best[end] == inf:
        return None
    layers_plan: dict[str, LayerPlan] = {}
    c = end
    for n, opts, pick in reversed(list(zip(names, options, choice))):
        prev, i = pick[c]
        _, _, a, b = opts[i]
        layers_plan[n] = LayerPlan(prune="unstructured" if a > 0 else "none", amount=a, bits=b)
        c = prev
    return CompressionPlan(layers={n: layers_plan[n] for n in names})


def to_params(plan: CompressionPlan, space_layers: dict) -> dict[str, Any] | None:
    """Optuna params for `plan` in the bound space (amounts rounded up to the space's grid), or None
    if the space cannot express it (e.g. no unstructured pruning for some layer)."""
    params: dict[str, Any] = {}
    for name, lp in plan.layers.items():
        c = space_layers.get(name)
        if c is None:
            continue
        pruned = "unstructured" if lp.prune == "none" else lp.prune
        prune = pruned if lp.amount > 0 else ("none" if "none" in c["prune"].values else "unstructured")
        if prune not in c["prune"].values:
            return None
        if not c["prune"].fixed:
            params[f"{name}.prune"] = prune
        if "amount" in c and not c["amount"].fixed:
            params[f"{name}.amount"] = _on_grid(c["amount"], lp.amount)
        if lp.bits not in c["bits"].values:
            return None
        if not c["bits"].fixed:
            params[f"{name}.bits"] = lp.bits
    return params


def snap(plan: CompressionPlan, space_layers: dict) -> CompressionPlan:
    """The plan with every amount moved onto the space's grid (rounded up, capped at its maximum)."""
    out = {}
    for name, lp in plan.layers.items():
        c = space_layers.get(name, {})
        if "amount" in c and lp.amount > 0:
            lp = replace(lp, amount=_on_grid(c["amount"], lp.amount))
        out[name] = lp
    return replace(plan, layers=out)


def _on_grid(choice: Any, value: float) -> float:
    if choice.low is not None:
        if choice.step:
            value = choice.low + math.ceil((value - choice.low) / choice.step - 1e-9) * choice.step
        return round(min(max(value, choice.low), choice.high), 6)
    values = sorted(float(v) for v in choice.values)
    return next((v for v in values if v >= value - 1e-9), values[-1])


def _grid(choice: Any, limit: int = 40) -> list[float]:
    if choice.low is not None:
        step = choice.step or (choice.high - choice.low) / 20
        n = int(round((choice.high - choice.low) / step)) + 1
        values = [round(choice.low + i * step, 6) for i in range(n)]
    else:
        values = sorted(float(v) for v in choice.values)
    if len(values) > limit:  # bytes follow the density kept, so thin the grid evenly in log(density)
        low = math.log(max(1.0 - values[-1], 1e-6))
        picks = {min(values, key=lambda v: abs(math.log(max(1.0 - v, 1e-6)) - low * i / (limit - 1)))
                 for i in range(limit)}
        values = sorted(picks | {values[0], values[-1]})
    return values


def warm_start_plans(model: nn.Module, space_layers: dict, size_of: SizeFn, limit: int,
                     sens: Sensitivity | None, uniform_bits: tuple[int, ...] = (4, 3, 5),
                     channel_bits: tuple[int, ...] = (4, 3)) -> list[tuple[str, CompressionPlan]]:
    """Named plans to try first: the best uniform plans that fit, the channel plans (uniform and
    size-weighted), and the sensitivity knapsack plan."""
    layers = list(space_layers)
    shared_bits = set.intersection(*(set(c["bits"].values) for c in space_layers.values()))
    out: list[tuple[str, CompressionPlan]] = []
    on_grid = lambda p: snap(p, space_layers)  # noqa: E731  (the plan as the space can express it)
    for b in uniform_bits:
        if b not in shared_bits:
            continue
        fit = fit_uniform(model, b, lambda p: size_of(on_grid(p)), limit, layers)
        if fit is not None:
            out.append((f"uniform-{b}bit-{fit[0]:.3f}", on_grid(fit[1])))
    small = small_layers(model, layers)
    ranked = [(rank, b, fit) for b in channel_bits if b in shared_bits
              for rank, fit in enumerate(channel_fits(model, space_layers, b, size_of, limit, small))]
    for _, b, (kind, fraction, plan) in sorted(ranked, key=lambda r: r[0]):  # each width's first plan, then ...
        if fraction > 0:  # the dense plan is the uniform plan at sparsity 0
            out.append((f"{kind}-{b}bit-{fraction:.2f}", plan))
    if sens is not None and all("amount" in c for c in space_layers.values()):
        amounts = sorted(set.intersection(*(set(_grid(c["amount"])) for c in space_layers.values())))
        bits = sorted(b for b in shared_bits if b <= 8)
        if amounts and bits:
            smallest = uniform_plan(model, max(amounts), min(bits), layers)
            estimated = sum(estimate_layer_bytes(layer_numel(model.get_submodule(n)),
                                                 layer_weight(model.get_submodule(n)).shape[0], lp.amount, lp.bits)
                            for n, lp in smallest.layers.items())
            target = limit - max(size_of(smallest) - estimated, 0)
            best = knapsack_fit(lambda t: knapsack_plan(model, sens, t, amounts, bits, layers), size_of, limit, target)
            if best is not None:
                out.append(("knapsack", best))
    return out


def knapsack_fit(plan_for: Callable[[float], CompressionPlan | None], size_of: SizeFn, limit: int, target: float,
                 tries: int = 5, close: float = 0.97) -> CompressionPlan | None:
    """The largest plan_for(target) whose real file fits `limit`, the target corrected by the real
    bytes after each try: down by the excess when it does not fit, up by the slack when it fits
    with more than 1 - `close` of the budget unused (the byte model's error goes both ways:
    DenseNet-201's first knapsack plan at 20x came out at 42x)."""
    best: tuple[int, CompressionPlan] | None = None
    for _ in range(tries):
        plan = plan_for(target)
        if plan is None:
            break
        real = size_of(plan)
        if real <= limit:
            if best is None or real > best[0]:
                best = (real, plan)
            if real >= close * limit:
                break
            target += (limit - real) * 0.95
        else:
            target -= (real - limit) * 1.05
    return None if best is None else best[1]
