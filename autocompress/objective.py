"""One Optuna trial: plan -> compress -> size (-> repair) -> (infeasible | fine-tune -> export).

The artifact size is computed before any training: an over-budget plan is recorded infeasible
through Optuna's constraints and never fine-tuned. The compressed model is fine-tuned with
validation accuracy reported per epoch (early stopping may end it); the trial's artifact is
written and its size checked against the reported one. Each trial logs to one MLflow child run.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from typing import Any, Callable

import optuna
import torch
from torch import nn

from .compression import calibrate_model, compress
from .context import SearchContext
from .cost import artifact_size
from .cost.repair import repair
from .memory import collect
from .plan import CompressionPlan
from .refine import finetune_and_export
from .settings import SearchSettings
from .space import BoundSpace, SearchSpace
from .timebudget import trial_length
from .tracking import Tracker
from .trials import TS, Attr, TrialState

KEEP_MAX_BYTES = 1 << 30  # parameter bytes of the trial models kept for the final phase, all together


class TrialFailed(Exception):
    """A trial that failed for a reason of its own (NaN loss, a plan the model rejects, ...):
    recorded, and the study goes on."""


class FailedTrialEcho(logging.Filter):
    """Drops Optuna's own report of a TrialFailed: every parameter of the trial (a thousand for a
    200-layer model) and a traceback, where the trial line already says in one line that it failed
    and why. Failures of any other kind keep Optuna's report and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if isinstance(exc, TrialFailed):  # "Trial N failed with parameters: ..."
            self.number = message.split(" ", 2)[1]
            return False
        return message != f"Trial {getattr(self, 'number', None)} failed with value None."  # its echo


def quiet_failed_trials() -> None:
    """Put FailedTrialEcho on the logger Optuna reports failed trials with (once per process)."""
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, FailedTrialEcho) for f in logger.filters):
        logger.addFilter(FailedTrialEcho())


def sized(ctx: SearchContext, plan: CompressionPlan) -> tuple[nn.Module, int]:
    """(compressed model, artifact bytes) of a plan, uncalibrated: the bytes do not depend on
    calibration. Used by the objective, repair and the warm start's bisections, dozens of times
    in a row: the copies of earlier calls (and the last trial's model and optimiser state, since a
    trial sizes its proposal first) are freed first (memory.collect)."""
    collect()
    compressed = compress(ctx.model, plan, ctx.example_input, ctx.calib, calibrate=False)
    return compressed, artifact_size(compressed, ctx.spec)


def as_trial(space: SearchSpace | BoundSpace, plan: CompressionPlan) -> CompressionPlan:
    """`plan` with the width its trial will store the other float tensors at (biases, BatchNorm):
    the space's recovery.float_bits, the widest of its values when it is searched, so that a plan
    sized here is never larger as a trial. A plan made outside the space (the warm start's, the
    uniform arm of bench/equal_time) has the default 32 bits, and the default space stores them at
    16: on mnasnet0_5 the warm start's uniform plan was fitted to 95 KB of a 95 KB budget and ran
    as a 74 KB trial."""
    choice = space.recovery.get("float_bits")
    return plan if choice is None else replace(plan, float_bits=int(choice.extreme(largest=True)))


def predicted_latency(ctx: SearchContext, device: str, compressed: nn.Module) -> float:
    """Predicted latency (ms) of the deployed form of a compressed model: no timing run."""
    from .cost.profile import plan_rows

    assert ctx.latency is not None
    return ctx.latency.predict_rows(plan_rows(compressed, ctx.example_input, device))


def budget_load(ctx: SearchContext, settings: SearchSettings, plan: CompressionPlan, limit: int) -> float:
    """Largest share of a budget a plan uses (its bytes of `limit`, and its predicted latency of
    the latency budget when there is one): <= 1 fits both. Repair and the warm start's fast plans
    fit plans by it."""
    compressed, size = sized(ctx, plan)
    load = size / limit
    if settings.latency_budget_ms is not None:
        load = max(load, predicted_latency(ctx, settings.device, compressed) / settings.latency_budget_ms)
    return load


class Objective:
    """The trial function Optuna calls: returns validation accuracy (and size / predicted latency
    for a multi-objective study)."""

    def __init__(self, settings: SearchSettings, ctx: SearchContext, tracker: Tracker, limit: int) -> None:
        self.s, self.ctx, self.tracker, self.limit = settings, ctx, tracker, limit
        self.overheads: list[float] = []  # seconds outside fine-tune and evaluation, per fine-tuned trial
        os.makedirs(settings.artifact_dir, exist_ok=True)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        acc, size = self._run(trial)
        values = {"accuracy": acc, "size": float(size),
                  "latency": trial.user_attrs.get(Attr.PREDICTED_LATENCY_MS, 0.0)}
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
        run_id = self.tracker.start_trial(trial.number, run_params(plan, self.s), plan.to_dict())
        trial.set_user_attr(Attr.MLFLOW_RUN_ID, run_id)
        trial.set_user_attr(Attr.PLAN, plan.to_dict())
        if plan is not proposed:
            trial.set_user_attr(Attr.REPAIRED, True)
            trial.set_user_attr(Attr.PROPOSED_PLAN, proposed.to_dict())
            self.tracker.set_tags(run_id, {"repaired": "true"})
            self.tracker.log_text(run_id, proposed.to_json(), "proposed_plan.json")
        state, finetune_s = TrialState.FAILED, 0.0
        metrics: dict[str, float] = {}
        series: dict[str, list[float]] = {}
        tags: dict[str, str] = {}
        try:
            if error is not None:
                raise error
            assert compressed is not None
            ratio = self.ctx.original_bytes / size
            trial.set_user_attr(Attr.SIZE_BYTES, size)
            trial.set_user_attr(Attr.RATIO, ratio)
            trial.set_user_attr(Attr.CONSTRAINT, float(size - self.limit))
            trial.set_constraint("size_over_budget", float(size - self.limit))
            ms = self._record_latency(trial, compressed)
            slow = ms is not None and self.s.latency_budget_ms is not None and ms > self.s.latency_budget_ms
            self.tracker.log(run_id, {"size_bytes": size, "compression_ratio": ratio, "predicted_latency_ms": ms},
                             {"budget_met": str(size <= self.limit and not slow).lower()})
            if size > self.limit or slow:
                state = TrialState.INFEASIBLE
                trial.set_user_attr(Attr.INFEASIBLE, True)
                return 0.0, size
            path = os.path.join(self.s.artifact_dir, f"trial-{trial.number}.acz")
            seconds = None if self.s.trial_seconds is None else trial_length(self.s.trial_seconds, self.overheads)
            result = finetune_and_export(compressed, plan, size, path, self.s, self.ctx, epochs=self.s.epochs,
                                         max_batches=self.s.max_batches, report=self._reporter(trial, run_id),
                                         val=self.ctx.screen_val, seconds=seconds)
            finetune_s = result.seconds + result.eval_seconds
            series["train_loss"] = result.train_loss
            trial.set_user_attr(Attr.ARTIFACT, os.path.abspath(path))
            acc = result.val_acc[-1]
            metrics["val_accuracy_final"] = acc
            state = TrialState.COMPLETE
            if seconds is not None or self.s.final_epochs > 0:  # a final phase will go on training it
                keep_for_final(self.ctx.trained, trial.number, acc, size, compressed,
                               self.s.final_top if seconds is None else self.s.time_finalists)
            return acc, size
        except optuna.TrialPruned:
            state = TrialState.EARLY_STOPPED
            raise
        except KeyboardInterrupt:
            state = TrialState.INTERRUPTED
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            trial.set_user_attr(Attr.FAIL_REASON, reason)
            tags["fail_reason"] = reason
            raise TrialFailed(reason) from e
        finally:
            total = time.perf_counter() - start
            trial.set_user_attr(Attr.SECONDS, total)
            trial.set_user_attr(Attr.OVERHEAD_SECONDS, total - finetune_s)
            if finetune_s > 0:
                self.overheads.append(total - finetune_s)
            self.tracker.end(run_id, state, {**metrics, "trial_seconds": total, "overhead_seconds": total - finetune_s},
                             tags, series)

    def _latency(self, compressed: nn.Module) -> float:
        return predicted_latency(self.ctx, self.s.device, compressed)

    def _record_latency(self, trial: optuna.Trial, compressed: nn.Module) -> float | None:
        """The predicted latency (ms; None without a latency model), recorded with its constraint."""
        if self.ctx.latency is None:
            return None
        ms = self._latency(compressed)
        trial.set_user_attr(Attr.PREDICTED_LATENCY_MS, ms)
        if self.s.latency_budget_ms is not None:
            trial.set_constraint("latency_over_budget", ms - self.s.latency_budget_ms)
        return ms

    def _load(self, plan: CompressionPlan) -> float:
        return budget_load(self.ctx, self.s, plan, self.limit)

    def _fit(self, proposed: CompressionPlan) -> tuple[CompressionPlan, nn.Module, int]:
        """Compress the proposal; if it is over budget (and repair is on), tighten it into the budget.
        Plans are sized uncalibrated; only the one returned is calibrated (BN statistics, activation
        ranges), so an over-budget proposal costs no calibration passes."""
        compressed, size = sized(self.ctx, proposed)
        latency_ok = self.s.latency_budget_ms is None or self._latency(compressed) <= self.s.latency_budget_ms
        plan, fits = proposed, size <= self.limit and latency_ok
        if not fits and self.s.repair:
            fixed = repair(proposed, self.ctx.space.layers, self._load, 1.0)  # share of the budget(s) used <= 1
            if fixed is not None:
                plan, fits = fixed, True
                compressed, size = sized(self.ctx, fixed)
        if fits:  # an infeasible plan is recorded, never trained
            calibrate_model(compressed, self.ctx.calib, self.ctx.model)
        return plan, compressed, size

    def _reporter(self, trial: optuna.Trial, run_id: str) -> Callable[[float, int], None]:
        last_epoch = self.s.epochs  # finetune reports epochs 1..E (or 0 when E == 0)

        def report(acc: float, epoch: int) -> None:
            self.tracker.log_metrics(run_id, {"val_accuracy": acc}, step=epoch)
            if not math.isfinite(acc):
                raise TrialFailed("validation accuracy is not finite")
            if len(self.s.objectives) > 1:  # Optuna's early stopping is single-objective only
                curve = {**trial.user_attrs.get(Attr.VAL_BY_EPOCH, {}), str(epoch): acc}
                trial.set_user_attr(Attr.VAL_BY_EPOCH, curve)
                if epoch < last_epoch and self.s.early_stopping != "none" and dominated_early(trial, acc, epoch):
                    raise optuna.TrialPruned(f"val accuracy {acc:.4f} after epoch {epoch} is dominated")
                return
            trial.report(acc, epoch)
            if epoch < last_epoch and trial.should_prune():
                raise optuna.TrialPruned(f"val accuracy {acc:.4f} after epoch {epoch}")
        return report


def keep_for_final(kept: dict[int, tuple[float, int, nn.Module]], number: int, acc: float, size: int,
                   model: nn.Module, top: int) -> None:
    """Keep trial `number`'s fine-tuned model while it is among the `top` most accurate (the
    smaller breaks ties, as trials.finalists ranks them): the finalists then go on training their
    trial's fine-tune instead of starting again from the baseline, which spent a finalist's first
    share (or first epoch) relearning what its trial had learnt. Not kept when `top`
    models would hold more than KEEP_MAX_BYTES of parameters."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if top <= 0 or params * top > KEEP_MAX_BYTES or not math.isfinite(acc):
        return
    kept[number] = (acc, size, model)
    ranked = sorted(kept, key=lambda n: (-kept[n][0], kept[n][1]))
    for n in ranked[top:]:
        del kept[n]


def dominated_early(trial: optuna.Trial, acc: float, epoch: int, margin: float = 0.02) -> bool:
    """Multi-objective early stop: some finished trial no larger than this one was already more
    than `margin` more accurate at the same epoch, so this trial is unlikely to reach the front."""
    size = trial.user_attrs.get(Attr.SIZE_BYTES, float("inf"))
    for t in trial.study.get_trials(deepcopy=False, states=(TS.COMPLETE,)):
        other = t.user_attrs.get(Attr.VAL_BY_EPOCH, {}).get(str(epoch))
        if other is not None and t.user_attrs.get(Attr.SIZE_BYTES, float("inf")) <= size and other > acc + margin:
            return True
    return False


def run_params(plan: CompressionPlan, s: SearchSettings) -> dict[str, Any]:
    """The MLflow params of a trial's run: the plan's summary and the fine-tune settings."""
    return {**plan.summary(), "epochs": s.epochs, "lr": s.lr}
