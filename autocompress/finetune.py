"""The per-trial fine-tune: trains an already-compressed model (masks and fake quantisers live
inside it), optionally distilling from the uncompressed teacher and adding an L1 penalty.

It reports validation accuracy after every epoch through a plain `report(value, step)` callable,
so early stopping stays with the caller (which may raise from `report`); this module never
imports Optuna or MLflow.
"""
from __future__ import annotations

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
             progress: bool = False) -> FinetuneResult:
    """Fine-tune `model` in place; evaluate and report val accuracy after each epoch (step = epoch
    number, from 1). With epochs == 0 it only evaluates, reporting once at step 0."""
    start = time.perf_counter()
    eval_seconds = 0.0
    val_acc: list[float] = []
    losses: list[float] = []

    def check(step: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        acc = evaluate(model, val, device)
        eval_seconds += time.perf_counter() - t0
        val_acc.append(acc)
        if report is not None:
            report(acc, step)

    if str(device).startswith("cuda"):  # fixed shapes: let cuDNN time and keep its fastest kernels
        torch.backends.cudnn.benchmark = True
    model.to(device)
    if config.epochs <= 0:
        check(0)
        return FinetuneResult(val_acc, losses, time.perf_counter() - start - eval_seconds, eval_seconds)
    torch.manual_seed(config.seed)
    if teacher is not None and config.distill > 0:
        teacher.to(device).eval()
    else:
        teacher = None
    opt = _optimizer(model, config)
    per_epoch = math.ceil(len(train) / config.batch_size)
    if config.max_batches is not None:
        per_epoch = min(per_epoch, config.max_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs * per_epoch))
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = train.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch,
                                limit=config.max_batches)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=per_epoch, leave=False, desc=f"fine-tune {epoch}/{config.epochs}",
                           file=sys.stderr)
        total, count = 0.0, 0
        for step, (x, y) in enumerate(batches, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = logits_of(model(x))
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x)
            loss = finetune_loss(logits, y, config, teacher_logits, l1_weights)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"fine-tune loss became {value} at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += value * len(y)
            count += len(y)
        losses.append(total / max(count, 1))
        check(epoch)
    return FinetuneResult(val_acc, losses, time.perf_counter() - start - eval_seconds, eval_seconds)
