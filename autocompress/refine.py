"""The second fidelity: the top-k plans of the search, fine-tuned longer, decide the final pick.

Search trials use short fine-tunes (cheap, noisy); the finalists are re-compressed from the
baseline and fine-tuned for `final_epochs`, scored on the validation split, and written as
artifacts. Results live in the study's user attrs ("final") so `report` and `export` see them.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import optuna

from .compression import compress, kept_weights
from .cost import artifact_size
from .artifact import export
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .plan import CompressionPlan, format_bytes
from .tracking import Tracker

FINAL_ATTR = "final"


def finalists(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k feasible completed trials with the best validation accuracy (smaller size breaks ties)."""
    ok = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
          if not t.user_attrs.get("infeasible") and "artifact" in t.user_attrs and t.values]
    ok.sort(key=lambda t: (-t.values[0], t.user_attrs.get("size_bytes", 0)))
    return ok[:k]


def final_results(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """trial number (str) -> {val_accuracy, size_bytes, artifact, epochs} of the refined finalists."""
    return dict(study.user_attrs.get(FINAL_ATTR, {}))


def best_final(study: optuna.Study) -> tuple[int, dict[str, Any]] | None:
    """The refined finalist with the highest validation accuracy, if any were refined."""
    res = final_results(study)
    if not res:
        return None
    num, info = max(res.items(), key=lambda kv: (kv[1]["val_accuracy"], -kv[1]["size_bytes"]))
    return int(num), info


def finetune_and_export(model: Any, plan: CompressionPlan, size: int, path: str, settings: Any, ctx: Any, *,
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


def refine(study: optuna.Study, settings: Any, ctx: Any, tracker: Tracker, k: int, epochs: int) -> None:
    """Fine-tune the top-k plans for `epochs` and record them (skips finalists already refined at
    that many epochs, so a resumed search does not redo them)."""
    done = final_results(study)
    for t in finalists(study, k):
        key = str(t.number)
        if key in done and done[key]["epochs"] == epochs:
            continue
        plan = CompressionPlan.from_dict(t.user_attrs["plan"])
        start = time.perf_counter()
        run_id = tracker.start_trial(t.number, {"phase": "final", "epochs": epochs,
                                                 "distill": max(plan.distill, settings.final_distill)},
                                       plan.to_dict(), role="final")
        state = "failed"
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
                         "search_val_accuracy": t.values[0]}
            study.set_user_attr(FINAL_ATTR, done)
            tracker.log_metrics(run_id, {"val_accuracy_final": res.val_acc[-1], "size_bytes": size,
                                         "trial_seconds": time.perf_counter() - start})
            state = "complete"
            print(f"finalist trial {t.number:3d}: val {t.values[0]:.4f} -> {res.val_acc[-1]:.4f} after "
                  f"{epochs} epochs, {format_bytes(size)}")
        finally:
            tracker.end(run_id, state)
