"""The Python API: `search()` checks every input before anything is written, then runs the study.

Order matters for "bad input leaves nothing behind": budget, space, data, model, checkpoint and
the budget's floor are all checked before the baseline is trained or any file is created.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from .cost.latency import PLANS
from .errors import UserError
from .plan import Budget, PlanError, format_bytes, parse_budget

DEFAULT_BASELINE_EPOCHS = {"lenet5": 8, "mlp": 8, "resnet18": 15}


def parse_duration(text: str | float | None) -> float | None:
    """'30m', '90s', '1.5h', '45' (seconds) -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return float(text) if text is not None else None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h|min|sec)?\s*", str(text))
    if not m:
        raise UserError(f"cannot parse duration {text!r}: use e.g. 90s, 30m or 1.5h")
    value = float(m.group(1))
    return value * {"h": 3600, "m": 60, "min": 60}.get(m.group(2) or "s", 1)


def default_study_name(model: str, data: str, budget: Budget) -> str:
    base = os.path.basename(model.rstrip("/")).replace(":", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{data}-{budget}".replace(" ", ""))


def space_floor(model: nn.Module, space: Any, spec: Any, example: torch.Tensor) -> int:
    """Bytes of the most compressed plan the space allows: no plan can be smaller than this."""
    from .compression import compress
    from .cost import artifact_size

    return artifact_size(compress(model, space.smallest(), example), spec)


def load_inputs(model: str, data: str | None, weights: str | None, data_dir: str | None, seed: int,
                limit: int | None, val_fraction: float, image_size: int | None = None) -> tuple[Any, Any, nn.Module]:
    """The data bundle (default: Fashion-MNIST, else digits with a notice), the model spec, and the
    model with its checkpoint loaded (untrained otherwise), in eval mode."""
    from .data import default_data, load_data
    from .models import ModelSpec, build_model, load_weights

    if data is None:
        bundle = default_data(seed, image_size=image_size)
        if bundle.notice:
            print(bundle.notice)
    else:
        bundle = load_data(data, data_dir=data_dir, seed=seed, limit=limit, val_fraction=val_fraction,
                           image_size=image_size, model=model)
    spec = ModelSpec(model, bundle.num_classes, bundle.in_channels, bundle.image_size, data=bundle.name)
    net = build_model(spec)
    if weights:
        load_weights(net, weights)
    return spec, bundle, net.eval()


def search(budget: str | Budget, *, model: str = "lenet5", data: str | None = None, weights: str | None = None,
           data_dir: str | None = None, space: str | None = None, out: str = "runs", study: str | None = None,
           storage: str | None = None, tracking_uri: str | None = None, trials: int = 12,
           timeout: str | float | None = None, epochs: int = 1, baseline_epochs: int | None = None,
           lr: float = 0.01, batch_size: int = 128, max_batches: int | None = None, seed: int = 0,
           device: str = "cpu", limit: int | None = None, val_fraction: float = 0.1,
           early_stopping: bool | str = True, repair: bool = True, warm_start: bool = True, final_top: int = 3,
           final_epochs: int = 2, final_distill: float = 0.5, objectives: str = "accuracy", progress: bool = True,
           latency_budget: str | float | None = None, latency_batch_size: int = 1,
           latency_threads: int | None = None, latency_plans: int | None = None,
           register: str | None = None, workers: int = 1, image_size: int | None = None) -> Any:
    """Search compression plans for `model` on `data` under `budget`; returns a SearchOutcome.

    `budget` is a size ('50KB', '1.5MiB') or a ratio of the fp32 parameter bytes ('20x').
    With no `weights`, the baseline is trained once and cached. With `repair`, a proposal over the
    budget is tightened into it (more pruning, then fewer bits); without, it is recorded infeasible.
    With `warm_start`, per-layer sensitivity is measured and the best uniform plans, channel
    plans and a sensitivity-allocated (knapsack) plan are tried first. The `final_top` best plans are then
    fine-tuned for `final_epochs` (distilled from the original with weight at least
    `final_distill`) and the best of those is exported.
    `latency_budget` ('2ms', '500us'): the deployed model's latency on `device` at batch
    `latency_batch_size`, predicted per trial (a predictor fitted on `latency_plans` timed plans, default PLANS,
    cached in OUT/latency/) and measured for the final pick.
    `register` names an MLflow registered model to add the best model to.
    `workers` > 1 runs that many processes on the study (after the baseline is cached, so none of
    them trains it again).
    """
    from .search import run_search

    args = {k: v for k, v in locals().items() if k not in ("workers", "run_search")}
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    settings, ctx = prepare(**args)
    args.update(budget=str(settings.budget), progress=False)
    return run_search(settings, ctx, workers=workers, worker_args=args)


def prepare(budget: str | Budget, *, model: str = "lenet5", data: str | None = None, weights: str | None = None,
            data_dir: str | None = None, space: str | None = None, out: str = "runs", study: str | None = None,
            storage: str | None = None, tracking_uri: str | None = None, trials: int = 12,
            timeout: str | float | None = None, epochs: int = 1, baseline_epochs: int | None = None,
            lr: float = 0.01, batch_size: int = 128, max_batches: int | None = None, seed: int = 0,
            device: str = "cpu", limit: int | None = None, val_fraction: float = 0.1,
            early_stopping: bool | str = True, repair: bool = True, warm_start: bool = True, final_top: int = 3,
            final_epochs: int = 2, final_distill: float = 0.5, objectives: str = "accuracy", progress: bool = True,
            latency_budget: str | float | None = None, latency_batch_size: int = 1,
            latency_threads: int | None = None, latency_plans: int | None = None,
            register: str | None = None, image_size: int | None = None) -> tuple[Any, Any]:
    """Check every input, then load data and the (cached or trained) baseline: (SearchSettings, SearchContext).

    Nothing is written before all checks pass; an unreachable storage is found before any training.
    """
    from .models import param_bytes
    from .search import SearchContext, SearchSettings
    from .space import load_space
    from .train import baseline
    from .workers import check_storage, check_tracking, database_url

    b = budget if isinstance(budget, Budget) else parse_budget(budget)
    objs = tuple(o.strip() for o in objectives.split(",") if o.strip())
    if not objs or objs[0] != "accuracy" or not set(objs) <= {"accuracy", "size", "latency"} \
            or len(set(objs)) != len(objs):
        raise UserError(f"--objectives {objectives!r}: use accuracy, optionally followed by size and/or latency "
                        "(e.g. accuracy,size,latency)")
    from .cost.latency import parse_latency

    latency_ms = parse_latency(latency_budget) if latency_budget is not None else None
    if latency_batch_size < 1:
        raise UserError(f"--latency-batch-size must be at least 1, got {latency_batch_size}")
    seconds = parse_duration(timeout)
    if early_stopping not in (True, False, "median", "hyperband", "none"):
        raise UserError(f"--early-stopping {early_stopping!r}: use median, hyperband or none")
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {epochs}")
    if not 0.0 <= final_distill < 1.0:
        raise UserError(f"--final-distill must be in [0, 1), got {final_distill}")
    storage, tracking_uri = database_url(storage), database_url(tracking_uri)
    check_storage(storage)
    check_tracking(tracking_uri)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    bound_space_src = load_space(space)
    spec, bundle, net = load_inputs(model, data, weights, data_dir, seed, limit, val_fraction, image_size)
    bound = bound_space_src.bind(net)
    example = bundle.train.x[:2]
    original = param_bytes(net)
    cap = b.limit(original)
    try:
        floor = space_floor(net, bound, spec, example)
    except PlanError as e:
        raise UserError(f"the search space does not fit this model: {e}") from None
    if cap < floor:
        raise UserError(f"budget {format_bytes(cap)} ({cap} bytes) is below the smallest artifact this search "
                        f"space can reach: {format_bytes(floor)} ({floor} bytes, {original / floor:.1f}x); "
                        "raise --budget or widen the space")
    predictor = None
    if latency_ms is not None or "latency" in objs:
        from .cost.profile import predictor_for

        predictor, floor = predictor_for(net, model, bound.layers, example, os.path.join(out, "latency"),
                                         device=device, batch_size=latency_batch_size, threads=latency_threads,
                                         plans=latency_plans or PLANS, budget_ms=latency_ms, progress=progress)
        print(f"latency predictor on {device}: fastest plan {floor:.3f} ms; held-out error "
              + (f"{predictor.error:.1%}" if predictor.error is not None else "n/a"))
    base_epochs = baseline_epochs if baseline_epochs is not None else DEFAULT_BASELINE_EPOCHS.get(model, 5)
    net, val_acc = baseline(spec, bundle, epochs=base_epochs, seed=seed, device=device, weights=weights,
                            progress=progress)
    settings = SearchSettings(
        budget=b, out=out, study=study or default_study_name(model, bundle.name, b), storage=storage,
        tracking_uri=tracking_uri, trials=trials, timeout=seconds, epochs=epochs, lr=lr,
        batch_size=batch_size, max_batches=max_batches, seed=seed, device=device,
        early_stopping=early_stopping, repair=repair, warm_start=warm_start, final_top=final_top,
        final_epochs=final_epochs, final_distill=final_distill, objectives=objs, progress=progress,
        latency_budget_ms=latency_ms,
        latency_batch_size=latency_batch_size, latency_threads=latency_threads, register=register)
    bundle.train, bundle.val, bundle.test = (bundle.train.to(device), bundle.val.to(device),
                                             bundle.test.to(device))
    net = net.to(device)
    calib = list(bundle.train.batches(batch_size, shuffle=True, seed=seed, limit=settings.calib_batches))
    ctx = SearchContext(model=net, spec=spec, data=bundle, space=bound, baseline_val_acc=val_acc,
                        original_bytes=original, example_input=bundle.train.x[:2], calib=calib, latency=predictor)
    print(f"baseline {model} on {bundle.name}: val accuracy {val_acc:.4f}, {format_bytes(original)} fp32 params")
    return settings, ctx
