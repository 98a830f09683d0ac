"""The final pick timed for real: deploy the best artifact on the target, time it, log it.

Trials only predict latency; the model the search returns is measured (median of repeated runs
after warm-up, raw timings logged as latency.json) and its deployed test accuracy reported.
"""
from __future__ import annotations

import json

import optuna

from .context import SearchContext, SearchOutcome
from .cost.latency import LatencyResult, measure_latency
from .deploy import deployable
from .settings import SearchSettings
from .tracking import Tracker
from .trials import Attr


def time_final(outcome: SearchOutcome, settings: SearchSettings, ctx: SearchContext, tracker: Tracker,
               best: optuna.trial.FrozenTrial, path: str) -> LatencyResult:
    """Deploy `path`, time it on settings.device, log to the parent and the best trial's run."""
    from .train import evaluate

    device = settings.device
    calib = [(x.cpu(), y) for x, y in ctx.calib] if device == "cpu" else None
    deployed = deployable(path, device=device, calib=calib, batch_size=settings.latency_batch_size,
                          threads=settings.latency_threads)
    example = ctx.example_input.to(device) if device != "cpu" else ctx.example_input.cpu()
    res = measure_latency(deployed, example, device=device, batch_size=settings.latency_batch_size,
                          threads=settings.latency_threads, warmup=10, repeats=100)
    test = ctx.data.test if device != "cpu" else ctx.data.test.to("cpu")
    acc = evaluate(deployed, test, device=device)
    outcome.latency = res
    predicted = best.user_attrs.get(Attr.PREDICTED_LATENCY_MS)
    metrics = {"latency_ms": res.median_ms, "latency_p90_ms": res.p90_ms, "deployed_test_accuracy": acc}
    if predicted is not None:
        metrics["predicted_latency_ms"] = predicted
    assert outcome.parent_run_id is not None
    tracker.log_metrics(outcome.parent_run_id, metrics)
    if best.user_attrs.get(Attr.MLFLOW_RUN_ID):
        tracker.log_metrics(best.user_attrs[Attr.MLFLOW_RUN_ID], {"latency_ms": res.median_ms})
    tracker.log_text(outcome.parent_run_id, json.dumps(res.to_dict()), "latency.json")
    budget = settings.latency_budget_ms
    verdict = "" if budget is None else (f", within the {budget:g} ms budget" if res.median_ms <= budget
                                         else f", OVER the {budget:g} ms budget (the predictor was off)")
    tracker.set_tags(outcome.parent_run_id, {"latency_within_budget": budget is None or res.median_ms <= budget})
    pred = f" (predicted {predicted:.3f} ms)" if predicted is not None else ""
    threads = f", {res.threads} threads" if device == "cpu" else ""
    print(f"deployed latency on {device}: {res.median_ms:.3f} ms median of {len(res.timings_ms)} runs at batch "
          f"{res.batch_size}{threads}{pred}{verdict}; deployed test accuracy {acc:.4f}")
    return res
