"""Latency on the target: timed for real (median of repeated runs) and predicted per plan.

Timing: warm-up runs, then `repeats` timed runs of one batch with the thread count fixed (and
restored afterwards), `torch.cuda.synchronize` around each run on a GPU; the median is the
number, the raw timings come along. Prediction: the deployed model is described by per-layer
features (type, channels kept, kernel, spatial size, int8 or float, sparsity); a non-negative
linear regression over their sums, fitted from timed random plans on the target, predicts a
plan's latency from its compressed model, so most trials need no timing run.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import device_of, layer_weight, prunable_layers
from ..jsonfile import read_json, write_json

# Timed plans a predictor is fitted on. On this project's 2-core VM (ResNet-18, 110 plans timed
# once, resampled): 24 plans gave a 6.9% median error on 12 held-out plans (over 10% in 16% of
# draws), 48 plans 5.9% (over 10% in 5%). A plan takes 1-2 s to compress, deploy and time.
PLANS = 48

FEATURES = ("macs_conv_int8", "macs_conv_float", "macs_linear_int8", "macs_linear_float",
            "acts_int8", "acts_float", "layers_int8", "layers_float", "boundaries", "sparse_macs")


@dataclass
class LatencyResult:
    """Median and 90th percentile (ms) of `timings_ms`, measured with `threads` on `device`.

    `scale`: when timed beside a yardstick (cost.profile.Yardstick), the yardstick's base latency
    over its latency then; `scaled_ms` = median_ms * scale is the median brought back to the
    machine state of the base (what the latency predictor learns). 1.0 when not normalised."""

    median_ms: float
    p90_ms: float
    timings_ms: list[float]
    threads: int
    device: str
    batch_size: int = 1
    scale: float = 1.0

    @property
    def scaled_ms(self) -> float:
        return self.median_ms * self.scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, example_input: torch.Tensor, *, device: str = "cpu", batch_size: int = 1,
                    warmup: int = 10, repeats: int = 50, threads: int | None = None,
                    flush_denormal: bool = True) -> LatencyResult:
    """Time `model` on one batch of `batch_size` copies of `example_input[0]` on `device`.

    `flush_denormal`: CPU denormals flushed to zero while timing, as deployments do (a trained
    fp32 net can otherwise run 100x slower on denormal activations, which would flatter int8)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    x = example_input[:1].expand(batch_size, *example_input.shape[1:]).contiguous().to(device)
    old = torch.get_num_threads()
    used = threads or old
    torch.set_num_threads(used)
    ftz = flush_denormal and torch.set_flush_denormal(True)
    timings: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            _sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                _sync(device)
                timings.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(old)
        if ftz:
            torch.set_flush_denormal(False)
    ordered = sorted(timings)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return LatencyResult(statistics.median(timings), p90, timings, used, str(device), batch_size)


def parse_latency(text: str | float) -> float:
    """'2ms', '500us', '0.01s', '3' (ms) -> milliseconds."""
    import re

    from ..errors import UserError

    if isinstance(text, (int, float)):
        value, unit = float(text), "ms"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ms|us|µs|s)?\s*", str(text))
        if not m:
            raise UserError(f"cannot parse latency budget {text!r}: use e.g. 2ms, 500us or 0.01s")
        value, unit = float(m.group(1)), m.group(2) or "ms"
    ms = value * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit]
    if ms <= 0:
        raise UserError(f"latency budget must be positive, got {text!r}")
    return ms


# ---- features of the deployed model --------------------------------------------------------

def layer_features(model: nn.Module, int8: set[str], example_input: torch.Tensor,
                   sparsity: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per Linear/Conv2d of a (channel-pruned, float) model: shapes as deployed."""
    names = prunable_layers(model)
    mods = {n: model.get_submodule(n) for n in names}
    spatial: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: spatial.__setitem__(
                n, tuple((out[0] if isinstance(out, tuple) else out).shape[2:])))
             for n, m in mods.items()]
    try:
        with torch.no_grad():
            model.eval()(example_input[:1].to(device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n, m in mods.items():
        w = layer_weight(m)
        out_hw = spatial.get(n, ())
        pixels = int(torch.tensor(out_hw).prod()) if out_hw else 1
        fan_in = int(w[0].numel())
        rows.append({"name": n, "type": "conv" if isinstance(m, nn.Conv2d) else "linear",
                     "out": int(w.shape[0]), "in": int(w.shape[1]),
                     "kernel": list(getattr(m, "kernel_size", (1, 1))), "spatial": list(out_hw),
                     "int8": n in int8, "sparsity": float((sparsity or {}).get(n, 0.0)),
                     "macs": int(w.shape[0]) * fan_in * pixels, "acts": int(w.shape[0]) * pixels})
    return rows


def plan_vector(rows: list[dict[str, Any]]) -> list[float]:
    """Sum the per-layer rows into the regression's features (order: FEATURES)."""
    v = dict.fromkeys(FEATURES, 0.0)
    prev = None
    for r in rows:
        kind = "int8" if r["int8"] else "float"
        v[f"macs_{r['type']}_{kind}"] += r["macs"] / 1e6
        v[f"acts_{kind}"] += r["acts"] / 1e3
        v[f"layers_{kind}"] += 1
        v["sparse_macs"] += r["macs"] * r["sparsity"] / 1e6
        if prev is not None and prev != r["int8"]:
            v["boundaries"] += 1
        prev = r["int8"]
    return [v[k] for k in FEATURES]


# ---- the predictor -------------------------------------------------------------------------

@dataclass
class LatencyPredictor:
    """latency_ms ~ intercept + coef . plan_vector(rows), fitted on timed plans of one model/device."""

    coef: list[float]
    intercept: float
    key: dict[str, Any] = field(default_factory=dict)
    error: float | None = None  # median absolute relative error on held-out plans
    samples: list[dict[str, Any]] = field(default_factory=list)
    backend: str = "auto"  # the quantized engine the timed plans were deployed with
    reference_ms: float | None = None  # the yardstick's base latency the samples are scaled to

    def predict_rows(self, rows: list[dict[str, Any]]) -> float:
        v = plan_vector(rows)
        return max(self.intercept + sum(c * x for c, x in zip(self.coef, v)), 1e-6)

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str) -> LatencyPredictor:
        return cls(**read_json(path))


def fit_predictor(samples: list[tuple[list[dict[str, Any]], float]], key: dict[str, Any] | None = None,
                  holdout: float = 0.3, seed: int = 0) -> LatencyPredictor:
    """Fit on (rows, measured ms) pairs; the error is measured on a held-out part, then all are used.

    Weighted by 1/ms^2, the fit minimises relative error (the reported measure) and a timing spike
    from a busy machine cannot drag the small plans' predictions.
    """
    import numpy as np
    from sklearn.linear_model import LinearRegression

    X = np.array([plan_vector(r) for r, _ in samples])
    y = np.array([ms for _, ms in samples])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = max(1, int(round(holdout * len(y)))) if len(y) >= 4 else 0
    test, train = order[:n_test], order[n_test:]
    error = None
    if n_test:
        reg = LinearRegression(positive=True).fit(X[train], y[train], sample_weight=1 / y[train] ** 2)
        pred = np.maximum(reg.predict(X[test]), 1e-6)
        error = float(np.median(np.abs(pred - y[test]) / y[test]))
    reg = LinearRegression(positive=True).fit(X, y, sample_weight=1 / y ** 2)
    return LatencyPredictor([float(c) for c in reg.coef_], float(reg.intercept_), dict(key or {}), error,
                            [{"vector": list(map(float, X[i])), "ms": float(y[i]), "held_out": bool(i in set(test))}
                             for i in range(len(y))])


def held_out_error(predictor: LatencyPredictor, samples: list[tuple[list[dict[str, Any]], float]]) -> float:
    """Median absolute relative error of the predictor on plans it was not fitted on."""
    errs = sorted(abs(predictor.predict_rows(r) - ms) / ms for r, ms in samples)
    return float(statistics.median(errs))


def cache_path(folder: str, key: dict[str, Any]) -> str:
    """One predictor file per (model, device, batch, threads, backend) under `folder`."""
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{key.get('model', 'model')}-{key.get('device', 'cpu')}-{digest}.json")
