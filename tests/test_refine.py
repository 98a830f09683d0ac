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
