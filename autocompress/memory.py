"""Compressed copies freed as soon as they are garbage, not when Python gets round to it.

compress() returns a deep copy whose torch parametrizations put it in reference cycles, which
only Python's cyclic collector frees, and that runs on counts of new objects, not on bytes. A warm
start sizing a ResNet-18 (45 MB fp32) 72 times held 1.4 GB of dead copies, and a whole search's
peak memory grew to about 1.4 GB + 35x the model's fp32 bytes (7.6 GB for AlexNet). So the search
collects before it makes the next copy (collect()). A full collection walks every live object:
0.24 s with torch, Optuna and MLflow loaded. The search therefore moves the objects that exist when
it starts out of the collector's sight (frozen_setup(), gc.freeze), and again once Optuna's
storage and MLflow are loaded, and after the first trial (settle()): a collection then costs a
few milliseconds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def frozen_setup() -> Iterator[None]:
    """Freeze the objects alive now (set-up, baseline, data) out of the collector's scans until the
    block ends; then they are collectable again (a notebook's second search starts clean)."""
    settle()
    try:
        yield
    finally:
        gc.unfreeze()


def settle() -> None:
    """Collect, then freeze what is alive, like frozen_setup's start: for the objects a search
    creates after it began (Optuna's storage, MLflow's client and the modules they import, torch's
    compiler stack imported by the first optimiser), which made each collection of a LeNet-5
    search take 0.39 s, 15 s of a 6-trial search. Called where no compressed copy is alive: before
    the warm start, before the trials, and after the first one (SettleAfterFirst)."""
    gc.collect()
    gc.freeze()


class SettleAfterFirst:
    """Optuna trial callback: settle() once, after this process's first trial."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, study: object, trial: object) -> None:
        if not self.done:
            self.done = True
            settle()


def collect() -> None:
    """Free the compressed copies (and their optimiser state) that earlier sizings and trials left
    in reference cycles."""
    gc.collect()


def trim() -> None:
    """Give the pages glibc keeps after a large transient (a double-backward graph) back to the
    system; nothing where the C library is not glibc."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
