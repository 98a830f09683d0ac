"""Per-layer sensitivity: how much validation accuracy one layer's compression costs, alone.

For every layer, the accuracy drop (no fine-tune) when only that layer is pruned by each amount,
or only its weights are quantised to each bit width; plus a Hutchinson estimate of the trace of
the loss Hessian restricted to the layer's weights (HAWQ's curvature signal). The drops feed
the sensitivity-allocated warm-start plan; the table and heat map go to MLflow.

Cost is layers x settings x validation samples forward passes, so each setting is applied in
place to the one layer's weight (the exact weight compress() would give it, without copying the
model) and measured on a fixed subset of SAMPLES validation images. Settings between the
measured ones are interpolated (Sensitivity.drop). The default grid is sized to a time: one
timed forward pass says what an image costs, and past SECONDS the grid gets coarser, then the
subset smaller (a DenseNet-121 took 333 s on one CPU thread with the coarse grid alone).
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .compression import prune
from .compression.quantize import WeightCompressor
from .data import TensorData
from .models import hash_weights, layer_numel, layer_weight, layer_weights, prunable_layers
from .jsonfile import read_json, write_json
from .memory import trim

AMOUNTS = (0.5, 0.8, 0.9, 0.95, 0.99)
BITS = (2, 3, 4, 6)
# Past MAX_EVALUATIONS layers x settings the default grid is the coarse one, the settings between
# interpolated: mobilenet_v2 (52 layers, 468) keeps all 9 settings, densenet121 (120 layers) or
# efficientnet_b0 (81) take 5 (their sensitivity took 6 min and 2.3 min on one CPU thread).
MAX_EVALUATIONS = 480
COARSE_AMOUNTS = (0.5, 0.9, 0.99)
COARSE_BITS = (2, 4)
MINIMAL_AMOUNTS = (0.9,)
MINIMAL_BITS = (2, 4)
SECONDS = 50.0  # measurement time the default grid aims at (estimated from one timed forward pass); with the
#                Hessian pass (a tenth of it) about a minute, the bound issue 13 set for mobilenet_v2 on 2 CPU cores
MIN_SAMPLES = 16  # the subset never gets smaller than this to fit SECONDS
HESSIAN_PASSES = 30  # forward passes an image costs in the Hutchinson pass (4 samples), for its batch size
CALIBRATION = 8  # settings measured when a model too slow for the minimal grid gets curvature estimates
SAMPLES = 128  # validation images per measurement (one batch): cost is layers x settings x samples; the drops
#               are paired on one fixed subset, so steadier than its size suggests (one image = 1/SAMPLES)
BATCH = 128  # images per forward pass (faster on CPU than one big batch)


@dataclass
class Sensitivity:
    """Accuracy drops per layer and setting (positive = worse), and Hessian traces per layer."""

    baseline_accuracy: float
    prune_drop: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> amount -> drop
    bits_drop: dict[str, dict[str, float]] = field(default_factory=dict)   # layer -> bits -> drop
    hessian_trace: dict[str, float] = field(default_factory=dict)          # layer -> trace / numel
    numel: dict[str, int] = field(default_factory=dict)
    samples: int = 0  # validation images each drop was measured on
    estimated: int = 0  # settings estimated from the curvature, not measured (curvature_drops)

    def describe(self) -> str:
        """'5 settings x 120 layers on 64 images': what was measured, for the search's log."""
        first = self.layers[0] if self.layers else None
        settings = len(self.prune_drop[first]) + len(self.bits_drop.get(first, {})) if first else 0
        text = f"{settings} settings x {len(self.layers)} layers on {self.samples} images"
        return text + (f", {self.estimated} of them estimated from the curvature" if self.estimated else "")

    @property
    def layers(self) -> list[str]:
        return list(self.prune_drop)

    def score(self, layer: str) -> float:
        """One number per layer: mean accuracy drop over all tested settings."""
        drops = list(self.prune_drop[layer].values()) + list(self.bits_drop[layer].values())
        return sum(drops) / max(len(drops), 1)

    def ranking(self) -> list[str]:
        """Layers, most fragile first."""
        return sorted(self.layers, key=self.score, reverse=True)

    def drop(self, layer: str, amount: float, bits: int) -> float:
        """Estimated drop of a layer pruned by `amount` at `bits` (interpolated, additive)."""
        return _interp(self.prune_drop[layer], amount, 0.0) + _interp(self.bits_drop[layer], bits, 32)

    def table(self) -> dict[str, dict[str, float]]:
        """layer -> {'prune 0.9': drop, 'bits 4': drop, ...} for reports and heat maps."""
        return {n: {**{f"prune {k}": v for k, v in self.prune_drop[n].items()},
                    **{f"{k} bit": v for k, v in self.bits_drop[n].items()}} for n in self.layers}

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str) -> Sensitivity:
        return cls(**read_json(path))


def _interp(points: dict[str, float], x: float, zero_at: float) -> float:
    """Piecewise-linear drop at x from measured points; no drop at `zero_at` (dense / fp32)."""
    xs = sorted([(float(k), v) for k, v in points.items()] + [(zero_at, 0.0)])
    if x <= xs[0][0]:
        return xs[0][1]
    for (x0, y0), (x1, y1) in zip(xs, xs[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return xs[-1][1]


# Activations whose backward has no derivative in torch ("derivative for aten::hardsigmoid_backward
# is not implemented"), with the same function written in ops that have one (MobileNetV3 uses both).
_TWICE_DIFFERENTIABLE: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Hardsigmoid: lambda x: torch.clamp(x + 3, 0, 6) / 6,
    nn.Hardswish: lambda x: x * torch.clamp(x + 3, 0, 6) / 6,
}


@contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its Hardsigmoid/Hardswish modules computed by double-differentiable ops, for
    Hessian-vector products; the modules' own forward is back on exit. Attention runs on the math
    kernel of scaled_dot_product_attention: the fused CPU kernel's backward has no derivative
    (ViT's trace died on "_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    swapped = []
    for mod in model.modules():
        fn = _TWICE_DIFFERENTIABLE.get(type(mod))
        if fn is not None:
            mod.forward = fn
            swapped.append(mod)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield model
    finally:
        for mod in swapped:
            del mod.forward


def hutchinson_trace(model: nn.Module, layers: list[str], data: TensorData, samples: int = 8,
                     batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Per-layer trace of the loss Hessian, divided by the layer's weight count (E[v'Hv], Rademacher v)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.eval()
    params = [layer_weight(model.get_submodule(n)) for n in layers]
    x, y = data.x[:batch_size], data.y[:batch_size]
    totals = [0.0] * len(params)
    with twice_differentiable(model):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # Layers the eval-mode forward does not use (GoogLeNet's and Inception-v3's auxiliary
        # classifiers) have no gradient, and a gradient that does not depend on the weights no
        # curvature: their trace is 0.
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for _ in range(samples):
            vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
            if not used:
                continue
            hvs = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                      grad_outputs=[vs[i] for i in used], retain_graph=True, allow_unused=True)
            for i, hv in zip(used, hvs):
                if hv is not None:
                    totals[i] += float((hv * vs[i]).sum()) / samples
    return {n: t / p.numel() for n, t, p in zip(layers, totals, params)}


def compressed_weight(weight: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """The weight compress() gives a layer planned alone with one setting: magnitude-pruned by
    `value` (kind "prune", float32 kept weights) or quantised to `value` bits (kind "bits",
    symmetric per output channel, clipping searched)."""
    w = weight.detach()
    if kind == "prune":
        return w * prune.unstructured_mask(w.abs(), value).to(w)
    comp = WeightCompressor(None, int(value), True)
    comp.choose_clip(w)
    return comp.values(w)


def _accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of an eval-mode model over fixed batches (inference mode: no autograd state)."""
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def default_grid(n_layers: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """(amounts, bits) measured when the caller names none: AMOUNTS x BITS, or the coarse grid for
    a model whose layers x settings would pass MAX_EVALUATIONS."""
    if n_layers * (len(AMOUNTS) + len(BITS)) <= MAX_EVALUATIONS:
        return AMOUNTS, BITS
    return COARSE_AMOUNTS, COARSE_BITS


def timed_grid(n_layers: int, per_image: float, samples: int, seconds: float
               ) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """(amounts, bits, samples) of the default grid whose measurement (layers x settings x samples
    images at `per_image` seconds each) fits `seconds`: the full grid (unless past
    MAX_EVALUATIONS), else the coarse one, else the minimal one on fewer samples (not under
    MIN_SAMPLES, so a very slow model takes longer than `seconds` rather than measure noise)."""
    first = default_grid(n_layers)
    grids = [g for g in ((AMOUNTS, BITS), (COARSE_AMOUNTS, COARSE_BITS), (MINIMAL_AMOUNTS, MINIMAL_BITS))
             if len(g[0]) + len(g[1]) <= len(first[0]) + len(first[1])]
    for a, b in grids:
        if n_layers * (len(a) + len(b)) * samples * per_image <= seconds:
            return a, b, samples
    a, b = grids[-1]
    fit = int(seconds / max(n_layers * (len(a) + len(b)) * per_image, 1e-12))
    return a, b, max(min(samples, fit), min(MIN_SAMPLES, samples))


def is_timed(amounts: tuple[float, ...] | None, bits: tuple[int, ...] | None, seconds: float | None) -> bool:
    """Whether the grid is sized to `seconds` (timed_grid): no settings named, and a time given."""
    return not amounts and not bits and seconds is not None


def hessian_batch(per_image: float, seconds: float) -> int:
    """Images in the Hutchinson pass: its cost (a forward, a backward keeping its graph and one
    Hessian-vector product per sample) is about HESSIAN_PASSES forward passes an image, and it gets
    a tenth of `seconds`; 2 to 64 images. ResNet-50 at 224 x 224 took 190 s and 6 GB on 16 images."""
    return int(min(max(seconds / 10 / (HESSIAN_PASSES * per_image), 2), 64))


def _seconds_per_image(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds one image of `x` takes through the eval-mode model: the second of two passes, the
    first one warming up."""
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        model(x)
    return (time.perf_counter() - t0) / len(x)


def analyse(model: nn.Module, val: TensorData, example: torch.Tensor, *, amounts: tuple[float, ...] | None = None,
            bits: tuple[int, ...] | None = None, samples: int = SAMPLES, seconds: float | None = SECONDS,
            device: str = "cpu", hessian_samples: int = 4, progress: bool = False) -> Sensitivity:
    """Measure every layer's sensitivity on (a subset of) the validation split.

    With neither `amounts` nor `bits` named and `seconds` set, the grid (and, past the minimal
    grid, the subset) is sized by timed_grid so that the measurement takes about `seconds`. A
    model too slow even for the minimal grid on MIN_SAMPLES images (a ViT at 224 x 224 on one CPU
    thread) gets its drops from the curvature instead (curvature_drops): CALIBRATION settings
    measured, the others estimated. Each setting replaces one layer's weight in place for one
    evaluation and restores it after, so the model comes back unchanged (also on an error).
    `example` is unused (kept for callers)."""
    layers = prunable_layers(model)
    training = model.training
    model = model.to(device).eval()
    grid = default_grid(len(layers))
    samples = min(samples, len(val))
    estimate = per_image = None
    if is_timed(amounts, bits, seconds) and layers:
        per_image = _seconds_per_image(model, val.x[:MIN_SAMPLES].to(device))
        grid = timed_grid(len(layers), per_image, samples, seconds)
        samples = grid[2]
        estimate = len(layers) * (len(grid[0]) + len(grid[1])) * samples * per_image
    amounts, bits = amounts or grid[0], bits or grid[1]
    sub = val.subset(samples, seed=0).to(device)
    batches = list(sub.batches(BATCH, shuffle=False))
    base = _accuracy(model, batches)
    result = Sensitivity(baseline_accuracy=base, samples=len(sub),
                         numel={n: layer_numel(model.get_submodule(n)) for n in layers})
    with torch.enable_grad():
        batch = hessian_batch(per_image, seconds) if per_image is not None and seconds is not None else 64
        result.hessian_trace = hutchinson_trace(model, layers, sub, samples=hessian_samples, batch_size=batch)
    trim()  # the double-backward graph is freed, but glibc keeps its pages: 4.5 GB after ResNet-50 at 224
    jobs = [(n, "prune", a) for n in layers for a in amounts] + [(n, "bits", b) for n in layers for b in bits]
    if estimate is not None and seconds is not None and estimate > 2 * seconds:
        drops = curvature_drops(model, jobs, result.hessian_trace, lambda *job: base - _measured(model, batches, *job))
        result.estimated = max(len(jobs) - CALIBRATION, 0)
    else:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="sensitivity", unit="setting")
        drops = {}
        for job in jobs:
            drops[job] = base - _measured(model, batches, *job)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
    for (name, kind, value), drop in drops.items():
        table = result.prune_drop if kind == "prune" else result.bits_drop
        table.setdefault(name, {})[str(value)] = drop
    model.train(training)
    return result


def _measured(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], name: str, kind: str,
              value: float) -> float:
    """Accuracy with only layer `name` compressed by one setting (in place, restored after)."""
    weights = [w for _, w in layer_weights(model.get_submodule(name))]
    with torch.no_grad():
        saved = [w.detach().clone() for w in weights]
        try:
            for w, s in zip(weights, saved):
                w.copy_(compressed_weight(s, kind, value))
            return _accuracy(model, batches)
        finally:
            for w, s in zip(weights, saved):
                w.copy_(s)


def curvature_drops(model: nn.Module, jobs: list[tuple[str, str, float]], trace: dict[str, float],
                    measure: Callable[..., float]) -> dict[tuple[str, str, float], float]:
    """Accuracy drops from one gradient pass instead of one evaluation per setting.

    A setting's loss increase is estimated as HAWQ does: half the layer's mean Hessian diagonal
    (its Hutchinson trace / weights) times the squared size of the change the setting makes to the
    weights. The CALIBRATION settings with the largest estimates are measured (`measure(name, kind,
    value)` gives the drop), and a least-squares factor through zero turns the other estimates into
    accuracy points. The warm start's knapsack depends only on their order and ratios."""
    loss = {}
    for name, kind, value in jobs:
        change = sum(float((w.detach() - compressed_weight(w, kind, value)).pow(2).sum())
                     for _, w in layer_weights(model.get_submodule(name)))
        loss[(name, kind, value)] = 0.5 * max(trace.get(name, 0.0), 0.0) * change
    picked = sorted(jobs, key=lambda j: loss[j], reverse=True)[:CALIBRATION]
    measured = {j: measure(*j) for j in picked}
    scale = sum(measured[j] * loss[j] for j in picked) / max(sum(loss[j] ** 2 for j in picked), 1e-30)
    return {j: measured[j] if j in measured else max(scale, 0.0) * loss[j] for j in jobs}


def model_key(model: nn.Module, data: TensorData, settings: dict | None = None) -> str:
    """A short hash of the weights, the validation split and the analysis settings (amounts, bits,
    samples): what a sensitivity result depends on."""
    h = hashlib.sha1(repr(sorted((settings or {}).items())).encode())
    hash_weights(h, model)
    h.update(data.y.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_analyse(model: nn.Module, val: TensorData, example: torch.Tensor, cache_dir: str, *,
                   device: str = "cpu", progress: bool = False, **kwargs) -> tuple[Sensitivity, str, bool]:
    """analyse() once per (weights, validation split, settings asked); returns (result, json path,
    was cached). A timed default grid is keyed by its time, not by the grid it came to."""
    settings: dict[str, Any] = {"samples": min(kwargs.get("samples", SAMPLES), len(val))}
    if is_timed(kwargs.get("amounts"), kwargs.get("bits"), kwargs.get("seconds", SECONDS)):
        settings.update(amounts="timed", bits="timed", seconds=kwargs.get("seconds", SECONDS))
    else:
        grid = default_grid(len(prunable_layers(model)))
        settings.update(amounts=tuple(kwargs.get("amounts") or grid[0]), bits=tuple(kwargs.get("bits") or grid[1]))
    path = os.path.join(cache_dir, f"{model_key(model, val, settings)}.json")
    if os.path.exists(path):
        return Sensitivity.load(path), path, True
    result = analyse(model, val, example, device=device, progress=progress, **kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    result.save(path)
    return result, path, False


def format_table(sens: Sensitivity) -> str:
    """Accuracy drop (points) per layer and setting, with the Hessian trace; most fragile first."""
    cols = list(next(iter(sens.table().values())).keys()) if sens.layers else []
    head = f"{'layer':24s}" + "".join(f"{c:>11s}" for c in cols) + f"{'tr(H)/n':>11s}"
    lines = [head, "-" * len(head)]
    table = sens.table()
    for n in sens.ranking():
        lines.append(f"{n:24s}" + "".join(f"{table[n][c] * 100:11.2f}" for c in cols)
                     + f"{sens.hessian_trace.get(n, float('nan')):11.2e}")
    return "\n".join(lines)
