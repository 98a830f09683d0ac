"""The per-trial fine-tune: trains an already-compressed model (masks and fake quantisers live
inside it), optionally distilling from the uncompressed teacher and adding an L1 penalty.

It reports validation accuracy after every epoch through a plain `report(value, step)` callable,
so early stopping stays with the caller (which may raise from `report`); this module never
imports Optuna or MLflow.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import TensorData
from .errors import UserError
from .models import logits_of
from .train import evaluate

OPTIMIZERS = ("sgd", "adam", "adamw")
PROBE_STEPS = 5  # steps timed before a time-budgeted fine-tune first plans its schedule


@dataclass
class FinetuneConfig:
    """Fine-tune settings for one trial; max_batches caps the batches per epoch."""

    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    max_batches: int | None = None
    distill: float = 0.0
    temperature: float = 4.0
    l1: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"
    seconds: float | None = None  # train for this long instead of `epochs` (the cosine schedule is fitted to it)


class TeacherLogits:
    """The teacher's logits per training sample, each computed on its first use and then kept.

    The teacher (the baseline, in eval mode) is fixed, and the training samples are fixed tensors
    without augmentation, so its logits for a sample never change: every trial and finalist that
    distils from it on the same data shares them instead of paying a teacher forward per step
    (about a quarter of a distilled step on CPU). One entry is kept per process; it is rebuilt
    when the teacher, the data or any teacher weight (its version counter) changes, and not kept
    at all when it would exceed MAX_BYTES."""

    MAX_BYTES = 512 << 20
    _current: TeacherLogits | None = None

    def __init__(self, teacher: nn.Module, data: TensorData) -> None:
        self.teacher, self.data, self.version = teacher, data, _weights_version(teacher)
        self.logits: Tensor | None = None
        self.done: Tensor | None = None
        self.off = False

    @classmethod
    def of(cls, teacher: nn.Module, data: TensorData) -> TeacherLogits:
        cur = cls._current
        if cur is None or cur.teacher is not teacher or cur.data.x is not data.x \
                or cur.version != _weights_version(teacher):
            cur = cls._current = cls(teacher, data)
        return cur

    @torch.no_grad()
    def get(self, idx: Tensor, x: Tensor) -> Tensor:
        """Logits of samples `idx` (whose inputs are `x`, on the teacher's device)."""
        if self.off:
            return logits_of(self.teacher(x))
        if self.logits is None:
            out = logits_of(self.teacher(x))
            if len(self.data) * out.shape[1] * out.element_size() > self.MAX_BYTES:
                self.off = True
                return out
            self.logits = out.new_empty(len(self.data), out.shape[1])
            self.done = torch.zeros(len(self.data), dtype=torch.bool, device=out.device)
            self.logits[idx.to(out.device)] = out
            self.done[idx.to(out.device)] = True
            return out
        assert self.done is not None
        idx = idx.to(self.logits.device)
        missing = ~self.done[idx]
        if bool(missing.any()):
            new = idx[missing]
            self.logits[new] = logits_of(self.teacher(x[missing.to(x.device)]))
            self.done[new] = True
        return self.logits[idx]


def _weights_version(model: nn.Module) -> tuple[int, ...]:
    """In-place updates bump a tensor's version counter: a changed teacher gets new logits."""
    return tuple(t._version for t in model.state_dict().values())


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the trial diverged."""


@dataclass
class FinetuneResult:
    """Validation accuracy per reported step, mean train loss per epoch; `seconds` is the time spent
    training (evaluation excluded), `eval_seconds` the time spent evaluating."""

    val_acc: list[float]
    train_loss: list[float]
    seconds: float
    eval_seconds: float
    steps: int = 0  # optimiser steps taken
    restored: bool = False  # the weights it started from were put back (refine.guarded): val_acc[-1] is theirs


def finetune_loss(logits: Tensor, y: Tensor, config: FinetuneConfig, teacher_logits: Tensor | None = None,
                  l1_weights: Callable[[], list[Tensor]] | None = None) -> Tensor:
    """Cross-entropy, blended with T^2-scaled distillation KL, plus an L1 penalty when asked."""
    loss = F.cross_entropy(logits, y)
    if teacher_logits is not None and config.distill > 0:
        t = config.temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      reduction="batchmean", log_target=True)
        loss = (1 - config.distill) * loss + config.distill * t * t * kl
    if l1_weights is not None and config.l1 > 0:
        weights = l1_weights()
        if weights:
            loss = loss + config.l1 * sum(w.abs().sum() for w in weights)
    return loss


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=5e-4)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr)
    raise UserError(f"unknown optimizer {config.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")


def finetune(model: nn.Module, train: TensorData, val: TensorData, config: FinetuneConfig, *,
             teacher: nn.Module | None = None, report: Callable[[float, int], None] | None = None,
             l1_weights: Callable[[], list[Tensor]] | None = None, device: str = "cpu",
             progress: bool = False, recalibrate: Callable[[], None] | None = None) -> FinetuneResult:
    """Fine-tune `model` in place; evaluate and report val accuracy after each epoch (step = epoch
    number, from 1). With epochs == 0 it only evaluates, reporting once at step 0.

    With `config.seconds` it trains for that long (evaluations included) instead of `epochs`: the
    cosine schedule is planned from the recent speed after 5, 10, 20, ... steps and after the
    first epoch, and a deadline stops it (the last, partial epoch is evaluated too).

    `recalibrate` (BatchNorm statistics re-estimated, see compression.recalibrate_bn) runs before
    each evaluation that follows training, and counts as evaluation time."""
    start = time.perf_counter()
    eval_seconds = 0.0
    val_acc: list[float] = []
    losses: list[float] = []

    def check(step: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        if recalibrate is not None and step > 0:
            recalibrate()
        acc = evaluate(model, val, device)
        eval_seconds += time.perf_counter() - t0
        val_acc.append(acc)
        if report is not None:
            report(acc, step)

    if str(device).startswith("cuda"):  # fixed shapes: let cuDNN time and keep its fastest kernels
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if config.epochs <= 0 and config.seconds is None:
        check(0)
        return FinetuneResult(val_acc, losses, time.perf_counter() - start - eval_seconds, eval_seconds)
    torch.manual_seed(config.seed)
    teacher_cache = None
    if teacher is not None and config.distill > 0:
        teacher_cache = TeacherLogits.of(teacher.to(device).eval(), train)
    opt = _optimizer(model, config)
    per_epoch = math.ceil(len(train) / config.batch_size)
    if config.max_batches is not None:
        per_epoch = min(per_epoch, config.max_batches)
    total = config.epochs * per_epoch  # steps of the cosine schedule
    if config.seconds is not None:  # a first guess, re-planned from the speed after PROBE_STEPS steps
        total = max(config.epochs, 1) * per_epoch + PROBE_STEPS
    begun = time.perf_counter()  # after the optimiser: its first creation imports torch._dynamo (seconds, once)
    next_plan = PROBE_STEPS  # re-planned at 5, 10, 20, 40... steps: the first steps are slower (warm-up, teacher)
    deadline = None if config.seconds is None else begun + config.seconds
    step = 0

    def per_eval(per_step: float) -> float:
        """One evaluation's seconds: measured once one has run, else a forward (a third of a
        training step) per validation batch."""
        return eval_seconds / len(val_acc) if val_acc else per_step / 3 * math.ceil(len(val) / config.batch_size)

    def out_of_time() -> bool:
        """Past the deadline, less the evaluation that follows the last step (it too ends by it)."""
        if deadline is None:
            return False
        cost = per_eval((time.perf_counter() - begun) / step) if step or val_acc else 0.0
        return time.perf_counter() >= deadline - cost

    mark = (0, begun, 0.0)  # (steps, time, evaluation seconds) when the schedule was last planned

    def replan() -> int:
        """Re-plan the schedule's length from the speed since the last plan (the first steps are
        slower: warm-up, teacher logits not yet kept)."""
        nonlocal mark
        assert deadline is not None
        now = time.perf_counter()
        per_step = (now - mark[1] - (eval_seconds - mark[2])) / max(step - mark[0], 1)
        mark = (step, now, eval_seconds)
        return planned_steps(step, per_step, deadline - now, per_eval(per_step), per_epoch)

    def finished() -> bool:
        """Whether training stops here: the schedule has run its steps, or the deadline is near. A
        timed fine-tune whose schedule ran out early (a slow stretch made the speed look lower than it
        is) is re-planned over the time left instead: the deadline, not a misjudged plan, ends it."""
        nonlocal total
        if deadline is not None and step >= total and not out_of_time():
            total = replan()
        return step >= total or out_of_time()

    for epoch in itertools.count(1):
        if config.seconds is None and epoch > config.epochs:
            break
        model.train()
        batches = train.index_batches(config.batch_size, seed=config.seed * 1000 + epoch, limit=config.max_batches)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=per_epoch, leave=False, file=sys.stderr,
                           desc=f"fine-tune {epoch}" + (f"/{config.epochs}" if config.seconds is None else ""))
        loss_sum, count = 0.0, 0
        for idx in batches:
            if finished():
                break
            x, y = train.x[idx], train.y[idx]
            _set_lr(opt, config.lr * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0))))
            soft = None if teacher_cache is None else teacher_cache.get(idx, x.to(device, non_blocking=True))
            value = _train_step(model, x, y, config, opt, soft, l1_weights, device, epoch, step)
            step += 1
            loss_sum += value * len(y)
            count += len(y)
            if deadline is not None and step == next_plan:  # plan the schedule from the speed seen so far
                total, next_plan = replan(), next_plan * 2
        if count:
            losses.append(loss_sum / count)
            check(epoch)
            if deadline is not None and epoch == 1:  # now with an evaluation timed
                total = replan()
        if count == 0 or finished():
            break
    if not val_acc:
        check(0)
    return FinetuneResult(val_acc, losses, time.perf_counter() - start - eval_seconds, eval_seconds, step)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _train_step(model: nn.Module, x: Tensor, y: Tensor, config: FinetuneConfig, opt: torch.optim.Optimizer,
                teacher_logits: Tensor | None, l1_weights: Callable[[], list[Tensor]] | None, device: str,
                epoch: int, step: int) -> float:
    """One optimiser step; returns the loss (raises NonFiniteLoss when it is NaN or infinite)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = logits_of(model(x))
    loss = finetune_loss(logits, y, config, teacher_logits, l1_weights)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(f"fine-tune loss became {value} at epoch {epoch}, step {step + 1}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def planned_steps(done: int, per_step: float, left: float, per_eval: float, per_epoch: int) -> int:
    """Total steps of a time-budgeted fine-tune that has done `done` steps and has `left` seconds:
    the steps that fit at `per_step` seconds each, less one evaluation (`per_eval`) per epoch end
    still ahead, the last, partial epoch included."""
    more = int(left / max(per_step, 1e-9))
    for _ in range(3):  # evaluations ahead depend on the steps, which depend on them
        evals = math.ceil((done + max(more, 1)) / per_epoch) - done // per_epoch
        more = int(max(left - evals * per_eval, 0) / max(per_step, 1e-9))
    return done + max(more, 1)
