"""The final phase: the top plans fine-tuned longer, the best of them exported."""
from __future__ import annotations

import os

import pytest

from autocompress.api import search

pytestmark = pytest.mark.slow

QUICK = dict(model="lenet5", data="digits", epochs=1, baseline_epochs=3, max_batches=4, progress=False, seed=0,
             final_top=0, stop_at_baseline=False)  # these tests count trials: digits' weak baseline is matched at once


def test_final_phase_refines_the_top_plans_and_exports_the_best(tmp_path):
    outcome = search("8x", out=str(tmp_path), study="f", **{**QUICK, "trials": 3, "final_top": 2, "final_epochs": 1})
    final = outcome.study.user_attrs["final"]
    assert len(final) == 2
    assert all(f["distill"] == 0.5 for f in final.values())  # --final-distill's default, whatever the plan said
    assert all(f.get("from_trial") for f in final.values())  # they went on from their trials' fine-tunes
    best_num, best = max(final.items(), key=lambda kv: kv[1]["val_accuracy"])
    assert outcome.best.number == int(best_num) and outcome.best_val == best["val_accuracy"]
    assert os.path.getsize(outcome.best_path) == best["size_bytes"] == os.path.getsize(best["artifact"])
    from autocompress.cli import main

    assert main(["export", "--runs", str(tmp_path), "--study", "f", "--out", str(tmp_path / "x.acz")]) == 0
    assert (tmp_path / "x.acz").read_bytes() == open(best["artifact"], "rb").read()


def test_a_finalist_that_goes_on_from_its_trial_sees_other_batches(tmp_path, monkeypatch):
    """Every trial shuffles the training data with the same seed (a fair comparison); a finalist
    that goes on from its trial's model shuffles with another, so that it does not start again on
    the batches its trial already trained on (a time-budgeted pick had seen its first 86 batches
    three times before the end of one epoch)."""
    import autocompress.refine as refine

    seeds: list[int] = []
    real = refine.finetune

    def recording(model, train, val, config, **kw):  # the real fine-tune, its seed noted
        seeds.append(config.seed)
        return real(model, train, val, config, **kw)

    monkeypatch.setattr(refine, "finetune", recording)
    outcome = search("8x", out=str(tmp_path), study="s", **{**QUICK, "trials": 2, "final_top": 1, "final_epochs": 1})
    assert all(f.get("from_trial") for f in outcome.study.user_attrs["final"].values())
    assert seeds[:2] == [0, 0] and seeds[2] != 0, seeds  # two trials, then the finalist


def test_a_fine_tune_that_goes_on_keeps_its_start_when_it_ends_lower():
    """refine.guarded: a continued fine-tune that ends below the accuracy it started from, or
    whose loss diverges, gives back the weights it started from; one that gains keeps its own."""
    import torch

    from autocompress.data import load_data
    from autocompress.finetune import FinetuneConfig, finetune
    from autocompress.models import build_model
    from autocompress.refine import guarded
    from autocompress.train import evaluate

    digits = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, 8)
    finetune(model, digits.train, digits.val, FinetuneConfig(epochs=1, lr=0.05))
    start = evaluate(model, digits.val)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def go_on(lr: float):
        return lambda: finetune(model, digits.train, digits.val, FinetuneConfig(epochs=1, lr=lr, seed=1))

    for lr in (30.0, 1e6):  # ends far lower; diverges (NaN loss)
        res = guarded(model, start, go_on(lr))
        assert res.restored and res.val_acc[-1] == start
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert evaluate(model, digits.val) == start
    res = guarded(model, start, go_on(0.05))
    assert not res.restored and res.val_acc[-1] >= start and res.val_acc[-1] == evaluate(model, digits.val)


def test_a_finalist_whose_continued_fine_tune_ends_lower_exports_its_trials_model(tmp_path, monkeypatch):
    """The final phase goes on from the screening trial's model; when that ends lower on validation
    (here the finalist's fine-tune runs at 1000 times the learning rate), the search exports the
    model as its trial left it, and says so."""
    import dataclasses

    import autocompress.refine as refine
    from autocompress.artifact import load
    from autocompress.data import load_data
    from autocompress.train import evaluate

    calls: list[int] = []
    real = refine.finetune

    def wrecking_the_finalist(model, train, val, config, **kw):
        calls.append(config.seed)
        if len(calls) > 2:  # two trials, then the finalist
            config = dataclasses.replace(config, lr=config.lr * 1000)
        return real(model, train, val, config, **kw)

    monkeypatch.setattr(refine, "finetune", wrecking_the_finalist)
    outcome = search("8x", out=str(tmp_path), study="g", **{**QUICK, "trials": 2, "final_top": 1, "final_epochs": 1})
    (num, entry), = outcome.study.user_attrs["final"].items()
    assert len(calls) == 3 and entry["from_trial"] and "restored" in entry
    assert not entry["restored"]["val_accuracy"] >= entry["val_accuracy"]  # lower, or NaN
    assert entry["epochs"] == 0  # the exported model is its trial's
    assert outcome.best.number == int(num) and outcome.best_val == entry["val_accuracy"]
    data = load_data("digits", seed=0)
    assert evaluate(load(outcome.best_path), data.val) == pytest.approx(entry["val_accuracy"], abs=1e-9)
