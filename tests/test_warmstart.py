"""Sensitivity, warm-start plans, the final phase, early stopping and the Pareto mode."""
from __future__ import annotations

import os

import optuna
import pytest
import torch

from autocompress.api import search
from autocompress.compression import compress
from autocompress.cost import artifact_size
from autocompress.data import TensorData, load_data
from autocompress.models import MLP, LeNet5, ModelSpec, build_model
from autocompress.sensitivity import analyse
from autocompress.space import load_space
from autocompress.train import evaluate, train_model
from autocompress.warmstart import knapsack_plan, to_params, warm_start_plans

QUICK = dict(model="lenet5", data="digits", epochs=1, baseline_epochs=3, max_batches=4, progress=False, seed=0,
             final_top=0)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def test_sensitivity_ranks_a_deliberately_fragile_layer_first(digits):
    """fc1 of an MLP is made fragile without changing the function: input feature j is scaled by
    s_j in (1 .. 1000) and fc1's column j by 1/s_j. Its rows now span three orders of magnitude of
    equally important weights, so pruning or quantising it hurts most."""
    torch.manual_seed(0)
    model = MLP(num_classes=10, in_channels=1, image_size=8)
    train_model(model, digits.train, epochs=6, lr=0.05, progress=False)
    scale = 10 ** (torch.arange(64) % 4).float()
    with torch.no_grad():
        model.fc1.weight /= scale
    val = TensorData(digits.val.x * scale.view(1, 1, 8, 8), digits.val.y)
    assert evaluate(model, val) > 0.8
    sens = analyse(model.eval(), val, val.x[:2], amounts=(0.5, 0.8), bits=(3, 4), hessian_samples=2)
    assert set(sens.layers) == {"fc1", "fc2", "fc3"}
    assert sens.ranking()[0] == "fc1"
    assert sens.prune_drop["fc1"]["0.8"] > sens.prune_drop["fc2"]["0.8"]
    assert all(v > 0 for v in sens.hessian_trace.values()) or len(sens.hessian_trace) == 3


def test_knapsack_and_uniform_plans_fit_the_budget(digits):
    torch.manual_seed(0)
    model = LeNet5(image_size=8).eval()
    train_model(model, digits.train, epochs=2, lr=0.05, progress=False)
    model.eval()
    spec = ModelSpec("lenet5", 10, 1, 8)
    example = digits.train.x[:2]
    size_of = lambda p: artifact_size(compress(model, p, example), spec)  # noqa: E731
    layers = load_space(None).bind(model).layers
    sens = analyse(model, digits.val, example, amounts=(0.5, 0.9), bits=(2, 4), hessian_samples=1)
    limit = 524_320 // 30
    plans = dict(warm_start_plans(model, layers, size_of, limit, sens))
    assert "knapsack" in plans and any(k.startswith("uniform-4bit") for k in plans)
    channels = next(p for k, p in plans.items() if k.startswith("channels-4bit"))
    kept = compress(model, channels, example)
    assert kept.conv2.weight.shape[0] < model.conv2.weight.shape[0]  # channels really removed
    assert kept.fc2.weight.shape[0] == model.fc2.weight.shape[0]      # the output layer keeps its classes
    for name, plan in plans.items():
        assert size_of(plan) <= limit, name
        params = to_params(plan, layers)
        rebuilt = load_space(None).bind(model).suggest(optuna.trial.FixedTrial(
            {**params, "recovery.distill": 0.0, **{k: "2:4" for k in _nm_params(layers)}}))
        assert size_of(rebuilt) <= limit, name  # on the space's grid, amounts only rounded up
    assert knapsack_plan(model, sens, 10, [0.5], [8]) is None  # nothing fits 10 bytes


def _nm_params(layers):
    return [f"{n}.nm" for n, c in layers.items() if "nm" in c and not c["nm"].fixed]


def test_final_phase_refines_the_top_plans_and_exports_the_best(tmp_path):
    outcome = search("8x", out=str(tmp_path), study="f", **{**QUICK, "trials": 3, "final_top": 2, "final_epochs": 1})
    final = outcome.study.user_attrs["final"]
    assert len(final) == 2
    assert all(f["distill"] == 0.5 for f in final.values())  # --final-distill's default, whatever the plan said
    best_num, best = max(final.items(), key=lambda kv: kv[1]["val_accuracy"])
    assert outcome.best.number == int(best_num) and outcome.best_val == best["val_accuracy"]
    assert os.path.getsize(outcome.best_path) == best["size_bytes"] == os.path.getsize(best["artifact"])
    from autocompress.cli import main

    assert main(["export", "--runs", str(tmp_path), "--study", "f", "--out", str(tmp_path / "x.acz")]) == 0
    assert (tmp_path / "x.acz").read_bytes() == open(best["artifact"], "rb").read()


def test_early_stopping_stops_a_hopeless_trial(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("layer:\n  prune: [unstructured]\n  amount: [0.0, 0.98]\n  bits: [1, 8]\n"
                     "recovery:\n  distill: [0.0]\n")
    from autocompress.plan import parse_budget
    from autocompress.settings import SearchSettings
    from autocompress.study import open_study

    study = open_study(SearchSettings(budget=parse_budget("3x"), out=str(tmp_path), study="e"))
    names = ("conv1", "conv2", "fc1", "fc2")
    for _ in range(4):
        study.enqueue_trial({**{f"{n}.amount": 0.0 for n in names}, **{f"{n}.bits": 8 for n in names}})
    study.enqueue_trial({**{f"{n}.amount": 0.98 for n in names}, **{f"{n}.bits": 1 for n in names}})
    outcome = search("3x", out=str(tmp_path), study="e", space=str(space),
                     **{**QUICK, "trials": 5, "epochs": 3, "max_batches": 2, "warm_start": False})
    hopeless = outcome.study.trials[4]
    assert hopeless.state == optuna.trial.TrialState.PRUNED
    assert list(hopeless.intermediate_values) == [1]  # stopped after its first epoch, not run to the end
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in outcome.study.trials[:4])


def test_pareto_mode_returns_only_non_dominated_trials(tmp_path):
    from autocompress.trials import pareto_trials

    outcome = search("6x", out=str(tmp_path), study="p", objectives="accuracy,size",
                     **{**QUICK, "trials": 5, "warm_start": False})
    study = outcome.study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("infeasible")]
    front = pareto_trials(study)
    assert front
    for t in front:
        a, s = t.values
        assert s == t.user_attrs["size_bytes"]
        assert not any(o.values[0] >= a and o.values[1] <= s and (o.values[0] > a or o.values[1] < s) for o in done)
    for t in done:
        if t not in front:
            assert any(f.values[0] >= t.values[0] and f.values[1] <= t.values[1] for f in front)


def test_thinned_amount_grid_keeps_the_high_amounts_where_bytes_change_fastest():
    from autocompress.warmstart import _grid

    model = build_model(ModelSpec("lenet5", 10, 1, 28))
    grid = _grid(load_space(None).bind(model).layers["fc1"]["amount"])
    assert len(grid) <= 41 and grid[0] == 0.0 and grid[-1] == pytest.approx(0.9975)
    assert {0.985, 0.99, 0.995} <= set(grid)  # each halves or so the weights kept at 100x
