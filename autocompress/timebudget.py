"""--time-budget: how one wall-clock budget is split between exploring plans and the final fine-tune.

A user's alternative to searching is to fine-tune one uniform plan for the same minutes, and
fine-tune length moves accuracy more than most allocations do. So with a time budget T (counted
from the start of the search) the search, once set up, spends `explore_share` of what is left
screening plans with fine-tunes of equal (short) time, sized so that the asked number of trials
fit, and the rest fine-tuning the best of them for all that is left (or, with --time-finalists
N, the N best for a short equal share each, then the best of those: refine.refine_timed). A
reserve is kept for writing, loading and testing the pick, and for the review.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import optuna
import torch
from torch import nn

from .context import SearchContext
from .data import TensorData
from .models import logits_of
from .settings import SearchSettings
from .train import evaluate
from .trials import finetune_seconds

PROBE_STEPS = 3  # timed training steps of the probe (after one warm-up step)
SCREEN_VAL_SAMPLES = 2000  # validation samples that score a screening trial (stratified, fixed)
OVERHEAD_S = 0.25  # per-trial time outside fine-tune, evaluation and calibration (LeNet-5 on this CPU: 0.15-0.5 s)
CALIB_PASSES = 3  # forwards of each calibration batch per trial: BN statistics, the refit's two passes
MAX_OVERHEAD = 0.05  # of a screening trial's time
MIN_TRIAL_S = (1 / MAX_OVERHEAD - 1) * OVERHEAD_S  # shortest screening fine-tune
FINAL_RESERVE_EVALS = 3  # evaluations' worth of time kept for exporting, loading and testing the pick
REVIEW_RESERVE_S = 5.0  # and for the tables, plots and MLflow review after it


@dataclass
class Speed:
    """Seconds per fine-tune step (with the teacher's forward), per forward of one batch (the
    teacher's) and per evaluation of `eval_samples`; the baseline's accuracy in that evaluation
    (what a trial must match to stop exploring, orchestrate.reference_accuracy)."""

    step_s: float
    eval_s: float
    eval_samples: int = 1
    forward_s: float = 0.0
    val_accuracy: float | None = None


@dataclass
class Clock:
    """The phases of a time-budgeted search, as time.monotonic() deadlines."""

    started: float
    budget: float
    explore_share: float
    explore_end: float = 0.0  # set by start_exploring

    def start_exploring(self) -> None:
        """Set-up (data, baseline check, MLflow and Optuna stores, sensitivity, warm start) is done:
        explore for `explore_share` of what is left, so a slow set-up does not eat the exploring
        share alone."""
        self.explore_end = time.monotonic() + self.left() * self.explore_share

    @property
    def end(self) -> float:
        return self.started + self.budget

    def left(self, until: float | None = None) -> float:
        return max((self.end if until is None else until) - time.monotonic(), 0.0)


def screening_split(val: TensorData, seed: int) -> TensorData | None:
    """The fixed, stratified validation subset that scores screening trials (None: use all of
    it). At a fraction of an epoch of fine-tuning, a full evaluation would cost as much as the
    training; the finalists and the pick are scored on the whole split."""
    return val.subset(SCREEN_VAL_SAMPLES, seed=seed) if len(val) > SCREEN_VAL_SAMPLES else None


def probe_speed(ctx: SearchContext, settings: SearchSettings, val: TensorData | None = None) -> Speed:
    """Time a few distilled training steps of a copy of the baseline, and one pass over `val`
    (default: the validation split).

    The compressed models train at about this speed (fake quantisation and masks add a little);
    the probe copy is thrown away, so the baseline is unchanged."""
    model = copy.deepcopy(ctx.model).to(settings.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = list(ctx.data.train.batches(settings.batch_size, shuffle=True, seed=settings.seed,
                                          limit=PROBE_STEPS + 1))
    times, forwards = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        x, y = x.to(settings.device), y.to(settings.device)
        with torch.no_grad():
            ctx.model(x)
        forwards.append(time.perf_counter() - t0)
        loss = nn.functional.cross_entropy(logits_of(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_s, forward_s = _after_warm_up(times), _after_warm_up(forwards)
    val = ctx.data.val if val is None else val
    t0 = time.perf_counter()
    acc = evaluate(ctx.model, val, settings.device)
    return Speed(step_s=step_s, eval_s=time.perf_counter() - t0, eval_samples=len(val), forward_s=forward_s,
                 val_accuracy=acc)


def _after_warm_up(times: list[float]) -> float:
    """The mean of timings without the first (warm-up) one, unless it is the only one."""
    return sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]


def overhead_estimate(speed: Speed, calib_batches: int) -> float:
    """A trial's seconds outside its fine-tune and evaluation, before any trial has measured them:
    the fixed part (proposing, sizing, Optuna's and MLflow's writes, the artifact) and the
    calibration passes of the compressed model, which grow with the model (mnasnet0_5 on one CPU
    thread: 1.5-2 s, where LeNet-5 takes 0.3 s). Without it the first trials of a deep model were
    planned as if it were LeNet-5, and spent 15-18% of their time outside the fine-tune."""
    return OVERHEAD_S + CALIB_PASSES * calib_batches * speed.forward_s


def trial_seconds(speed: Speed, seconds: float, trials: int, overhead: float = OVERHEAD_S) -> float:
    """Fine-tune seconds of each screening trial, so that `trials` of them (each with its
    evaluation and `overhead`) fit in `seconds`; at least long enough that the overhead is
    MAX_OVERHEAD of the trial (MIN_TRIAL_S for the smallest models), so fewer trials run when
    the exploring time is short. Every trial trains for the same time, not the same number of
    batches: the final fine-tune is bounded by time too, so a plan that trains faster (fewer
    channels) rightly gets more steps, in screening as in the final."""
    shortest = max(overhead * (1 / MAX_OVERHEAD - 1), MIN_TRIAL_S)
    return max(seconds / max(trials, 1) - overhead - speed.eval_s, shortest)


def trial_length(planned: float, overheads: list[float]) -> float:
    """A screening trial's fine-tune seconds: the planned share, or longer when the overhead that
    this process's earlier trials measured (proposing, sizing and calibrating the plan, Optuna's
    and MLflow's writes, writing the artifact) would be more than MAX_OVERHEAD of the trial. The
    median leaves out the first trial's one-off costs once others ran, and a repaired proposal's
    extra sizings. Fewer, longer trials then fit the exploring time."""
    if not overheads:
        return planned
    return max(planned, statistics.median(overheads) * (1 / MAX_OVERHEAD - 1))


def reserve_seconds(speed: Speed, test_size: int) -> float:
    """Time kept back at the end of the budget for exporting, loading back and testing the pick
    (a few test-split evaluations' worth) and for the review."""
    return FINAL_RESERVE_EVALS * speed.eval_s * test_size / max(speed.eval_samples, 1) + REVIEW_RESERVE_S


def final_seconds(clock: Clock, speed: Speed, test_size: int) -> float:
    """Time left for the final fine-tunes: what remains of the budget less the reserve."""
    return max(clock.left() - reserve_seconds(speed, test_size), 0.0)


def fit_in_budget(seconds: float, clock: Clock, speed: Speed, overhead: float, test_size: int) -> float:
    """A screening trial's fine-tune seconds, cut to what is left of the whole budget (less one
    trial's overhead and evaluation, and the reserve) when the planned length does not fit: at
    least one trial runs, and the budget is kept. The planned length keeps the overhead within
    MAX_OVERHEAD of a trial, which with a short budget asked for more than the budget: with 20 s,
    a LeNet-5 search planned a 29 s trial after 18 s of set-up and ended after 52 s."""
    room = clock.left() - overhead - speed.eval_s - reserve_seconds(speed, test_size)
    return min(seconds, max(room, 1.0))


def trials_finetune_seconds(trials: list[optuna.trial.FrozenTrial], planned: float) -> float:
    """The median seconds the screening trials that trained spent fine-tuning and evaluating, as
    they ran (trial_length makes them longer than planned when their overhead asks for it);
    `planned` when none trained."""
    ran = [s for s in map(finetune_seconds, trials) if s is not None and s > 0]
    return statistics.median(ran) if ran else planned


def finalists_that_fit(seconds: float, speed: Speed, trial_s: float, finalists: int) -> int:
    """How many finalists the final phase can take (0: none). A finalist whose trial's model was
    not kept (another worker's trial, a resumed search) starts again from the baseline, so each
    gets about three times its screening trial's fine-tune (`trial_s`, as the trials ran); with
    less time, fewer finalists, and the best trial alone (trained for all of it) while that is at
    least twice its trial."""
    per = trial_s + speed.eval_s
    fit = min(finalists, int(seconds // (3 * per)))
    return fit if fit > 0 or finalists < 1 else int(seconds >= 2 * per)


def describe(clock: Clock, speed: Speed, seconds: float, trials: int, overhead: float = OVERHEAD_S,
             finalists: int = 1) -> str:
    """One line for the search header: how the budget is split."""
    explore = clock.explore_end - time.monotonic()
    fit = min(trials, max(int(explore / (seconds + speed.eval_s + overhead)), 1))
    return (f"time budget {_dur(clock.budget)}, {_dur(clock.left())} left after set-up: {_dur(explore)} exploring "
            f"(about {fit} trial{'s' if fit != 1 else ''}, each fine-tuned for {seconds:.1f}s, "
            f"about {seconds / speed.step_s:.0f} batches at the baseline's speed), the rest fine-tuning "
            + ("the best trial" if finalists == 1 else f"the {finalists} best trials, then the best of them"))


def _dur(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"

