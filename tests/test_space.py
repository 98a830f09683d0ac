from __future__ import annotations

import os

import optuna
import pytest
import yaml

from autocompress.errors import UserError
from autocompress.models import LeNet5
from autocompress.plan import CompressionPlan
from autocompress.space import SPACES_DIR, SearchSpace, bundled_space_names, load_space


@pytest.fixture(scope="module")
def lenet():
    return LeNet5()


def test_default_space_binds_and_drops_impossible_options(lenet):
    bound = load_space(None).bind(lenet)
    assert list(bound.layers) == ["conv1", "conv2", "fc1", "fc2"]
    # conv1 has fan-in 25: no N:M group or 1x4 block divides it
    assert set(bound.layers["conv1"]["prune"].values) == {"unstructured", "channel"}
    # the output layer never loses channels
    assert "channel" not in bound.layers["fc2"]["prune"].values
    assert "fc1.bits" in bound.param_names() and "recovery.distill" in bound.param_names()


def test_fixed_trial_rebuilds_the_best_plan_from_its_params(lenet, tmp_path):
    bound = load_space(None).bind(lenet)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    plans = {}

    def objective(trial):
        plan = bound.suggest(trial)
        plans[trial.number] = plan
        return plan.summary()["mean_sparsity"]

    study.optimize(objective, n_trials=5)
    best = study.best_trial
    rebuilt = bound.suggest(optuna.trial.FixedTrial(best.params))
    assert rebuilt == plans[best.number]
    assert CompressionPlan.from_json(rebuilt.to_json()) == rebuilt
    # parameter names are the same for every trial of the study
    assert all(set(t.params) == set(best.params) for t in study.trials)


def test_smallest_plan_takes_the_extremes(lenet):
    plan = load_space(None).bind(lenet).smallest()
    fc1 = plan.layers["fc1"]
    assert fc1.bits == 2 and fc1.sparsity == pytest.approx(0.9975)


def test_unknown_keys_and_empty_choices_are_errors(tmp_path):
    base = yaml.safe_load(open(os.path.join(SPACES_DIR, "default.yaml")))
    bad_top = dict(base, layers={})
    with pytest.raises(UserError, match="unknown key"):
        SearchSpace.from_dict(bad_top)
    bad_layer = dict(base, layer=dict(base["layer"], bitz=[4]))
    with pytest.raises(UserError, match="bitz"):
        SearchSpace.from_dict(bad_layer)
    empty = dict(base, layer=dict(base["layer"], bits=[]))
    with pytest.raises(UserError, match="empty choice"):
        SearchSpace.from_dict(empty)
    wrong_value = dict(base, layer=dict(base["layer"], bits=[4, 12]))
    with pytest.raises(UserError, match="invalid value"):
        SearchSpace.from_dict(wrong_value)
    p = tmp_path / "s.yaml"
    p.write_text("layer: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        SearchSpace.from_yaml(str(p))
    with pytest.raises(UserError, match="not found"):
        SearchSpace.from_yaml(str(tmp_path / "missing.yaml"))


def test_space_by_bundled_name_or_by_path(tmp_path):
    assert bundled_space_names() == ["default", "full", "quantize-only"]
    for name in bundled_space_names():
        by_name = load_space(name)
        assert by_name.source == f"{name}.yaml"
        assert by_name.to_dict() == SearchSpace.from_yaml(os.path.join(SPACES_DIR, f"{name}.yaml")).to_dict()
    assert load_space(None).to_dict() == load_space("default").to_dict()
    assert load_space("quantize-only").to_dict() != load_space("full").to_dict()
    own = tmp_path / "full"  # a file path wins over a bundled name
    with open(os.path.join(SPACES_DIR, "quantize-only.yaml")) as f:
        own.write_text(f.read())
    assert load_space(str(own)).to_dict() == load_space("quantize-only").to_dict()
    with pytest.raises(UserError) as e:
        load_space("fulll")
    assert str(e.value) == ("unknown search space 'fulll': bundled spaces are default, full, quantize-only; "
                            "or pass the path of a YAML file")
    with pytest.raises(UserError, match="file not found: nowhere/s.yaml"):
        load_space("nowhere/s.yaml")


def test_overrides_and_exclude_apply_by_pattern(lenet):
    space = SearchSpace.from_dict({
        "include": ["*"], "exclude": ["fc2"],
        "layer": {"prune": ["unstructured"], "amount": [0.5, 0.9], "bits": [2, 4]},
        "overrides": [{"match": "conv*", "bits": [8]}],
    })
    bound = space.bind(lenet)
    assert list(bound.layers) == ["conv1", "conv2", "fc1"]
    plan = bound.suggest(optuna.trial.FixedTrial({"conv1.amount": 0.5, "conv2.amount": 0.9,
                                                  "fc1.amount": 0.9, "fc1.bits": 2}))
    assert plan.layers["conv1"].bits == 8 and plan.layers["fc1"].bits == 2
    assert plan.layers["conv2"].amount == 0.9
    with pytest.raises(UserError, match="match no layer"):
        SearchSpace.from_dict({"include": ["nothing*"], "layer": {"prune": ["none"], "bits": [8]}}).bind(lenet)
