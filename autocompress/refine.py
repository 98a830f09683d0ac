"""The second fidelity: the top-k plans of the search, fine-tuned longer, decide the final pick.

Search trials use short fine-tunes (cheap, noisy); the finalists go on training their trial's
fine-tuned model when this process kept it (objective.keep_for_final; else they are
re-compressed from the baseline) for `final_epochs`, are scored on the validation split, and
written as artifacts. Results live in the study's user attrs ("final") so `report` and `export` see them.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import optuna
from torch import nn

from .artifact import export
from .compression import compress, kept_weights, recalibrate_bn
from .context import SearchContext
from .cost import artifact_size
from .data import TensorData
from .finetune import FinetuneConfig, FinetuneResult, NonFiniteLoss, finetune
from .memory import collect
from .plan import CompressionPlan, format_bytes
from .settings import SearchSettings
from .tracking import Tracker
from .train import evaluate
from .trials import Attr, StudyAttr, TrialState, accuracy, final_rank, final_results, finalists, finetune_seconds

SCREEN_SHARE = 0.3  # of a timed final phase: the finalists' equal first fine-tunes, before the best goes on


def finetune_and_export(model: nn.Module, plan: CompressionPlan, size: int, path: str, settings: SearchSettings,
                        ctx: SearchContext, *,
                        epochs: int, max_batches: int | None, report: Callable[[float, int], None],
                        min_distill: float = 0.0, seconds: float | None = None,
                        val: TensorData | None = None, phase: int = 0,
                        start_acc: float | None = None) -> FinetuneResult:
    """Fine-tune a compressed model (distilled from the baseline when the plan asks, or with
    weight at least `min_distill`), write its artifact to `path`, and check the file has exactly
    the `size` bytes the cost model reported. Shared by search trials and finalists so both are
    trained and stored the same way.

    Every trial sees the same batches in the same order (a fair comparison); `phase` > 0 (a model
    that goes on from its trial or its finalist share) shuffles with another seed, so that a
    continued model does not start again on the batches of its earlier fine-tunes: a time-budgeted
    pick went through its first 86 batches three times before it saw the end of an epoch.

    `start_acc` (the model's validation accuracy as it comes in, for a model that goes on) guards
    the fine-tune (`guarded`): the artifact holds whichever of the two models is better."""
    distill = max(plan.distill, min_distill)
    config = FinetuneConfig(epochs=epochs, lr=settings.lr, batch_size=settings.batch_size, max_batches=max_batches,
                            distill=distill, temperature=plan.temperature, l1=plan.l1, seed=settings.seed + phase,
                            seconds=seconds)

    def run() -> FinetuneResult:
        return finetune(model, ctx.data.train, ctx.data.val if val is None else val, config,
                        teacher=ctx.model if distill > 0 else None, report=report,
                        l1_weights=lambda: kept_weights(model), device=settings.device, progress=settings.progress,
                        recalibrate=lambda: recalibrate_bn(model, ctx.calib))

    result = run() if start_acc is None else guarded(model, start_acc, run)
    written = export(model.cpu(), path, ctx.spec)
    if written != size:
        raise RuntimeError(f"artifact {os.path.basename(path)} has {written} bytes, cost model said {size}")
    return result


def guarded(model: nn.Module, start_acc: float, run: Callable[[], FinetuneResult]) -> FinetuneResult:
    """Run a fine-tune that goes on from a model scoring `start_acc` on validation, and put that
    model's weights back when the fine-tune ends lower (or NaN), or its loss diverges: the result
    then says `restored`, and its last accuracy is `start_acc`. Going on usually gains 1-3 points,
    but one time-budgeted pick of mnasnet0_5 that read 80.7% on the screening images before its new
    cosine cycle read 75.6% on validation after it (75.5% on test), and the search exported it."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    try:
        result = run()
    except NonFiniteLoss as e:
        print(f"  the fine-tune diverged ({e}): keeping the model it went on from", flush=True)
        result = FinetuneResult([float("nan")], [], time.perf_counter() - t0, 0.0)
    end = result.val_acc[-1]
    if not math.isfinite(start_acc) or (math.isfinite(end) and end >= start_acc):
        return result
    model.load_state_dict(saved)
    result.val_acc.append(start_acc)
    result.restored = True
    return result


def refine(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker, k: int,
           epochs: int) -> None:
    """Fine-tune the top-k plans for `epochs` and record them (skips finalists already refined at
    that many epochs, so a resumed search does not redo them)."""
    done = final_results(study)
    kept = take_trained(ctx)
    for t in finalists(study, k):
        key = str(t.number)
        if key in done and done[key]["epochs"] == epochs and "seconds" not in done[key]:
            continue
        refine_one(study, settings, ctx, tracker, t, epochs=epochs, model=kept.pop(t.number, None), from_trial=True)


def take_trained(ctx: SearchContext) -> dict[int, nn.Module]:
    """The fine-tuned models this process kept of its best trials (objective.keep_for_final), by
    trial number; the context lets go of them, so each is freed once its finalist is done."""
    kept = {n: m for n, (_, _, m) in ctx.trained.items()}
    ctx.trained.clear()
    return kept


def refine_timed(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker, k: int,
                 seconds: float) -> None:
    """--time-budget's final phase: the top-k plans are fine-tuned for an equal share of
    SCREEN_SHARE of `seconds` each, then the best of them on validation goes on training (a new
    cosine cycle from its weights) for all the time that is left. With one finalist it gets all."""
    start = time.monotonic()
    tops = finalists(study, k)
    if not tops:
        return
    share = seconds * SCREEN_SHARE / len(tops) if len(tops) > 1 else seconds
    kept = take_trained(ctx)
    models = {t.number: refine_one(study, settings, ctx, tracker, t, seconds=share, model=kept.pop(t.number, None),
                                   from_trial=True)
              for t in tops}
    left = seconds - (time.monotonic() - start)
    if len(tops) == 1 or left <= 0:
        return
    done = final_results(study)
    winner = max(tops, key=lambda t: final_rank(done[str(t.number)]))
    refine_one(study, settings, ctx, tracker, winner, seconds=left, model=models[winner.number])


def refine_one(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker,
               t: optuna.trial.FrozenTrial, *, epochs: int = 0, seconds: float | None = None,
               model: nn.Module | None = None, from_trial: bool = False) -> nn.Module:
    """Compress trial t's plan from the baseline (or go on training `model`: with `from_trial`,
    the model its screening trial fine-tuned, else its compressed model from an earlier call),
    fine-tune it for `epochs` or `seconds`, export it as final-N.acz and record it in the study's
    "final" results; returns the fine-tuned model."""
    plan = CompressionPlan.from_dict(t.user_attrs[Attr.PLAN])
    start = time.perf_counter()
    collect()  # the trials' and the last finalist's models
    done = final_results(study)
    if model is None:  # phase: which shuffle of the training data (finetune_and_export)
        before, phase = {}, 0
    elif from_trial:  # its trial's fine-tune counts, as a finalist's first share does
        before = {"seconds": finetune_seconds(t) or 0.0, "epochs": 0, "from": "trial"}
        phase = 1
    else:
        before, phase = done.get(str(t.number), {}), 2
    distill = max(plan.distill, settings.final_distill)
    run_id = tracker.start_trial(t.number, {"phase": "final", "epochs": epochs if seconds is None else "time",
                                             "seconds": seconds, "continued": before.get("from", model is not None),
                                             "distill": distill},
                                 plan.to_dict(), role="final")
    state = TrialState.FAILED
    try:
        start_acc = None  # a model that goes on: what guards its fine-tune (guarded)
        if model is None:
            model = compress(ctx.model, plan, ctx.example_input, ctx.calib)
        elif "val_accuracy" in before:  # a finalist's share, scored on the validation split
            start_acc = before["val_accuracy"]
        elif ctx.screen_val is None:  # its trial was scored on the whole validation split too
            start_acc = accuracy(t)
        else:  # its trial was scored on the screening images only
            start_acc = evaluate(model, ctx.data.val, settings.device)
        size = artifact_size(model, ctx.spec)
        if seconds is not None:  # the share includes compressing: the fine-tune gets what is left of it
            seconds = max(seconds - (time.perf_counter() - start), 1.0)
        path = os.path.join(settings.artifact_dir, f"final-{t.number}.acz")

        def report(acc: float, epoch: int) -> None:
            tracker.log_metrics(run_id, {"val_accuracy": acc}, step=epoch)

        res = finetune_and_export(model, plan, size, path, settings, ctx, epochs=epochs, max_batches=None,
                                  report=report, min_distill=settings.final_distill, seconds=seconds,
                                  phase=phase, start_acc=start_acc)
        spent = res.seconds + res.eval_seconds if seconds is not None else 0.0
        trained = before.get("seconds", 0.0) + (0.0 if res.restored else spent)  # of the model exported
        entry = {"val_accuracy": res.val_acc[-1], "size_bytes": size, "artifact": os.path.abspath(path),
                 "epochs": before.get("epochs", 0) + (0 if res.restored else len(res.train_loss)),
                 "distill": distill, "search_val_accuracy": accuracy(t)}
        if seconds is not None:
            entry["seconds"] = round(trained, 1)
        if start_acc is not None:
            entry["start_val_accuracy"] = start_acc  # what it went on from, on the validation split
        if res.restored:  # going on ended lower: the model it went on from is kept (guarded)
            entry["restored"] = {"val_accuracy": res.val_acc[-2], "seconds": round(spent, 1)}
        if before.get("from") == "trial" or before.get("from_trial"):
            entry["from_trial"] = True  # it went on from its screening trial's fine-tune
        done[str(t.number)] = entry
        study.set_user_attr(StudyAttr.FINAL, done)
        tracker.log_metrics(run_id, {"val_accuracy_final": res.val_acc[-1], "size_bytes": size,
                                     "trial_seconds": time.perf_counter() - start,
                                     "kept_start": float(res.restored)})
        state = TrialState.COMPLETE
        origin = " from its trial" if before.get("from") == "trial" else ""
        how = f"{entry['epochs']} epochs{', continued' + origin if origin else ''}" if seconds is None else \
            f"{trained:.0f}s ({entry['epochs']} epochs{', continued' if before else ''}{origin})"
        went = f"{spent:.0f}s" if seconds is not None else \
            f"{len(res.train_loss)} epoch{'' if len(res.train_loss) == 1 else 's'}"
        kept = f" (going on for {went} ended at {res.val_acc[-2]:.4f}: kept the model it went on from)" \
            if res.restored else ""
        start_note = f" (screening images; it went on from {start_acc:.4f} on validation)" \
            if start_acc is not None and start_acc != accuracy(t) and not res.restored and from_trial else ""
        print(f"finalist trial {t.number:3d}: val {accuracy(t):.4f}{start_note} -> {res.val_acc[-1]:.4f} after {how}, "
              f"{format_bytes(size)}{kept}", flush=True)
        return model
    finally:
        tracker.end(run_id, state)
