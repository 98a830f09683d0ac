"""The search itself: run (or resume) a study until it holds `--trials` trials, then refine the
finalists, export the best and log the review. One loop level per function: run_search sets up,
runs the trials (here or in worker processes) and finishes; `optimize` runs this process's trials.

Named orchestrate, not search: `autocompress.search` is the public function (api.search), and a
submodule of that name would shadow it after its first import.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import time
from dataclasses import replace

import optuna

from .console import progress_bar, trial_printer
from .context import SearchContext, SearchOutcome
from .cost import space_untouchable
from .memory import SettleAfterFirst, settle
from .objective import Objective, TrialFailed, as_trial, budget_load, quiet_failed_trials, sized
from .plan import CompressionPlan, format_bytes
from .refine import refine, refine_timed
from .report import format_table, print_table, trial_rows
from .review import log_review
from .settings import SearchSettings
from .storage import StudyLock
from .study import check_same_study, make_sampler, make_tracker, open_study, resume_cleanup, space_json
from .timebudget import (Clock, Speed, describe, final_seconds, finalists_that_fit, fit_in_budget, overhead_estimate,
                         probe_speed, screening_split, trial_seconds, trials_finetune_seconds)
from .tracking import Tracker
from .trials import Attr, StudyAttr, TrialState, accuracy, best_final, best_trial, matching_trial, pareto_trials
from .workers import optimize_shared, spawn_workers, study_counts, wait_workers


def run_search(settings: SearchSettings, ctx: SearchContext) -> SearchOutcome:
    """Run (or resume) the study until it holds `settings.trials` counted trials or time runs out.

    With settings.workers > 1, that many worker processes (started with settings.options()) share
    the study and log their trials under this invocation's one parent run.
    """
    limit = settings.budget.limit(ctx.original_bytes)
    study = open_study(settings)
    check_same_study(study, settings, ctx, limit)
    study.set_user_attr(StudyAttr.BASELINE, {"val_accuracy": ctx.baseline_val_acc, "fp32_bytes": ctx.original_bytes})
    tracker = make_tracker(settings)
    closed = resume_cleanup(study, tracker)
    workers = settings.workers
    parent = tracker.start_parent(f"search-{time.strftime('%Y%m%d-%H%M%S')}", {
        "budget": str(settings.budget), "budget_bytes": limit, "model": ctx.spec.spec, "data": ctx.data.name,
        "trials": settings.trials, "epochs": settings.epochs, "seed": settings.seed, "device": settings.device,
        "space_params": len(ctx.space.param_names()), "workers": workers, "time_budget_s": settings.time_budget,
        "validation": ctx.data.val_source, "baseline_saw_val": ctx.baseline_saw_val,
    })
    tracker.log_metrics(parent, {"baseline_val_accuracy": ctx.baseline_val_acc,
                                 "baseline_fp32_bytes": ctx.original_bytes})
    tracker.log_text(parent, space_json(ctx.space), "search_space.json")
    done, running = study_counts(study)
    remaining = max(settings.trials - done, 0)
    study.set_user_attr(StudyAttr.UNTOUCHABLE, space_untouchable(ctx.model, ctx.space, ctx.spec, ctx.example_input))
    print(f"study {settings.study}: {done} trials done, {remaining} to run"
          + (f" ({running} running elsewhere)" if running else "")
          + f"; budget {format_bytes(limit)} " + budget_ratio(limit, ctx.original_bytes)
          + f"; {format_bytes(study.user_attrs[StudyAttr.UNTOUCHABLE])} no plan can touch"
          + (f"; {workers} workers" if workers > 1 else "")
          + (f"; closed {closed} run(s) left by a killed search" if closed else ""), flush=True)
    settle()  # Optuna's storage and MLflow (imported just now) out of the warm start's collections
    if settings.warm_start and not study.get_trials(deepcopy=False) and remaining:
        enqueue_warm_start(study, settings, ctx, tracker, parent, limit, remaining)
    timed = None
    if settings.time_budget is not None:
        settings, timed = plan_time(settings, ctx, max(remaining, 1))
    try:
        if workers > 1 and remaining > 0:
            options = {**settings.options(), "progress": False}
            codes = wait_workers(spawn_workers(options, workers, parent))
            bad = [f"worker {i}: exit {c}" for i, c in enumerate(codes) if c != 0]
            if bad:
                print(f"some workers did not end cleanly ({', '.join(bad)}); their trials are retried "
                      "by the others or by the next run")
        else:
            optimize(settings, ctx, study, tracker, limit, remaining)
    except KeyboardInterrupt:
        print("interrupted: the current trial is recorded as interrupted; run the same command to resume")
        tracker.end(parent, TrialState.INTERRUPTED)
        raise
    note_match(study, settings, ctx, tracker, parent)
    return finish(study, settings, ctx, tracker, parent, limit, timed)


def reference_accuracy(settings: SearchSettings, ctx: SearchContext) -> tuple[float, float]:
    """(the baseline's accuracy on the samples the trials are scored on, one standard error of it).

    The samples: the validation split, or its screening subset under --time-budget (measured
    once). The standard error, sqrt(p (1 - p) / n), is how far apart two equally good models can
    read on n samples: 0.0036 on LeNet-5's 6,000 at 91.7%. A trial within it of the baseline
    matches it (the README's 50 KB run: 0.9157 against 0.9168 after 1 epoch, and 91.3% test after
    17, as the uniform plan fine-tuned for the whole run)."""
    samples = ctx.data.val if ctx.screen_val is None else ctx.screen_val
    if ctx.screen_val is None:
        acc = ctx.baseline_val_acc
    else:
        if ctx.screen_baseline_acc is None:
            from .train import evaluate

            ctx.screen_baseline_acc = evaluate(ctx.model, ctx.screen_val, device=settings.device)
        acc = ctx.screen_baseline_acc
    return acc, math.sqrt(acc * (1 - acc) / max(len(samples), 1))


def stops_at_baseline(settings: SearchSettings) -> bool:
    """--stop-at-baseline applies: one objective (a Pareto front wants the smaller plans too)."""
    return settings.stop_at_baseline and len(settings.objectives) == 1


def note_match(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker,
               parent: str) -> None:
    """Record (once, in the study, so a resumed search keeps to it) that exploring stopped early
    because a trial matched the baseline, with the trials it left unrun."""
    if not stops_at_baseline(settings) or StudyAttr.MATCHED in study.user_attrs:
        return
    reference, error = reference_accuracy(settings, ctx)
    match = matching_trial(study, reference - error)
    left = settings.trials - study_counts(study)[0]
    if match is None or left <= 0:
        return
    study.set_user_attr(StudyAttr.MATCHED, {"trial": match.number, "val_accuracy": accuracy(match),
                                            "baseline": reference, "standard_error": error, "trials_left": left})
    tracker.set_tags(parent, {"matched_baseline_trial": match.number, "trials_left": left})
    print(f"trial {match.number} matches the baseline on validation ({accuracy(match):.4f}; the baseline "
          f"{reference:.4f} ± {error:.4f}): "
          f"no plan can be more accurate, so exploring stops with {left} trial(s) left"
          + (" and the rest of the run fine-tunes it" if settings.has_final_phase else "")
          + " (--no-stop-at-baseline runs them all)", flush=True)


def plan_time(settings: SearchSettings, ctx: SearchContext, trials: int) -> tuple[SearchSettings, tuple[Clock, Speed]]:
    """--time-budget: give every screening fine-tune the same time, so that `trials` of them fit
    what is left of the exploring share, and stop starting trials when it is spent.
    Screening trials are scored on a fixed validation subset (timebudget.screening_split): at a
    fraction of an epoch of fine-tuning, a full evaluation would cost as much as the training."""
    clock = Clock(ctx.started, settings.time_budget or 0.0, settings.explore_share)
    ctx.screen_val = screening_split(ctx.data.val, settings.seed)
    speed = probe_speed(ctx, settings, ctx.screen_val)
    if ctx.screen_val is not None:  # the timing pass scored the baseline on the screening images
        ctx.screen_baseline_acc = speed.val_accuracy
    clock.start_exploring()
    left = clock.left(clock.explore_end)
    overhead = overhead_estimate(speed, settings.calib_batches)
    planned = trial_seconds(speed, left, trials, overhead)
    seconds = fit_in_budget(planned, clock, speed, overhead, len(ctx.data.test))
    timeout = max(min(left, settings.timeout or left), 1.0)  # at least one trial starts
    print(describe(clock, speed, seconds, trials, overhead, settings.time_finalists), flush=True)
    if seconds < planned:
        print(f"time budget: {clock.left():.0f}s left after set-up fits one trial of {seconds:.1f}s and no final "
              f"fine-tune; give a larger --time-budget (at least {clock.budget - clock.left() + 3 * planned:.0f}s "
              "here) to explore and then fine-tune the best plan", flush=True)
    return replace(settings, trial_seconds=seconds, timeout=timeout), (clock, speed)


def budget_ratio(limit: int, original_bytes: int) -> str:
    """'(34.9x of 1.72 MB fp32)', or, for a budget the fp32 model already meets, says so."""
    if limit >= original_bytes:
        return f"(the {format_bytes(original_bytes)} fp32 model already fits)"
    return f"({original_bytes / limit:.1f}x of {format_bytes(original_bytes)} fp32)"


def run_worker(settings: SearchSettings, ctx: SearchContext, parent_run_id: str) -> int:
    """One worker process of `--workers N`: runs trials of the (existing) study under the given parent run."""
    limit = settings.budget.limit(ctx.original_bytes)
    if settings.trial_seconds is not None:  # a time-budgeted search: score trials as the main process does
        ctx.screen_val = screening_split(ctx.data.val, settings.seed)
    study = open_study(settings, create=False)
    tracker = make_tracker(settings)
    tracker.parent_id = parent_run_id
    return optimize(settings, ctx, study, tracker, limit, 0)


def optimize(settings: SearchSettings, ctx: SearchContext, study: optuna.Study, tracker: Tracker, limit: int,
             remaining: int) -> int:
    """Take trials of the shared study until it is complete (see workers.optimize_shared)."""
    objective = Objective(settings, ctx, tracker, limit)
    done = None
    if stops_at_baseline(settings):
        reference, error = reference_accuracy(settings, ctx)
        done = lambda: matching_trial(study, reference - error) is not None  # noqa: E731
    quiet_failed_trials()  # the trial line reports a TrialFailed in one line
    bar = progress_bar(remaining, settings.progress)
    settle()  # the study, tracker and warm start's objects out of each collection's scan
    try:
        return optimize_shared(study, objective, settings.trials, StudyLock(settings.storage_url, settings.study or ""),
                               timeout=settings.timeout, catch=(TrialFailed,),
                               callbacks=[trial_printer(bar, ctx.original_bytes), SettleAfterFirst()],
                               poll=min(2.0, settings.heartbeat_interval),
                               sampler_for=lambda n: make_sampler(settings, n), done=done)
    finally:
        if bar is not None:
            bar.close()


def enqueue_warm_start(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker,
                       parent: str, limit: int, remaining: int) -> None:
    """Sensitivity analysis (cached per weights), then the uniform and knapsack plans as first trials."""
    from .sensitivity import cached_analyse
    from .warmstart import fast_plans, to_params, warm_start_plans

    t0 = time.perf_counter()
    seconds = settings.sensitivity_seconds
    if settings.time_budget is not None:
        seconds = min(seconds, settings.time_budget / 10)
    sens, cache, cached = cached_analyse(ctx.model, ctx.data.val, ctx.example_input,
                                         os.path.join(settings.out, "sensitivity"), device=settings.device,
                                         progress=settings.progress, seconds=seconds)
    print(f"sensitivity ({'cached' if cached else f'{time.perf_counter() - t0:.1f}s'}, {sens.describe()}): "
          "most fragile first: " + ", ".join(sens.ranking()[:5]))
    tracker.log_file(parent, cache)
    study.set_user_attr(StudyAttr.SENSITIVITY, sens.table())  # the heat map of the review
    plans = warm_start_plans(ctx.model, ctx.space.layers, lambda p: sized(ctx, as_trial(ctx.space, p))[1], limit, sens)
    if settings.latency_budget_ms is not None and ctx.latency is not None:
        def cost(p: CompressionPlan) -> int:  # <= limit: fits both budgets
            return math.ceil(limit * budget_load(ctx, settings, as_trial(ctx.space, p), limit))
        plans = fast_plans(ctx.model, ctx.space.layers, cost, limit) + plans
    plans = interleave(plans)[:remaining]  # never more than the trials asked
    for name, plan in plans:
        params = to_params(plan, ctx.space.layers)
        if params is not None:
            study.enqueue_trial(params, user_attrs={Attr.WARM_START: name}, skip_if_exists=True)
    print(f"warm start: {', '.join(n for n, _ in plans) or 'no plan fits'}")


def interleave(plans: list[tuple[str, CompressionPlan]]) -> list[tuple[str, CompressionPlan]]:
    """The order the warm start's plans run in, which decides what a short --time-budget tries:
    the fast plans of a latency budget first; then two channel plans for each uniform plan, each
    family in its own order; the sensitivity knapsack plan last.

    Every pick of the equal-time benchmarks (LeNet-5 at 100x-300x and the README's 50 KB,
    mnasnet0_5 at 20x and 40x) was a channel plan, and the knapsack plan, tried first until
    then, was never picked; on mnasnet0_5 at 20x it scored the lowest of the six trials that a
    10-minute budget runs, and the channel plan that tested best after 300 s was seventh in line."""
    first = [p for p in plans if p[0].startswith("fast-")]
    last = [p for p in plans if p[0] == "knapsack"]
    channels = iter([p for p in plans if p[0].startswith("channels")])
    uniform = iter([p for p in plans if p[0].startswith("uniform")])
    turns = [p for group in itertools.zip_longest(channels, channels, uniform) for p in group if p is not None]
    placed = first + last + turns
    rest = [p for p in plans if p not in placed]
    return first + turns + rest + last


def finish(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker, parent: str,
           limit: int, timed: tuple[Clock, Speed] | None = None) -> SearchOutcome:
    """After the trials: refine the finalists (for what is left of a time budget, when one is
    set), print the tables, export the best, log the review."""
    if settings.has_final_phase:
        final_phase(study, settings, ctx, tracker, timed)
    best = best_trial(study)
    print_table(study, ctx.original_bytes, limit)
    if len(settings.objectives) > 1:
        front = {t.number for t in pareto_trials(study)}
        print(f"\nPareto front ({' vs '.join(settings.objectives)}), {len(front)} trials:")
        print(format_table([r for r in trial_rows(study, ctx.original_bytes) if r["trial"] in front], top=50))
    outcome = SearchOutcome(study, best, None, None, None, limit, parent)
    if best is not None:
        finish_best(outcome, settings, ctx, tracker)
    else:
        print("no trial met the budget yet: run more trials (--trials) or raise --budget")
    log_review(tracker, outcome, settings.out, settings.register)
    tracker.end(parent, TrialState.COMPLETE)
    return outcome


def final_phase(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, tracker: Tracker,
                timed: tuple[Clock, Speed] | None) -> None:
    """Fine-tune the finalists again: for what is left of a time budget, else for --final-epochs.
    When a trial matched the baseline, it alone goes on, with the time of the trials left unrun."""
    matched = study.user_attrs.get(StudyAttr.MATCHED)
    if timed is not None:
        clock, speed = timed
        seconds = final_seconds(clock, speed, len(ctx.data.test))
        trial_s = trials_finetune_seconds(study.get_trials(deepcopy=False), settings.trial_seconds or 0.0)
        k = finalists_that_fit(seconds, speed, trial_s, 1 if matched else settings.time_finalists)
        if k > 0:
            print(f"final phase: {seconds:.0f}s for the top {k}", flush=True)
            refine_timed(study, settings, ctx, tracker, k, seconds)
        else:
            print(f"final phase skipped: {seconds:.0f}s left is too little to fine-tune the finalists longer than "
                  "their trials; the best trial is exported (give a larger --time-budget)", flush=True)
        return
    k, epochs = settings.final_top, settings.final_epochs
    if matched:  # the finalists' epochs and the trials' left unrun, all to the one that matched
        k, epochs = 1, settings.final_top * settings.final_epochs + matched["trials_left"] * settings.epochs
        print(f"final phase: trial {matched['trial']} alone, {epochs} epochs", flush=True)
    refine(study, settings, ctx, tracker, k, epochs)


def finish_best(outcome: SearchOutcome, settings: SearchSettings, ctx: SearchContext, tracker: Tracker) -> None:
    """Copy the best artifact to OUT/best.acz, load it back and measure test accuracy once."""
    from .artifact import load
    from .train import evaluate

    best = outcome.best
    assert best is not None and outcome.parent_run_id
    src, best_val = best.user_attrs[Attr.ARTIFACT], accuracy(best)
    final = best_final(outcome.study)
    if final is not None:
        number, info = final
        best = outcome.best = next(t for t in outcome.study.trials if t.number == number)
        src, best_val = info["artifact"], info["val_accuracy"]
    outcome.best_val = best_val
    if not os.path.isfile(src):  # another machine of a shared study ran it
        print(f"best: trial {best.number}, val {best_val:.4f}, ran on {best.user_attrs.get(Attr.WORKER, '?')}; "
              f"its artifact is there: {src} (export it on that machine)")
        return
    dst = os.path.join(settings.out, "best.acz")
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    deployed = load(dst)
    outcome.best_path = dst
    outcome.test_accuracy = evaluate(deployed, ctx.data.test, device=settings.device)
    outcome.baseline_test_accuracy = (ctx.baseline_test_acc if ctx.baseline_test_acc is not None
                                      else evaluate(ctx.model, ctx.data.test, device=settings.device))
    size = os.path.getsize(dst)
    tracker.log_metrics(outcome.parent_run_id, {
        "best_val_accuracy": best_val, "best_test_accuracy": outcome.test_accuracy,
        "baseline_test_accuracy": outcome.baseline_test_accuracy, "best_size_bytes": size,
        "best_compression_ratio": ctx.original_bytes / size})
    tracker.set_tags(outcome.parent_run_id, {"best_trial": best.number, "best_artifact": os.path.abspath(dst)})
    tracker.log_text(outcome.parent_run_id, CompressionPlan.from_dict(best.user_attrs[Attr.PLAN]).to_json(),
                     "best_plan.json")
    if ctx.latency is not None:
        from .timing import time_final

        time_final(outcome, settings, ctx, tracker, best, dst)
    print(f"best: trial {best.number}, val {best_val:.4f}, test {outcome.test_accuracy:.4f} "
          f"(baseline test {outcome.baseline_test_accuracy:.4f}), {size} bytes = {format_bytes(size)}, "
          f"{ctx.original_bytes / size:.1f}x -> {dst}")
