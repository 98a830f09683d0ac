"""What a search works on and what it returns: the fixed inputs every trial shares (SearchContext)
and the result of a search (SearchOutcome). Plain records, so refine, review and timing can name
their types without importing the search."""
from __future__ import annotations

from dataclasses import dataclass, field

import optuna
import torch
from torch import nn

from .cost.latency import LatencyPredictor, LatencyResult
from .data import DataBundle, TensorData
from .models import ModelSpec
from .space import BoundSpace


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
    latency: LatencyPredictor | None = None  # when a latency budget or objective is set
    started: float = 0.0  # time.monotonic() when the search began (--time-budget counts from it)
    baseline_test_acc: float | None = None  # measured at the start when a checkpoint was given (api.validation_line)
    baseline_saw_val: bool | None = None  # the checkpoint has most likely been trained on the validation split
    screen_val: TensorData | None = None  # --time-budget: the validation subset screening trials are scored on
    screen_baseline_acc: float | None = None  # the baseline's accuracy on screen_val (orchestrate.reference_accuracy)
    # the fine-tuned models of this process's best trials (number -> (val accuracy, size, model)),
    # so that the finalists go on training them instead of starting again (objective.keep_for_final)
    trained: dict[int, tuple[float, int, nn.Module]] = field(default_factory=dict)


@dataclass
class SearchOutcome:
    """What `search()` returns: the study, its best trial, the exported best artifact and its test
    accuracy (measured once, at the end), and the deployed latency when it was timed."""

    study: optuna.Study
    best: optuna.trial.FrozenTrial | None
    best_path: str | None
    test_accuracy: float | None
    baseline_test_accuracy: float | None
    limit: int
    parent_run_id: str | None
    best_val: float | None = None
    latency: LatencyResult | None = None  # of the deployed best model, when timed
