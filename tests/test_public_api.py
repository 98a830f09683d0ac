"""Every public name of `autocompress` is what the README says, however often and in whatever order
it is used: a submodule with a public name's name would shadow it after its first import."""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil

import pytest
import torch

import autocompress
from autocompress.plan import CompressionPlan, LayerPlan

FUNCTIONS = ("search", "load", "export", "read_header", "compress", "artifact_size", "parse_budget")
CLASSES = ("SearchSpace", "Budget", "CompressionPlan", "LayerPlan", "PlanError", "UserError")


def test_no_submodule_is_named_like_a_public_name():
    submodules = {m.name for m in pkgutil.iter_modules(autocompress.__path__)}
    assert "orchestrate" in submodules and not submodules & set(autocompress.__all__)


def test_public_names_are_functions_and_classes_after_every_submodule_is_imported():
    package = os.path.dirname(autocompress.__file__)
    for root, _, files in os.walk(package):
        for f in files:
            if f.endswith(".py") and f not in ("__main__.py", "worker_main.py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(package))[:-3].replace(os.sep, ".")
                importlib.import_module(rel.removesuffix(".__init__"))
    assert set(FUNCTIONS + CLASSES) == set(autocompress.__all__)
    for _ in range(2):
        for name in FUNCTIONS:
            assert inspect.isfunction(getattr(autocompress, name)), name
        for name in CLASSES:
            assert inspect.isclass(getattr(autocompress, name)), name


def _plan() -> CompressionPlan:
    return CompressionPlan(layers={n: LayerPlan(prune="unstructured", amount=0.5, bits=4)
                                   for n in ("conv1", "conv2", "fc1", "fc2")})


def _engine_round(lenet, data, tmp_path, i: int) -> int:
    """compress -> artifact_size -> export -> read_header -> load, each through `autocompress.`."""
    from autocompress.models import ModelSpec

    x, calib = data
    spec = ModelSpec("lenet5", 10, 1, 28)
    compressed = autocompress.compress(lenet, _plan(), x[:2], calib)
    size = autocompress.artifact_size(compressed, spec)
    path = tmp_path / f"m{i}.acz"
    assert autocompress.export(compressed, path, spec) == size == os.path.getsize(path)
    assert autocompress.read_header(path)["spec"]["spec"] == "lenet5"
    loaded = autocompress.load(path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), compressed.eval()(x), atol=1e-5)
    space = autocompress.SearchSpace.from_dict({"layer": {"prune": ["none"], "bits": [4, 8]}}).bind(lenet)
    assert sorted(space.layers) == ["conv1", "conv2", "fc1", "fc2"]
    assert autocompress.parse_budget("20x").ratio == 20
    return size


def test_engine_names_twice_in_one_process(lenet, data, tmp_path):
    importlib.import_module("autocompress.compression")  # the submodules that once shadowed them
    importlib.import_module("autocompress.artifact")
    assert _engine_round(lenet, data, tmp_path, 0) == _engine_round(lenet, data, tmp_path, 1)


@pytest.mark.slow
def test_search_twice_in_one_process_then_the_engine_names(tmp_path, lenet, data):
    """The README's Python API in a notebook: search, load, and search again."""
    quick = dict(model="lenet5", data="digits", trials=1, epochs=1, baseline_epochs=1, max_batches=2,
                 progress=False, warm_start=False, final_top=0)
    for i in range(2):
        outcome = autocompress.search("8x", out=str(tmp_path / f"r{i}"), **quick)
        assert outcome.best_path and isinstance(autocompress.load(outcome.best_path), torch.nn.Module)
    _engine_round(lenet, data, tmp_path, 2)
