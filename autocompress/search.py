"""The search: the one module that wires Optuna, compression, cost, fine-tune, export and tracking.

Per trial: the space proposes a plan; a copy of the baseline is compressed; the artifact size is
computed before any training (an over-budget plan is recorded infeasible through Optuna's
constraints and never fine-tuned); the compressed model is fine-tuned with validation accuracy
reported per epoch (early stopping may end it); the trial's artifact is written and its size
checked against the reported one. Everything is logged to one MLflow child run per trial.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from torch import nn

from .compression import calibrate_model, compress
from .cost import artifact_size, space_untouchable
from .cost.repair import repair
from .refine import best_final, finetune_and_export, refine
from .data import DataBundle
from .errors import UserError
from .heartbeat import StaleTrialCallback, heartbeat_defaults
from .models import ModelSpec
from .plan import Budget, CompressionPlan, format_bytes
from .review import log_review
from .space import BoundSpace
from .tracking import Tracker
from .workers import StudyLock, optimize_shared, rdb_storage, spawn_workers, study_counts, wait_workers

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


class TrialFailed(Exception):
    """A trial that failed for a reason of its own (NaN loss, a plan the model rejects, ...):
    recorded, and the study goes on."""


@dataclass
class SearchSettings:
    """What the user chose for this search (CLI flags or the Python API)."""

    budget: Budget
    out: str = "runs"
    study: str = "autocompress"
    storage: str | None = None
    tracking_uri: str | None = None
    trials: int = 12
    timeout: float | None = None
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    max_batches: int | None = None
    seed: int = 0
    device: str = "cpu"
    early_stopping: bool | str = True  # True/"median", "hyperband", or False/"none"
    progress: bool = True
    repair: bool = True
    objectives: tuple[str, ...] = ("accuracy",)
    warm_start: bool = True
    final_top: int = 3
    final_epochs: int = 2
    final_distill: float = 0.5  # finalists are distilled from the original at least this much
    calib_batches: int = 4
    latency_budget_ms: float | None = None  # predicted before training, the final pick timed for real
    latency_batch_size: int = 1
    latency_threads: int | None = None
    register: str | None = None
    heartbeat_interval: int = field(default_factory=lambda: heartbeat_defaults()[0])
    grace_period: int = field(default_factory=lambda: heartbeat_defaults()[1])

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{os.path.abspath(os.path.join(self.out, 'optuna.db'))}"

    @property
    def artifact_dir(self) -> str:
        return os.path.join(self.out, "artifacts", self.study)


@dataclass
class SearchContext:
    """The fixed inputs every trial shares: the baseline, its data, the bound space."""

    model: nn.Module
    spec: ModelSpec
    data: DataBundle
    space: BoundSpace
    baseline_val_acc: float
    original_bytes: int = 0
    example_input: torch.Tensor = field(default=None)  # type: ignore[assignment]
    calib: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    latency: Any = None  # cost.latency.LatencyPredictor when a latency budget or objective is set


@dataclass
class SearchOutcome:
    study: optuna.Study
    best: optuna.trial.FrozenTrial | None
    best_path: str | None
    test_accuracy: float | None
    baseline_test_accuracy: float | None
    limit: int
    parent_run_id: str | None
    best_val: float | None = None
    latency: Any = None  # cost.latency.LatencyResult of the deployed best model, when timed


def trial_state(t: optuna.trial.FrozenTrial) -> str:
    """complete / infeasible / early-stopped / failed / running, as shown in tables and MLflow."""
    if t.state == optuna.trial.TrialState.COMPLETE:
        return "infeasible" if t.user_attrs.get("infeasible") else "complete"
    return {optuna.trial.TrialState.PRUNED: "early-stopped", optuna.trial.TrialState.FAIL: "failed",
            optuna.trial.TrialState.RUNNING: "running", optuna.trial.TrialState.WAITING: "waiting"}[t.state]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The feasible completed trial with the highest validation accuracy (smaller size breaks ties)."""
    ok = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
          if not t.user_attrs.get("infeasible") and t.values]
    return max(ok, key=lambda t: (accuracy(t), -t.user_attrs.get("size_bytes", 0))) if ok else None


def accuracy(t: optuna.trial.FrozenTrial) -> float:
    """The trial's validation accuracy (its first objective, in single- and multi-objective studies)."""
    return t.values[0]


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Feasible completed trials not dominated in (accuracy up, size down, predicted latency down)."""
    ok = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
          if not t.user_attrs.get("infeasible") and t.values and "size_bytes" in t.user_attrs]
    pts = [(accuracy(t), -t.user_attrs["size_bytes"], -t.user_attrs.get("predicted_latency_ms", 0.0)) for t in ok]
    front = [t for t, p in zip(ok, pts)
             if not any(all(x2 >= x for x2, x in zip(q, p)) and q != p for q in pts)]
    return sorted(front, key=lambda t: -accuracy(t))


def open_study(settings: SearchSettings, create: bool = True) -> optuna.Study:
    """Create or resume the study in its RDB storage (heartbeats let a dead worker's trial be failed)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.storage is None:
        os.makedirs(settings.out, exist_ok=True)
    try:
        storage = rdb_storage(
            settings.storage_url, heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=StaleTrialCallback(settings.tracking_uri or _default_uri(settings)))
    except Exception as e:  # unreachable server, bad URL
        raise UserError(f"cannot open study storage {settings.storage_url}: {str(e).splitlines()[0]}") from None
    sampler = make_sampler(settings, 0)
    pruner = early_stopper(settings.early_stopping, settings.epochs)
    directions = ["maximize"] + ["minimize"] * (len(settings.objectives) - 1)
    if not create:
        try:
            return optuna.load_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise UserError(f"no study named {settings.study!r} in {settings.storage_url}") from None
    return optuna.create_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner,
                               directions=directions, load_if_exists=True)


def early_stopper(kind: bool | str, epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's early stopping of hopeless trials on their per-epoch validation accuracy."""
    if kind in (True, "median"):
        return optuna.pruners.MedianPruner(n_startup_trials=4)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if kind in (False, "none"):
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown early stopping {kind!r}: use median, hyperband or none")


def make_sampler(settings: SearchSettings, trial_number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded with seed + trial number: a run repeats itself, and workers sharing a study
    (same --seed) still propose different plans. TPE keeps no state beyond its random generator."""
    return optuna.samplers.TPESampler(seed=settings.seed + trial_number,
                                      n_startup_trials=min(8, max(settings.trials // 3, 2)))


class Objective:
    """One Optuna trial: plan -> compress -> size (-> repair) -> (infeasible | fine-tune -> export)."""

    def __init__(self, settings: SearchSettings, ctx: SearchContext, tracker: Tracker, limit: int) -> None:
        self.s, self.ctx, self.tracker, self.limit = settings, ctx, tracker, limit
        os.makedirs(settings.artifact_dir, exist_ok=True)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        acc, size = self._run(trial)
        values = {"accuracy": acc, "size": float(size), "latency": trial.user_attrs.get("predicted_latency_ms", 0.0)}
        return acc if len(self.s.objectives) == 1 else tuple(values[o] for o in self.s.objectives)

    def _run(self, trial: optuna.Trial) -> tuple[float, int]:
        start = time.perf_counter()
        torch.manual_seed(self.s.seed + trial.number)
        proposed = self.ctx.space.suggest(trial)
        plan, compressed, size, error = proposed, None, 0, None
        try:
            plan, compressed, size = self._fit(proposed)
        except Exception as e:  # recorded below, in the trial's own run
            error = e
        run_id = self.tracker.start_trial(trial.number, _run_params(plan, self.s), plan.to_dict())
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("plan", plan.to_dict())
        if plan is not proposed:
            trial.set_user_attr("repaired", True)
            trial.set_user_attr("proposed_plan", proposed.to_dict())
            self.tracker.set_tags(run_id, {"repaired": "true"})
            self.tracker.log_text(run_id, proposed.to_json(), "proposed_plan.json")
        state, finetune_s = "failed", 0.0
        try:
            if error is not None:
                raise error
            assert compressed is not None
            ratio = self.ctx.original_bytes / size
            trial.set_user_attr("size_bytes", size)
            trial.set_user_attr("ratio", ratio)
            trial.set_user_attr("constraint", float(size - self.limit))
            trial.set_constraint("size_over_budget", float(size - self.limit))
            self.tracker.log_metrics(run_id, {"size_bytes": size, "compression_ratio": ratio})
            slow = self._record_latency(trial, run_id, compressed)
            self.tracker.set_tags(run_id, {"budget_met": str(size <= self.limit and not slow).lower()})
            if size > self.limit or slow:
                state = "infeasible"
                trial.set_user_attr("infeasible", True)
                return 0.0, size
            path = os.path.join(self.s.artifact_dir, f"trial-{trial.number}.acz")
            result = finetune_and_export(compressed, plan, size, path, self.s, self.ctx, epochs=self.s.epochs,
                                         max_batches=self.s.max_batches, report=self._reporter(trial, run_id))
            finetune_s = result.seconds + result.eval_seconds
            for epoch, loss in enumerate(result.train_loss):
                self.tracker.log_metrics(run_id, {"train_loss": loss}, step=epoch + 1)
            trial.set_user_attr("artifact", os.path.abspath(path))
            acc = result.val_acc[-1]
            self.tracker.log_metrics(run_id, {"val_accuracy_final": acc})
            state = "complete"
            return acc, size
        except optuna.TrialPruned:
            state = "early-stopped"
            raise
        except KeyboardInterrupt:
            state = "interrupted"
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            trial.set_user_attr("fail_reason", reason)
            self.tracker.set_tags(run_id, {"fail_reason": reason})
            raise TrialFailed(reason) from e
        finally:
            seconds = time.perf_counter() - start
            trial.set_user_attr("seconds", seconds)
            trial.set_user_attr("overhead_seconds", seconds - finetune_s)
            self.tracker.log_metrics(run_id, {"trial_seconds": seconds, "overhead_seconds": seconds - finetune_s})
            self.tracker.end(run_id, state)

    def predicted_latency(self, compressed: nn.Module) -> float:
        """Predicted latency (ms) of the deployed form of a compressed model: no timing run."""
        from .cost.profile import plan_rows

        return self.ctx.latency.predict_rows(plan_rows(compressed, self.ctx.example_input, self.s.device))

    def _record_latency(self, trial: optuna.Trial, run_id: str, compressed: nn.Module) -> bool:
        """Log the predicted latency and its constraint; True when it is over the latency budget."""
        if self.ctx.latency is None:
            return False
        ms = self.predicted_latency(compressed)
        trial.set_user_attr("predicted_latency_ms", ms)
        self.tracker.log_metrics(run_id, {"predicted_latency_ms": ms})
        if self.s.latency_budget_ms is None:
            return False
        trial.set_constraint("latency_over_budget", ms - self.s.latency_budget_ms)
        return ms > self.s.latency_budget_ms

    def _load(self, plan: CompressionPlan) -> float:
        """Largest share of a budget a plan uses (size, and predicted latency): <= 1 fits both."""
        compressed, size = self._size(plan)
        load = size / self.limit
        if self.s.latency_budget_ms is not None:
            load = max(load, self.predicted_latency(compressed) / self.s.latency_budget_ms)
        return load

    def _size(self, plan: CompressionPlan) -> tuple[nn.Module, int]:
        """(compressed model, artifact bytes), uncalibrated: the bytes do not depend on calibration."""
        compressed = compress(self.ctx.model, plan, self.ctx.example_input, self.ctx.calib, calibrate=False)
        return compressed, artifact_size(compressed, self.ctx.spec)

    def _fit(self, proposed: CompressionPlan) -> tuple[CompressionPlan, nn.Module, int]:
        """Compress the proposal; if it is over budget (and repair is on), tighten it into the budget.
        Plans are sized uncalibrated; only the one returned is calibrated (BN statistics, activation
        ranges), so an over-budget proposal costs no calibration passes."""
        compressed, size = self._size(proposed)
        latency_ok = self.s.latency_budget_ms is None or self.predicted_latency(compressed) <= self.s.latency_budget_ms
        plan, fits = proposed, size <= self.limit and latency_ok
        if not fits and self.s.repair:
            fixed = repair(proposed, self.ctx.space.layers, self._load, 1.0)  # share of the budget(s) used <= 1
            if fixed is not None:
                plan, fits = fixed, True
                compressed, size = self._size(fixed)
        if fits:  # an infeasible plan is recorded, never trained
            calibrate_model(compressed, self.ctx.calib)
        return plan, compressed, size

    def _reporter(self, trial: optuna.Trial, run_id: str) -> Any:
        last_epoch = self.s.epochs  # finetune reports epochs 1..E (or 0 when E == 0)

        def report(acc: float, epoch: int) -> None:
            self.tracker.log_metrics(run_id, {"val_accuracy": acc}, step=epoch)
            if not math.isfinite(acc):
                raise TrialFailed("validation accuracy is not finite")
            if len(self.s.objectives) > 1:  # Optuna's early stopping is single-objective only
                curve = {**trial.user_attrs.get("val_by_epoch", {}), str(epoch): acc}
                trial.set_user_attr("val_by_epoch", curve)
                if epoch < last_epoch and self.s.early_stopping not in (False, "none") and dominated_early(trial, acc, epoch):
                    raise optuna.TrialPruned(f"val accuracy {acc:.4f} after epoch {epoch} is dominated")
                return
            trial.report(acc, epoch)
            if epoch < last_epoch and trial.should_prune():
                raise optuna.TrialPruned(f"val accuracy {acc:.4f} after epoch {epoch}")
        return report


def dominated_early(trial: optuna.Trial, acc: float, epoch: int, margin: float = 0.02) -> bool:
    """Multi-objective early stop: some finished trial no larger than this one was already more
    than `margin` more accurate at the same epoch, so this trial is unlikely to reach the front."""
    size = trial.user_attrs.get("size_bytes", float("inf"))
    for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        other = t.user_attrs.get("val_by_epoch", {}).get(str(epoch))
        if other is not None and t.user_attrs.get("size_bytes", float("inf")) <= size and other > acc + margin:
            return True
    return False


def _run_params(plan: CompressionPlan, s: SearchSettings) -> dict[str, Any]:
    return {**plan.summary(), "epochs": s.epochs, "lr": s.lr}


def resume_cleanup(study: optuna.Study, tracker: Tracker) -> int:
    """Fail trials whose worker died (no heartbeat) and close their MLflow runs."""
    optuna.storages.fail_stale_trials(study)
    dead = [t.user_attrs["mlflow_run_id"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
            if "mlflow_run_id" in t.user_attrs]
    return tracker.close_stale(dead)


def run_search(settings: SearchSettings, ctx: SearchContext, workers: int = 1,
               worker_args: dict[str, Any] | None = None) -> SearchOutcome:
    """Run (or resume) the study until it holds `settings.trials` counted trials or time runs out.

    With workers > 1, that many worker processes (started with `worker_args`, the search() call)
    share the study and log their trials under this invocation's one parent run.
    """
    from .report import print_table

    limit = settings.budget.limit(ctx.original_bytes)
    study = open_study(settings)
    _check_same_study(study, settings, ctx, limit)
    study.set_user_attr("baseline", {"val_accuracy": ctx.baseline_val_acc, "fp32_bytes": ctx.original_bytes})
    tracker = _tracker(settings)
    closed = resume_cleanup(study, tracker)
    parent = tracker.start_parent(f"search-{time.strftime('%Y%m%d-%H%M%S')}", {
        "budget": str(settings.budget), "budget_bytes": limit, "model": ctx.spec.spec, "data": ctx.data.name,
        "trials": settings.trials, "epochs": settings.epochs, "seed": settings.seed, "device": settings.device,
        "space_params": len(ctx.space.param_names()), "workers": workers,
    })
    tracker.log_metrics(parent, {"baseline_val_accuracy": ctx.baseline_val_acc,
                                 "baseline_fp32_bytes": ctx.original_bytes})
    tracker.log_text(parent, _space_yaml(ctx.space), "search_space.json")
    done, running = study_counts(study)
    remaining = max(settings.trials - done, 0)
    study.set_user_attr("untouchable_bytes", space_untouchable(ctx.model, ctx.space, ctx.spec, ctx.example_input))
    print(f"study {settings.study}: {done} trials done, {remaining} to run"
          + (f" ({running} running elsewhere)" if running else "")
          + f"; budget {format_bytes(limit)} "
          f"({ctx.original_bytes / limit:.1f}x of {format_bytes(ctx.original_bytes)} fp32)"
          + f"; {format_bytes(study.user_attrs['untouchable_bytes'])} no plan can touch"
          + (f"; {workers} workers" if workers > 1 else "")
          + (f"; closed {closed} run(s) left by a killed search" if closed else ""), flush=True)
    if settings.warm_start and not study.get_trials(deepcopy=False) and remaining:
        _enqueue_warm_start(study, settings, ctx, Objective(settings, ctx, tracker, limit), tracker, parent, limit,
                            remaining)
    try:
        if workers > 1 and remaining > 0:
            codes = wait_workers(spawn_workers(worker_args or {}, workers, parent))
            bad = [f"worker {i}: exit {c}" for i, c in enumerate(codes) if c != 0]
            if bad:
                print(f"some workers did not end cleanly ({', '.join(bad)}); their trials are retried "
                      "by the others or by the next run")
        else:
            _optimize(settings, ctx, study, tracker, limit, remaining)
    except KeyboardInterrupt:
        print("interrupted: the current trial is recorded as interrupted; run the same command to resume")
        tracker.end(parent, "interrupted")
        raise
    if settings.final_top > 0 and settings.final_epochs > 0:
        refine(study, settings, ctx, tracker, settings.final_top, settings.final_epochs)
    best = best_trial(study)
    print_table(study, ctx.original_bytes, limit)
    if len(settings.objectives) > 1:
        from .report import format_table, trial_rows

        front = {t.number for t in pareto_trials(study)}
        print(f"\nPareto front ({' vs '.join(settings.objectives)}), {len(front)} trials:")
        print(format_table([r for r in trial_rows(study, ctx.original_bytes) if r["trial"] in front], top=50))
    outcome = SearchOutcome(study, best, None, None, None, limit, parent)
    if best is not None:
        _finish_best(outcome, settings, ctx, tracker)
    else:
        print("no trial met the budget yet: run more trials (--trials) or raise --budget")
    log_review(tracker, outcome, settings.out, settings.register)
    tracker.end(parent, "complete")
    return outcome


def run_worker(settings: SearchSettings, ctx: SearchContext, parent_run_id: str) -> int:
    """One worker process of `--workers N`: runs trials of the (existing) study under the given parent run."""
    limit = settings.budget.limit(ctx.original_bytes)
    study = open_study(settings, create=False)
    tracker = _tracker(settings)
    tracker.parent_id = parent_run_id
    return _optimize(settings, ctx, study, tracker, limit, 0)


def _optimize(settings: SearchSettings, ctx: SearchContext, study: optuna.Study, tracker: Tracker, limit: int,
              remaining: int) -> int:
    """Take trials of the shared study until it is complete (see workers.optimize_shared)."""
    objective = Objective(settings, ctx, tracker, limit)
    bar = _progress(remaining, settings.progress)
    try:
        return optimize_shared(study, objective, settings.trials, StudyLock(settings.storage_url, settings.study),
                               timeout=settings.timeout, catch=(TrialFailed,),
                               callbacks=[_trial_printer(bar, ctx.original_bytes)],
                               poll=min(2.0, settings.heartbeat_interval),
                               sampler_for=lambda n: make_sampler(settings, n))
    finally:
        if bar is not None:
            bar.close()


def _tracker(settings: SearchSettings) -> Tracker:
    return Tracker(settings.tracking_uri or _default_uri(settings), settings.study,
                   os.path.join(settings.out, "mlartifacts"))


def _enqueue_warm_start(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, objective: Objective,
                        tracker: Tracker, parent: str, limit: int, remaining: int) -> None:
    """Sensitivity analysis (cached per weights), then the uniform and knapsack plans as first trials."""
    from .sensitivity import cached_analyse
    from .warmstart import to_params, warm_start_plans

    t0 = time.perf_counter()
    sens, cache, cached = cached_analyse(ctx.model, ctx.data.val, ctx.example_input,
                                         os.path.join(settings.out, "sensitivity"), device=settings.device,
                                         progress=settings.progress)
    print(f"sensitivity ({'cached' if cached else f'{time.perf_counter() - t0:.1f}s'}): most fragile first: "
          + ", ".join(sens.ranking()[:5]))
    tracker.log_file(parent, cache)
    study.set_user_attr("sensitivity", sens.table())  # the heat map of the review
    plans = warm_start_plans(ctx.model, ctx.space.layers, lambda p: objective._size(p)[1], limit, sens)
    plans = sorted(plans, key=lambda np_: np_[0] != "knapsack")[:remaining]  # never more than the trials asked
    for name, plan in plans:
        params = to_params(plan, ctx.space.layers)
        if params is not None:
            study.enqueue_trial(params, user_attrs={"warm_start": name}, skip_if_exists=True)
    print(f"warm start: {', '.join(n for n, _ in plans) or 'no plan fits'}")


def _finish_best(outcome: SearchOutcome, settings: SearchSettings, ctx: SearchContext, tracker: Tracker) -> None:
    """Copy the best artifact to OUT/best.acz, load it back and measure test accuracy once."""
    from .artifact import load
    from .train import evaluate

    best = outcome.best
    assert best is not None and outcome.parent_run_id
    src, best_val = best.user_attrs["artifact"], accuracy(best)
    final = best_final(outcome.study)
    if final is not None:
        number, info = final
        best = outcome.best = next(t for t in outcome.study.trials if t.number == number)
        src, best_val = info["artifact"], info["val_accuracy"]
    outcome.best_val = best_val
    if not os.path.isfile(src):  # another machine of a shared study ran it
        print(f"best: trial {best.number}, val {best_val:.4f}, ran on {best.user_attrs.get('worker', '?')}; "
              f"its artifact is there: {src} (export it on that machine)")
        return
    dst = os.path.join(settings.out, "best.acz")
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    deployed = load(dst)
    outcome.best_path = dst
    outcome.test_accuracy = evaluate(deployed, ctx.data.test, device=settings.device)
    outcome.baseline_test_accuracy = evaluate(ctx.model, ctx.data.test, device=settings.device)
    size = os.path.getsize(dst)
    tracker.log_metrics(outcome.parent_run_id, {
        "best_val_accuracy": best_val, "best_test_accuracy": outcome.test_accuracy,
        "baseline_test_accuracy": outcome.baseline_test_accuracy, "best_size_bytes": size,
        "best_compression_ratio": ctx.original_bytes / size})
    tracker.set_tags(outcome.parent_run_id, {"best_trial": best.number, "best_artifact": os.path.abspath(dst)})
    tracker.log_text(outcome.parent_run_id, CompressionPlan.from_dict(best.user_attrs["plan"]).to_json(),
                     "best_plan.json")
    if ctx.latency is not None:
        from .timing import time_final

        time_final(outcome, settings, ctx, tracker, best, dst)
    print(f"best: trial {best.number}, val {best_val:.4f}, test {outcome.test_accuracy:.4f} "
          f"(baseline test {outcome.baseline_test_accuracy:.4f}), {size} bytes = {format_bytes(size)}, "
          f"{ctx.original_bytes / size:.1f}x -> {dst}")


def _check_same_study(study: optuna.Study, settings: SearchSettings, ctx: SearchContext, limit: int) -> None:
    """A resumed study must keep its budget, model and space: TPE assumes one fixed objective."""
    key = {"budget_bytes": limit, "model": ctx.spec.spec, "data": ctx.data.name,
           "params": ctx.space.param_names(), "objectives": list(settings.objectives)}
    if settings.latency_budget_ms is not None:
        key["latency_budget_ms"] = settings.latency_budget_ms
    old = study.user_attrs.get("identity")
    if old is None:
        study.set_user_attr("identity", key)
    elif old != key:
        diff = [k for k in key if old.get(k) != key[k]]
        raise UserError(f"study {settings.study!r} was created with a different {', '.join(diff)}; "
                        "use another --study name")


def _default_uri(settings: SearchSettings) -> str:
    from .tracking import default_tracking_uri

    return default_tracking_uri(settings.out)


def _space_yaml(space: BoundSpace) -> str:
    import json

    return json.dumps({n: {k: c.to_obj() for k, c in ch.items()} for n, ch in space.layers.items()}, indent=1)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True)


def _trial_printer(bar: Any, original_bytes: int) -> Any:
    def callback(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        size = t.user_attrs.get("size_bytes")
        line = f"trial {t.number:3d} {trial_state(t):13s}"
        if t.values and not t.user_attrs.get("infeasible"):
            line += f" val {accuracy(t):.4f}"
        if size:
            line += f"  {format_bytes(size):>9s} {original_bytes / size:6.1f}x"
        line += f"  {t.user_attrs.get('seconds', 0):5.1f}s"
        if "fail_reason" in t.user_attrs:
            line += f"  ({t.user_attrs['fail_reason']})"
        best = best_trial(study)
        if bar is not None:
            bar.write(line)
            bar.update(1)
            if best is not None:
                bar.set_postfix(best=f"{accuracy(best):.4f}", size=format_bytes(best.user_attrs['size_bytes']))
        else:
            print(line)
    return callback
