"""--time-budget: how one wall-clock budget is split between exploring plans and the final fine-tune.

A user's alternative to searching is to fine-tune one uniform plan for the same minutes, and
fine-tune length moves accuracy more than most allocations do. So with a time budget T the search
spends `explore_share` of T (counted from the start, set-up and warm start included) screening
plans with short fine-tunes of equal length, sized so that the asked number of trials fit, and
the rest fine-tuning the finalists: each for a short equal share, then the best of them for all
that is left (refine.refine_timed). A reserve is kept for writing, loading and testing the pick.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .context import SearchContext
from .models import logits_of
from .settings import SearchSettings
from .train import evaluate

PROBE_STEPS = 3  # timed training steps of the probe (after one warm-up step)
MIN_TRIAL_BATCHES = 10  # a screening fine-tune shorter than this ranks plans by their noise
OVERHEAD_S = 1.0  # per-trial time outside fine-tune and evaluation assumed before any trial ran
FINAL_RESERVE_EVALS = 3  # evaluations' worth of time kept for exporting, loading and testing the pick
REVIEW_RESERVE_S = 3.0  # and for the tables, plots and MLflow review after it


@dataclass
class Speed:
    """Seconds per fine-tune step (with the teacher's forward) and per validation pass."""

    step_s: float
    eval_s: float


@dataclass
class Clock:
    """The phases of a time-budgeted search, as time.monotonic() deadlines."""

    started: float
    budget: float
    explore_share: float

    @property
    def explore_end(self) -> float:
        return self.started + self.budget * self.explore_share

    @property
    def end(self) -> float:
        return self.started + self.budget

    def left(self, until: float | None = None) -> float:
        return max((self.end if until is None else until) - time.monotonic(), 0.0)


def probe_speed(ctx: SearchContext, settings: SearchSettings) -> Speed:
    """Time a few distilled training steps of a copy of the baseline, and one validation pass.

    The compressed models train at about this speed (fake quantisation and masks add a little);
    the probe copy is thrown away, so the baseline is unchanged."""
    model = copy.deepcopy(ctx.model).to(settings.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = list(ctx.data.train.batches(settings.batch_size, shuffle=True, seed=settings.seed,
                                          limit=PROBE_STEPS + 1))
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        x, y = x.to(settings.device), y.to(settings.device)
        with torch.no_grad():
            ctx.model(x)
        loss = nn.functional.cross_entropy(logits_of(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0]
    t0 = time.perf_counter()
    evaluate(ctx.model, ctx.data.val, settings.device)
    return Speed(step_s=step_s, eval_s=time.perf_counter() - t0)


def trial_batches(speed: Speed, seconds: float, trials: int, per_epoch: int, epochs: int) -> int:
    """Fine-tune batches per epoch that let `trials` screening trials of `epochs` epochs fit in
    `seconds` (each also evaluates once per epoch and has some overhead); at least
    MIN_TRIAL_BATCHES, at most a whole epoch."""
    per_trial = seconds / max(trials, 1) - OVERHEAD_S
    epochs = max(epochs, 1)
    batches = int((per_trial / epochs - speed.eval_s) / max(speed.step_s, 1e-9))
    return max(MIN_TRIAL_BATCHES, min(batches, per_epoch))


def final_seconds(clock: Clock, speed: Speed, test_size: int, val_size: int) -> float:
    """Time left for the final fine-tunes: what remains of the budget less the reserve for
    exporting, loading back and testing the pick (a few validation passes' worth, scaled to the
    test split's size)."""
    reserve = FINAL_RESERVE_EVALS * speed.eval_s * max(test_size / max(val_size, 1), 1.0) + REVIEW_RESERVE_S
    return max(clock.left() - reserve, 0.0)


def worth_refining(seconds: float, speed: Speed, batches: int, finalists: int) -> bool:
    """Whether the final phase has time to train each finalist longer than its screening trial
    did (a finalist starts again from the baseline: with less, it would end worse than its trial)."""
    return seconds >= 2 * max(finalists, 1) * (batches * speed.step_s + speed.eval_s)


def describe(clock: Clock, speed: Speed, batches: int, per_epoch: int, trials: int) -> str:
    """One line for the search header: how the budget is split."""
    explore = clock.budget * clock.explore_share
    share = f"{batches / per_epoch:.0%} of an epoch" if batches < per_epoch else "a whole epoch"
    return (f"time budget {_dur(clock.budget)}: up to {_dur(explore)} exploring ({trials} trials, each fine-tuned "
            f"for {batches} batches, {share}; {speed.step_s * 1000:.0f} ms a batch), the rest fine-tuning the "
            "finalists, then the best of them")


def _dur(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"

