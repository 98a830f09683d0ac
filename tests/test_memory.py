"""Compressed copies are freed before the next one is made (memory.collect), and the search's
freeze of its set-up objects ends with it (memory.frozen_setup)."""
from __future__ import annotations

import gc
import weakref

import torch

from autocompress.compression import compress
from autocompress.memory import collect, frozen_setup
from autocompress.models import prunable_layers
from autocompress.plan import CompressionPlan, LayerPlan


def test_a_dead_compressed_copy_waits_for_the_cycle_collector_and_collect_frees_it(lenet):
    """compress()'s copy sits in reference cycles (torch parametrizations): dropping the last
    reference does not free it, collect() does. The search calls collect() before every sizing,
    trial and finalist (a warm start on ResNet-18 held 1.4 GB of such copies)."""
    layers = prunable_layers(lenet)
    plan = CompressionPlan(layers={n: LayerPlan(prune="unstructured", amount=0.5, bits=4) for n in layers})
    x = torch.zeros(2, 1, 28, 28)
    gc.disable()
    try:
        compressed = compress(lenet, plan, x, None, calibrate=False)
        layer = weakref.ref(compressed.conv1)  # a parametrized layer: it holds the weights
        del compressed
        assert layer() is not None  # unreachable, yet alive: only the cycle collector frees it
        collect()
        assert layer() is None
    finally:
        gc.enable()


def test_frozen_setup_hides_the_objects_alive_at_its_start_until_it_ends():
    kept = [object() for _ in range(10)]
    with frozen_setup():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0


def test_a_search_collects_without_scanning_what_its_set_up_imported(tmp_path, monkeypatch):
    """Optuna's storage and MLflow are imported inside the search, after frozen_setup froze the
    set-up: settle() freezes them too before the warm start and the trials. Without it each of the
    search's collections walked about 250,000 objects (0.39 s for LeNet-5; 15 s of a 6-trial
    search), with it a few hundred."""
    import autocompress.objective as objective
    from autocompress.api import search

    scanned = []

    def counting() -> None:
        collect()
        scanned.append(len(gc.get_objects()))  # what a collection walks: frozen objects are not listed

    monkeypatch.setattr(objective, "collect", counting)
    search("8x", model="lenet5", data="digits", out=str(tmp_path), trials=3, epochs=1, baseline_epochs=1,
           max_batches=2, progress=False, final_top=0)
    assert len(scanned) > 10  # the warm start's sizings and the trials
    assert max(scanned) < 20_000
    assert gc.get_freeze_count() == 0  # the freezes end with the search
