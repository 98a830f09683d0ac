"""The second fidelity: the top-k plans of the search, fine-tuned longer, decide the final pick.

Search trials use short fine-tunes (cheap, noisy); the finalists are re-compressed from the
baseline and fine-tuned for `final_epochs`, scored on the validation split, and written as
artifacts. Results live in the study's user attrs ("final") so `report` and `export` see them.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import optuna
from torch import nn

from .artifact import export
from .compression import compress, kept_weights
from .context import SearchContext
from .cost import artifact_size
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .plan import CompressionPlan, format_bytes
from .settings import SearchSettings
from .tracking import Tracker
from .trials import Attr, StudyAttr, TrialState, accuracy, final_results, finalists


def finetune_and_export(model: nn.Module, plan: CompressionPlan, size: int, path: str, settings: SearchSettings,
                        ctx: SearchContext, *,
                        epochs: int, max_batches: int | None, report: Callable[[float, int], None],
                        min_distill: float = 0.0) -> FinetuneResult:
    """Fine-tune a compressed model (distilled from the baseline when the plan asks, or with
    weight at least `min_distill`), write its artifact to `path`, and check the file has exactly
    the `size` bytes the cost model reported. Shared by search trials and finalists so both are
    trained and stored the same way."""
    distill = max(plan.distill, min_distill)
    config = FinetuneConfig(epochs=epochs, lr=settings.lr, batch_size=settings.batch_size, max_batches=max_batches,
                            distill=distill, temperature=plan.temperature, l1=plan.l1, seed=settings.seed)
    result = finetune(model, ctx.data.train, ctx.data.val, config, teacher=ctx.model if distill > 0 else None,
                      report=report, l1_weights=lambda: kept_weights(model), device=settings.device,
                      progress=settings.progress)
    written = export(model.cpu(), path, ctx.spec)
    if written != size:
        raise RuntimeError(f"artifact {os.path.basename(path)} has {written} bytes, cost model said {size}")
    return result


def refine(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker, k: int,
           epochs: int) -> None:
    """Fine-tune the top-k plans for `epochs` and record them (skips finalists already refined at
    that many epochs, so a resumed search does not redo them)."""
    done = final_results(study)
    for t in finalists(study, k):
        key = str(t.number)
        if key in done and done[key]["epochs"] == epochs:
            continue
        plan = CompressionPlan.from_dict(t.user_attrs[Attr.PLAN])
        start = time.perf_counter()
        run_id = tracker.start_trial(t.number, {"phase": "final", "epochs": epochs,
                                                 "distill": max(plan.distill, settings.final_distill)},
                                       plan.to_dict(), role="final")
        state = TrialState.FAILED
        try:
            model = compress(ctx.model, plan, ctx.example_input, ctx.calib)
            size = artifact_size(model, ctx.spec)
            path = os.path.join(settings.artifact_dir, f"final-{t.number}.acz")

            def report(acc: float, epoch: int) -> None:
                tracker.log_metrics(run_id, {"val_accuracy": acc}, step=epoch)

            res = finetune_and_export(model, plan, size, path, settings, ctx, epochs=epochs, max_batches=None,
                                      report=report, min_distill=settings.final_distill)
            done[key] = {"val_accuracy": res.val_acc[-1], "size_bytes": size, "artifact": os.path.abspath(path),
                         "epochs": epochs, "distill": max(plan.distill, settings.final_distill),
                         "search_val_accuracy": accuracy(t)}
            study.set_user_attr(StudyAttr.FINAL, done)
            tracker.log_metrics(run_id, {"val_accuracy_final": res.val_acc[-1], "size_bytes": size,
                                         "trial_seconds": time.perf_counter() - start})
            state = TrialState.COMPLETE
            print(f"finalist trial {t.number:3d}: val {accuracy(t):.4f} -> {res.val_acc[-1]:.4f} after "
                  f"{epochs} epochs, {format_bytes(size)}")
        finally:
            tracker.end(run_id, state)
