"""--time-budget: how the budget is split, and a real search that keeps to it (digits, SQLite, MLflow)."""
from __future__ import annotations

import time

import optuna
import pytest
import torch

from autocompress.api import search
from autocompress.objective import KEEP_MAX_BYTES, keep_for_final
from autocompress.timebudget import (MAX_OVERHEAD, MIN_TRIAL_S, OVERHEAD_S, Clock, Speed, final_seconds,
                                     finalists_that_fit, fit_in_budget, overhead_estimate, reserve_seconds,
                                     trial_length, trial_seconds, trials_finetune_seconds)
from autocompress.trials import Attr, StudyAttr, finetune_seconds


def test_trial_seconds_fit_the_trials_in_the_exploring_time():
    speed = Speed(step_s=0.1, eval_s=1.0)
    # 60 s for 6 trials: 10 s each, less the overhead and one evaluation
    assert trial_seconds(speed, 60.0, 6) == pytest.approx(10.0 - OVERHEAD_S - 1.0)
    assert trial_seconds(speed, 6.0, 6) == MIN_TRIAL_S  # fewer trials then fit, each long enough
    assert OVERHEAD_S / (MIN_TRIAL_S + OVERHEAD_S) <= 0.05


def test_trials_lengthen_when_their_measured_overhead_would_exceed_five_percent():
    assert trial_length(8.0, []) == 8.0  # nothing measured yet: as planned
    assert trial_length(8.0, [0.2, 0.3]) == 8.0  # 0.25 s of 8.25 s: 3%
    # the median (0.5 s, not the first trial's 3 s) asks for 19 x 0.5 s: 0.5 / 10 s = 5%
    assert trial_length(8.0, [3.0, 0.5, 0.4]) == pytest.approx(9.5)
    assert 0.5 / (trial_length(8.0, [3.0, 0.5, 0.4]) + 0.5) == pytest.approx(MAX_OVERHEAD)


def test_final_phase_keeps_a_reserve_and_is_skipped_when_too_short():
    clock = Clock(started=time.monotonic(), budget=100.0, explore_share=0.3)
    clock.start_exploring()
    assert 99.0 < clock.explore_end - clock.started + 70.0 <= 100.5  # 30% of what is left
    speed = Speed(step_s=0.1, eval_s=1.0, eval_samples=1000)
    left = final_seconds(clock, speed, test_size=2000)
    assert 85.0 < left < 100.0 - 6.0  # at least 3 test-sized evaluations (6 s) kept back
    assert finalists_that_fit(left, speed, trial_s=8.0, finalists=3) == 3
    assert finalists_that_fit(30.0, speed, trial_s=8.0, finalists=3) == 1  # 3 x 9 s each
    # too short for several: the best trial alone, re-fine-tuned while that is at least twice its trial
    assert finalists_that_fit(20.0, speed, trial_s=8.0, finalists=3) == 1
    assert finalists_that_fit(17.0, speed, trial_s=8.0, finalists=3) == 0
    assert finalists_that_fit(100.0, speed, trial_s=8.0, finalists=0) == 0


def test_a_trial_longer_than_the_budget_left_is_cut_to_fit():
    """The shortest screening trial keeps the overhead within 5%; with little of the budget left
    after set-up it is cut to what is left (at least one trial runs), so the budget holds."""
    speed = Speed(step_s=0.01, eval_s=0.5, eval_samples=1000)
    reserve = reserve_seconds(speed, test_size=1000)
    clock = Clock(started=time.monotonic() - 50.0, budget=100.0, explore_share=0.3)  # 50 s left
    assert fit_in_budget(20.0, clock, speed, overhead=1.0, test_size=1000) == 20.0  # fits: unchanged
    cut = fit_in_budget(60.0, clock, speed, overhead=1.0, test_size=1000)
    assert 50.0 - 1.0 - 0.5 - reserve - 0.5 < cut < 50.0 - 1.0 - 0.5 - reserve
    late = Clock(started=time.monotonic() - 99.0, budget=100.0, explore_share=0.3)
    assert fit_in_budget(60.0, late, speed, overhead=1.0, test_size=1000) == 1.0  # nothing left: one short trial


def test_a_deep_models_first_trials_are_planned_with_its_calibration_passes():
    """mnasnet0_5 on one CPU thread: a 0.12 s forward per batch, 1.5-2 s per trial outside the
    fine-tune. Planned with LeNet-5's 0.25 s, its first trial ran 7 s and spent 18% outside it."""
    speed = Speed(step_s=0.5, eval_s=1.0, forward_s=0.12)
    overhead = overhead_estimate(speed, calib_batches=4)
    assert 1.5 < overhead < 2.0
    seconds = trial_seconds(speed, 57.0, 6, overhead)
    assert overhead / (seconds + overhead) <= MAX_OVERHEAD
    assert seconds == pytest.approx(overhead * (1 / MAX_OVERHEAD - 1))  # so fewer trials fit
    lenet = Speed(step_s=0.01, eval_s=0.1, forward_s=0.002)
    assert trial_seconds(lenet, 60.0, 6, overhead_estimate(lenet, 4)) == pytest.approx(
        10.0 - overhead_estimate(lenet, 4) - 0.1)


def test_finalists_are_sized_by_the_trials_as_they_ran():
    """trial_length may lengthen the trials past the plan: the final phase must compare with them."""
    study = optuna.create_study(direction="maximize")
    for seconds, overhead in ((31.6, 1.5), (30.7, 2.0), (8.5, 1.6)):
        t = optuna.trial.create_trial(value=0.5, user_attrs={Attr.SECONDS: seconds, Attr.OVERHEAD_SECONDS: overhead})
        study.add_trial(t)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING))
    assert trials_finetune_seconds(study.trials, planned=7.3) == pytest.approx(28.7)  # 30.1, 28.7, 6.9
    assert trials_finetune_seconds([], planned=7.3) == 7.3


@pytest.mark.slow
def test_search_keeps_to_its_time_budget(tmp_path, capsys):
    """Without the budget, 40 one-epoch trials and 3 finalists would take minutes; with 45 s the
    search explores for its share (screening trials of at least MIN_TRIAL_S each), then the best
    screening trial alone (--time-finalists 1, the default) goes on for the rest, and the search
    records how long it trained."""
    t0 = time.monotonic()
    outcome = search("8x", model="lenet5", data="digits", out=str(tmp_path), study="tb", trials=40,
                     baseline_epochs=3, time_budget=45, progress=False)
    wall = time.monotonic() - t0
    study = optuna.load_study(study_name="tb", storage=f"sqlite:///{tmp_path}/optuna.db")
    ran = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 1 <= len(ran) < 40
    assert outcome.best_path is not None and outcome.test_accuracy is not None
    final = study.user_attrs.get(StudyAttr.FINAL, {})
    assert final and all("seconds" in v for v in final.values())
    # the finalists went on from their screening trials' fine-tunes (kept in memory), and their
    # seconds count the trial's
    for num, v in final.items():
        assert v.get("from_trial") is True
        trial = study.trials[int(num)]
        assert v["seconds"] > trial.user_attrs[Attr.SECONDS] - trial.user_attrs[Attr.OVERHEAD_SECONDS]
    assert sum(v["seconds"] for v in final.values()) < 45
    best = max(ran, key=lambda t: (t.value, -t.user_attrs[Attr.SIZE_BYTES]))
    assert list(final) == [str(best.number)] and outcome.best.number == best.number
    assert "the rest fine-tuning the best trial" in capsys.readouterr().out
    assert wall < 90  # baseline training (3 epochs on digits) is not counted in the 45 s
    sizes = {t.user_attrs[Attr.SIZE_BYTES] for t in ran}
    assert max(sizes) <= outcome.limit
    # each trial fine-tuned at least 19 times the median overhead its predecessors measured
    overheads: list[float] = []
    for t in sorted(ran, key=lambda t: t.number):
        trained = t.user_attrs[Attr.SECONDS] - t.user_attrs[Attr.OVERHEAD_SECONDS]
        assert trained >= 0.9 * trial_length(MIN_TRIAL_S, overheads), t.number
        overheads.append(t.user_attrs[Attr.OVERHEAD_SECONDS])


@pytest.mark.slow
def test_a_budget_too_short_for_a_full_trial_is_still_kept(tmp_path, capsys):
    """With 8 s the search cannot both explore and fine-tune: its one trial is cut to the time
    left, the final phase is skipped, the best trial is exported and tested, and the search ends
    within its budget (it ran 2.6 times over when the trial kept its planned length)."""
    search("8x", model="lenet5", data="digits", out=str(tmp_path / "warm"), study="w", trials=1,
           baseline_epochs=3, progress=False)  # the baseline, cached: its training is not counted anyway
    t0 = time.monotonic()
    outcome = search("8x", model="lenet5", data="digits", out=str(tmp_path / "short"), study="s", trials=10,
                     baseline_epochs=3, time_budget=8, progress=False)
    wall = time.monotonic() - t0
    out = capsys.readouterr().out
    assert "fits one trial of" in out and "give a larger --time-budget" in out, out
    assert outcome.best_path is not None and outcome.test_accuracy is not None
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/short/optuna.db")
    ran = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(ran) == 1 and finetune_seconds(ran[0]) < MIN_TRIAL_S  # cut, not the 5%-overhead length
    assert StudyAttr.FINAL not in study.user_attrs  # no time was left for a final phase
    assert wall < 2 * 8, wall  # 3.5 s on an idle 2-core machine (the 1 s trial leaves the reserve unused)


@pytest.mark.slow
def test_a_round_of_finalists_shares_the_final_phase_then_the_best_goes_on(tmp_path, capsys):
    """--time-finalists 2: the two best screening trials each go on from their trial for an equal
    share of 30% of the final phase; then the better of them on validation trains for the rest,
    from where its share left it."""
    outcome = search("8x", model="lenet5", data="digits", out=str(tmp_path), study="round", trials=4,
                     baseline_epochs=3, time_budget=90, explore_share=0.2, time_finalists=2, stop_at_baseline=False,
                     progress=False)
    study = optuna.load_study(study_name="round", storage=f"sqlite:///{tmp_path}/optuna.db")
    out = capsys.readouterr().out
    assert "the rest fine-tuning the 2 best trials, then the best of them" in out
    assert "final phase: " in out and "for the top 2" in out
    final = study.user_attrs[StudyAttr.FINAL]
    assert len(final) == 2 and all(v["from_trial"] for v in final.values())
    ran = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                 key=lambda t: (-t.value, t.user_attrs[Attr.SIZE_BYTES]))
    assert sorted(final) == sorted(str(t.number) for t in ran[:2])  # the two best screening trials
    lines = [line for line in out.splitlines() if line.startswith("finalist trial")]
    assert len(lines) == 3  # two shares, then the better one again
    winner, loser = sorted(final, key=lambda n: -final[n]["seconds"])
    assert f"finalist trial {int(winner):3d}" in lines[2]
    trial_s = {n: study.trials[int(n)].user_attrs[Attr.SECONDS] - study.trials[int(n)].user_attrs[Attr.OVERHEAD_SECONDS]
               for n in final}
    share = final[loser]["seconds"] - trial_s[loser]
    assert share > 0 and final[winner]["seconds"] - trial_s[winner] > 2 * share  # the rest is more than a share
    assert outcome.best is not None  # the pick: the finalist most accurate on validation at the end
    assert str(outcome.best.number) == max(final, key=lambda n: final[n]["val_accuracy"])


def test_only_the_best_trials_models_are_kept_for_the_final_phase():
    kept: dict = {}
    models = {n: torch.nn.Linear(4, 2) for n in range(5)}
    for n, acc, size in ((0, 0.5, 100), (1, 0.7, 100), (2, 0.6, 90), (3, 0.7, 80), (4, float("nan"), 10)):
        keep_for_final(kept, n, acc, size, models[n], top=2)
    assert sorted(kept) == [1, 3]  # 0.7 twice (the smaller first), then nothing of 0.6, 0.5 or NaN
    assert kept[3][2] is models[3]
    keep_for_final(kept, 5, 0.9, 100, torch.nn.Linear(4, 2), top=0)  # no finalists: nothing kept
    assert 5 not in kept
    huge = torch.nn.Linear(20_000, 20_000, device="meta")  # 1.6 GB of parameters, none allocated
    assert 4 * 20_000 ** 2 > KEEP_MAX_BYTES
    keep_for_final(kept, 6, 0.9, 100, huge, top=2)
    assert 6 not in kept


def test_the_timing_pass_scores_the_baseline_on_the_screening_images():
    """Under --time-budget the trials are scored on a subset of the validation split, so a trial
    matches the baseline (and exploring stops) against the baseline's accuracy on that subset:
    the probe's timed evaluation gives it, without a second pass over the images."""
    from types import SimpleNamespace

    from autocompress.data import load_data
    from autocompress.models import LeNet5
    from autocompress.timebudget import probe_speed
    from autocompress.train import evaluate

    digits = load_data("digits", seed=0)
    torch.manual_seed(0)
    model = LeNet5(image_size=8).eval()
    subset = digits.val.subset(60, seed=1)
    ctx = SimpleNamespace(model=model, data=digits)
    speed = probe_speed(ctx, SimpleNamespace(batch_size=32, seed=0, device="cpu"), subset)
    assert speed.eval_samples == 60 and speed.val_accuracy == evaluate(model, subset)
    assert speed.val_accuracy != evaluate(model, digits.val)  # the subset's score, not the whole split's
