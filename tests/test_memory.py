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
