"""The Python API: `search()` checks every input before anything is written, then runs the study.

Order matters for "bad input leaves nothing behind": options, budget, space, data, model,
checkpoint and the budget's floor are all checked before the baseline is trained or any file is
created. The options themselves are declared once, in settings.SearchSettings.
"""
from __future__ import annotations

import math
import os
import re
import time

import torch
from torch import nn

from .context import SearchContext, SearchOutcome
from .cost.latency import PLANS
from .data import DataBundle
from .errors import UserError
from .models import ModelSpec
from .plan import Budget, PlanError, format_bytes
from .settings import SearchSettings, options_doc
from .space import BoundSpace


SEEN_CHECK_SAMPLES = 2000  # test samples that check whether a checkpoint has seen the validation split


def default_study_name(model: str, data: str, budget: Budget) -> str:
    base = os.path.basename(model.rstrip("/")).replace(":", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{data}-{budget}".replace(" ", ""))


def space_floor(model: nn.Module, space: BoundSpace, spec: ModelSpec, example: torch.Tensor) -> int:
    """Bytes of the most compressed plan the space allows: no plan can be smaller than this."""
    from .compression import compress
    from .cost import artifact_size

    return artifact_size(compress(model, space.smallest(), example), spec)


def load_inputs(model: str, data: str | None, weights: str | None, data_dir: str | None, seed: int,
                limit: int | None, val_fraction: float, image_size: int | None = None, val_data: str | None = None
                ) -> tuple[ModelSpec, DataBundle, nn.Module]:
    """The data bundle (default: Fashion-MNIST, else digits with a notice), the model spec, and the
    model with its checkpoint loaded (untrained otherwise), in eval mode."""
    from .data import default_data, load_data
    from .models import build_model, load_weights

    if data is None and val_data is None:
        bundle = default_data(seed, image_size=image_size)
        if bundle.notice:
            print(bundle.notice)
    else:
        bundle = load_data(data or "fashion-mnist", data_dir=data_dir, seed=seed, limit=limit,
                           val_fraction=val_fraction, image_size=image_size, model=model, val_data=val_data)
    spec = ModelSpec(model, bundle.num_classes, bundle.in_channels, bundle.image_size, data=bundle.name)
    net = build_model(spec)
    if weights:
        load_weights(net, weights)
    return spec, bundle, net.eval()


def search(budget: str | Budget, **options: object) -> SearchOutcome:
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
    from .memory import frozen_setup
    from .orchestrate import run_search

    settings, ctx = prepare(SearchSettings.from_options(budget, **options))
    with frozen_setup():
        return run_search(settings, ctx)


search.__doc__ = (search.__doc__ or "") + options_doc()


def prepare(settings: SearchSettings) -> tuple[SearchSettings, SearchContext]:
    """Check every input, then load data and the (cached or trained) baseline: (SearchSettings with
    the study named, SearchContext).

    Nothing is written before all checks pass; an unreachable storage is found before any training.
    """
    from dataclasses import replace

    from .models import param_bytes
    from .space import load_space
    from .storage import check_storage, check_tracking
    from .train import baseline

    s = settings
    check_storage(s.storage)
    check_tracking(s.tracking_uri)
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    bound_space_src = load_space(s.space)
    started = time.monotonic()
    spec, bundle, net = load_inputs(s.model, s.data, s.weights, s.data_dir, s.data_seed, s.limit, s.val_fraction,
                                    image_size=s.image_size, val_data=s.val_data)
    example = bundle.train.x[:2]
    bound = bound_space_src.bind(net, example)
    original = param_bytes(net)
    cap = s.budget.limit(original)
    try:
        floor = space_floor(net, bound, spec, example)
    except PlanError as e:
        raise UserError(f"the search space does not fit this model: {e}") from None
    if cap < floor:
        raise UserError(f"budget {format_bytes(cap)} ({cap} bytes) is below the smallest artifact this search "
                        f"space can reach: {format_bytes(floor)} ({floor} bytes, {original / floor:.1f}x); "
                        "raise --budget or widen the space")
    if cap >= original:
        print(f"budget {format_bytes(cap)} is above the model's {format_bytes(original)} of fp32 parameters: it "
              "already fits uncompressed. Searching anyway for the most accurate plan within the budget; "
              "for a smaller model pass a smaller --budget (e.g. 20x)")
    predictor = None
    if s.latency_budget is not None or "latency" in s.objectives:
        from .cost.profile import predictor_for

        predictor, fastest = predictor_for(net, s.model, bound.layers, example, os.path.join(s.out, "latency"),
                                           device=s.device, batch_size=s.latency_batch_size,
                                           threads=s.latency_threads, plans=s.latency_plans or PLANS,
                                           budget_ms=s.latency_budget, progress=s.progress)
        print(f"latency predictor on {s.device}: fastest plan {fastest:.3f} ms; held-out error "
              + (f"{predictor.error:.1%}" if predictor.error is not None else "n/a"))
    t0 = time.monotonic()
    net, val_acc = baseline(spec, bundle, epochs=s.baseline_epochs_or_default, seed=s.data_seed, device=s.device,
                            weights=s.weights, progress=s.progress)
    started += time.monotonic() - t0  # a --time-budget is the search's: training the baseline is not counted
    s = replace(s, study=s.study or default_study_name(s.model, bundle.name, s.budget))
    bundle.train, bundle.val, bundle.test = (bundle.train.to(s.device), bundle.val.to(s.device),
                                             bundle.test.to(s.device))
    net = net.to(s.device)
    calib = list(bundle.train.batches(s.batch_size, shuffle=True, seed=s.seed, limit=s.calib_batches))
    ctx = SearchContext(model=net, spec=spec, data=bundle, space=bound, baseline_val_acc=val_acc,
                        original_bytes=original, example_input=bundle.train.x[:2], calib=calib, latency=predictor,
                        started=started)
    print(f"baseline {s.model} on {bundle.name}: val accuracy {val_acc:.4f}, {format_bytes(original)} fp32 params")
    print(validation_line(ctx, s))
    return s, ctx


def validation_line(ctx: SearchContext, s: SearchSettings) -> str:
    """The header line saying which validation split ranks the trials and whether the baseline has
    seen it. A checkpoint the user brings may have been trained on the whole training set, carved
    validation split included: then its accuracy there is higher than on the test split by more
    than sampling noise. The baseline's accuracy on (a stratified subset of SEEN_CHECK_SAMPLES of)
    the test split is measured for this; no compressed model's test accuracy is measured before
    the search ends. The subset keeps the check cheap on large models (the whole split took
    175 s for Swin-T on one CPU thread)."""
    from .train import evaluate

    line = f"validation: {ctx.data.val_source}"
    if not s.weights:
        return line + ("" if s.val_data else "; the baseline was trained without it")
    test = ctx.data.test.subset(SEEN_CHECK_SAMPLES, seed=0)
    test_acc = evaluate(ctx.model, test, device=s.device)
    if len(test) == len(ctx.data.test):
        ctx.baseline_test_acc = test_acc  # the final report's figure: not measured twice
    seen = has_seen(ctx.baseline_val_acc, len(ctx.data.val), test_acc, len(test))
    ctx.baseline_saw_val = seen
    verdict = (f"the checkpoint scores {ctx.baseline_val_acc:.2%} on it and {test_acc:.2%} on "
               + ("the test split" if len(test) == len(ctx.data.test) else f"{len(test):,} test samples") + ": ")
    if seen and not s.val_data:
        return (line + "; " + verdict + "it has most likely been trained on these samples, so validation accuracies "
                "read high (trials are still ranked on samples their fine-tune did not train on); pass held-out "
                "data with --val-data for honest figures")
    return line + "; " + verdict + ("no sign that it has seen them" if not seen else
                                    "it reads higher than test by more than sampling noise")


def has_seen(val_acc: float, n_val: int, test_acc: float, n_test: int) -> bool:
    """Validation accuracy above test accuracy by more than 3 standard errors of the difference
    (and 1 point): the model has most likely been trained on the validation samples."""
    p = (val_acc * n_val + test_acc * n_test) / max(n_val + n_test, 1)
    se = math.sqrt(max(p * (1 - p), 1e-6) * (1 / max(n_val, 1) + 1 / max(n_test, 1)))
    return val_acc - test_acc > max(3 * se, 0.01)
