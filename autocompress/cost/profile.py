"""Latency profiling of a model on the target: time random plans, fit the predictor, cache it.

Only what changes the deployed model's speed is sampled: channels kept per layer and int8 vs
float weights (unstructured / N:M / block sparsity does not make dense CPU kernels faster; it is
a feature the regression may give no weight). Untrained weights time the same as trained ones,
so this runs before the baseline is trained.
"""
from __future__ import annotations

import copy
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..models import device_of
from ..plan import CompressionPlan, LayerPlan
from .latency import (PLANS, LatencyPredictor, LatencyResult, cache_path, fit_predictor, layer_features,
                      measure_latency)


def _choices(space_layers: dict, name: str) -> tuple[float, list[int], bool]:
    """(max channel amount, bit choices, channel pruning allowed) of one layer of a bound space."""
    c = space_layers.get(name, {})
    channel = "prune" in c and "channel" in c["prune"].values and "amount" in c
    amax = float(c["amount"].extreme(largest=True)) if channel else 0.0
    bits = sorted(int(b) for b in c["bits"].values) if "bits" in c else [32]
    return min(amax, 0.9), bits, channel


def fastest_plan(space_layers: dict) -> CompressionPlan:
    """The plan the space allows that deploys fastest: most channels removed, int8 where possible."""
    layers = {}
    for name in space_layers:
        amax, bits, channel = _choices(space_layers, name)
        int8 = [b for b in bits if b <= 8]
        layers[name] = LayerPlan(prune="channel" if channel and amax > 0 else "none",
                                 amount=amax if channel else 0.0, bits=max(int8) if int8 else min(bits))
    return CompressionPlan(layers=layers)


def random_plan(space_layers: dict, rng: random.Random) -> CompressionPlan:
    """A random plan over what matters for speed: channel amount and int8-or-float per layer."""
    layers = {}
    share = rng.random()  # plan-wide pruning level, so whole-model latencies spread widely
    int8_share = rng.choice((0.0, 0.5, 1.0, 1.0))
    for name in space_layers:
        amax, bits, channel = _choices(space_layers, name)
        amount = round(min(amax, max(0.0, rng.gauss(share * amax, 0.1))), 2) if channel else 0.0
        int8 = [b for b in bits if b <= 8]
        floats = [b for b in bits if b > 8] or [32]
        b = rng.choice(int8) if int8 and rng.random() < int8_share else rng.choice(floats)
        layers[name] = LayerPlan(prune="channel" if amount > 0 else "none", amount=amount, bits=b)
    return CompressionPlan(layers=layers)


def on_device(model: nn.Module, device: str = "cpu") -> nn.Module:
    """`model` if it is on `device`, else a copy there: plans are compressed where the model will run
    (the clipping search and the pruning ranks are 10x faster on a GPU) without moving the caller's
    model."""
    have, target = device_of(model), torch.device(device)
    if have.type == target.type and (target.index is None or have.index == target.index):
        return model
    return copy.deepcopy(model).to(device)


def plan_rows(compressed: nn.Module, example_input: torch.Tensor, device: str = "cpu") -> list[dict[str, Any]]:
    """Per-layer features of a compressed model as deployed on `device`: on the CPU, layers of <= 8
    bits run int8 kernels; on a GPU every layer runs in half precision, whatever its bits."""
    from ..compression import RECORD_ATTR

    rec = getattr(compressed, RECORD_ATTR)
    plan = rec["plan"]["layers"]
    int8 = {m for m, p in rec["targets"].items() if plan[p]["bits"] <= 8} if device == "cpu" else set()
    sparsity = {m: LayerPlan(**plan[p]).sparsity for m, p in rec["targets"].items()
                if plan[p]["prune"] in ("unstructured", "nm", "block")}
    return layer_features(compressed, int8, example_input.cpu(), sparsity)


def deploy_plan(model: nn.Module, plan: CompressionPlan, example_input: torch.Tensor, *, device: str = "cpu",
                batch_size: int = 1, threads: int | None = None, backend: str = "auto",
                calib: Any = None) -> tuple[nn.Module, nn.Module]:
    """(compressed, deployed) of `model` under `plan` on `device`: what every timed plan goes through."""
    from ..compression import compress
    from ..deploy import deployable

    compressed = compress(on_device(model, device), replace(plan, distill=0.0), example_input.to(device))
    deployed = deployable(compressed, device=device, calib=calib, batch_size=batch_size, threads=threads,
                          backend=backend)
    return compressed, deployed


class Yardstick:
    """A fixed deployed model (the space's unpruned plan with 8-bit weights) timed beside each
    profiled plan, to take the machine's slow spells out of the predictor's samples.

    On a shared machine another tenant's load can slow every model down for tens of seconds (2x
    for a ResNet-18 on this project's 2-core VM, seen as one plan timing 1.2 ms, then 2.5 ms three
    times in a row a minute later). A plan's median is multiplied by base_ms / (the yardstick's
    median timed right after it), so all samples are in the machine state of `base_ms`: measured
    at creation (lowest of 3 medians), or given, to score held-out plans on the same scale."""

    def __init__(self, model: nn.Module, space_layers: dict, example_input: torch.Tensor, *, device: str = "cpu",
                 batch_size: int = 1, threads: int | None = None, backend: str = "auto",
                 base_ms: float | None = None, repeats: int = 20) -> None:
        plan = CompressionPlan(layers={n: LayerPlan(bits=8) for n in space_layers})
        _, self.deployed = deploy_plan(model, plan, example_input, device=device, batch_size=batch_size,
                                       threads=threads, backend=backend)
        self.backend = getattr(self.deployed, "backend", "auto") if device == "cpu" else "auto"
        self._x, self._kw = example_input.cpu(), dict(device=device, batch_size=batch_size, threads=threads,
                                                       warmup=3, repeats=repeats)
        self.base_ms = base_ms if base_ms is not None else min(self.time() for _ in range(3))

    def time(self) -> float:
        """The yardstick's median latency now (ms)."""
        return measure_latency(self.deployed, self._x, **self._kw).median_ms

    def scale(self) -> float:
        """base_ms over the yardstick's latency now: > 1 in a fast spell, < 1 in a slow one."""
        return self.base_ms / self.time()


def time_plan(model: nn.Module, plan: CompressionPlan, example_input: torch.Tensor, *, device: str = "cpu",
              batch_size: int = 1, threads: int | None = None, repeats: int = 30,
              calib: Any = None, backend: str = "auto", rounds: int = 3,
              yardstick: Yardstick | None = None) -> tuple[list[dict[str, Any]], LatencyResult]:
    """Compress `model` by `plan`, deploy it (with `backend`'s int8 engine), time it: (feature rows,
    measured latency). The round with the lowest median (scaled by `yardstick` when given, timed
    after each round; the result's `scale`): on a shared machine one round can land in a slow
    spell, which would teach the predictor noise."""
    compressed, deployed = deploy_plan(model, plan, example_input, device=device, batch_size=batch_size,
                                       threads=threads, backend=backend, calib=calib)
    rows = plan_rows(compressed, example_input, device)
    timed = []
    for _ in range(max(rounds, 1)):
        res = measure_latency(deployed, example_input.cpu(), device=device, batch_size=batch_size,
                              threads=threads, warmup=5, repeats=repeats)
        timed.append(replace(res, scale=yardstick.scale()) if yardstick is not None else res)
    return rows, min(timed, key=lambda r: r.scaled_ms)


def profile(model: nn.Module, space_layers: dict, example_input: torch.Tensor, *, plans: int = PLANS,
            device: str = "cpu", batch_size: int = 1, threads: int | None = None, repeats: int = 30,
            seed: int = 0, progress: bool = True) -> LatencyPredictor:
    """Time `plans` random plans (plus the original and the fastest plan) and fit the predictor.
    All are deployed with one engine, the one deployable("auto") picks for the 8-bit unpruned
    model (so the fit sees one set of kernels, not a mix), recorded as the predictor's `backend`;
    each is timed beside that model as a Yardstick and brought to its median latency over the
    profile, which is `reference_ms`."""
    stick = Yardstick(model, space_layers, example_input, device=device, batch_size=batch_size, threads=threads)
    backend = stick.backend
    rng = random.Random(seed)
    todo = [fastest_plan(space_layers), CompressionPlan(layers={n: LayerPlan() for n in space_layers})]
    todo += [random_plan(space_layers, rng) for _ in range(max(plans - 2, 2))]
    timed = []
    start = time.perf_counter()
    for i, plan in enumerate(todo):
        timed.append(time_plan(model, plan, example_input, device=device, batch_size=batch_size,
                               threads=threads, repeats=repeats, backend=backend, yardstick=stick))
        if progress:
            print(f"\rlatency profile: {i + 1}/{len(todo)} plans timed ({time.perf_counter() - start:.0f}s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    # The yardstick's base, measured once at the start, may have caught a slow spell (another job
    # ending just then); its typical latency over the whole profile is the steadier reference.
    base = statistics.median(stick.base_ms / res.scale for _, res in timed)
    samples = [(rows, res.scaled_ms * base / stick.base_ms) for rows, res in timed]
    pred = fit_predictor(samples, seed=seed)
    pred.backend, pred.reference_ms = backend, base
    return pred


def latency_key(model_name: str, space_layers: dict, example_input: torch.Tensor, device: str, batch_size: int,
                threads: int, plans: int) -> dict[str, Any]:
    """What a cached predictor depends on: model, input, target, threads, engine, space, torch."""
    return {"model": model_name, "device": device, "batch_size": batch_size, "threads": threads,
            "input": list(example_input.shape[1:]), "torch": torch.__version__, "plans": plans,
            "engine": "auto (fastest of x86, fbgemm)" if device == "cpu" else "fp16, int8 not a feature",
            "layers": {n: [_choices(space_layers, n)[0], _choices(space_layers, n)[1]] for n in space_layers}}


def predictor_for(model: nn.Module, model_name: str, space_layers: dict, example_input: torch.Tensor, folder: str,
                  *, device: str = "cpu", batch_size: int = 1, threads: int | None = None, plans: int = PLANS,
                  budget_ms: float | None = None, progress: bool = True) -> tuple[LatencyPredictor, float]:
    """The latency predictor of this model / space / target (cached in `folder`) and the floor: the
    latency of the space's fastest plan. A `budget_ms` below the floor raises UserError before
    anything is written: first against the fastest plan timed now, then against its prediction."""
    from ..errors import UserError

    threads = threads or torch.get_num_threads()
    compressed, deployed = deploy_plan(model, fastest_plan(space_layers), example_input, device=device,
                                       batch_size=batch_size, threads=threads)
    fast_rows = plan_rows(compressed, example_input, device)
    # a refusal must not come from one stall of a busy machine: the lowest of three medians
    fast = min((measure_latency(deployed, example_input.cpu(), device=device, batch_size=batch_size,
                                threads=threads, warmup=5, repeats=20) for _ in range(3)), key=lambda r: r.median_ms)
    where = f"on {device} (batch {batch_size}, {threads} threads)"

    def check(floor: float, how: str) -> None:
        if budget_ms is not None and budget_ms < floor:
            raise UserError(f"latency budget {budget_ms:g} ms is below the fastest plan this search space allows "
                            f"{where}: {floor:.4g} ms {how}; raise --latency-budget or widen the space")

    check(fast.median_ms, "measured")
    key = latency_key(model_name, space_layers, example_input, device, batch_size, threads, plans)
    path = cache_path(folder, key)
    pred = None
    if os.path.isfile(path):
        try:
            pred = LatencyPredictor.load(path)
            pred = pred if pred.key == key else None
        except (OSError, ValueError, TypeError):
            pred = None
    fresh = pred is None
    if pred is None:
        pred = profile(model, space_layers, example_input, plans=plans, device=device, batch_size=batch_size,
                       threads=threads, progress=progress)
        pred.key = key
    floor = min(fast.median_ms, pred.predict_rows(fast_rows))
    check(floor, "predicted")
    if fresh:
        pred.save(path)
    return pred, floor
