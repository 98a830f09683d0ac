"""The Python API: search, then load the best artifact with one call and use it.

    python examples/python_api.py
"""
from __future__ import annotations

import os

import autocompress
from autocompress.data import load_data
from autocompress.train import evaluate

outcome = autocompress.search("30x", model="lenet5", data="digits", out="runs/api", trials=6, epochs=2)
model = autocompress.load(outcome.best_path)          # a plain nn.Module, eval mode
test = load_data("digits").test
print(f"{outcome.best_path}: {os.path.getsize(outcome.best_path)} bytes, test accuracy {evaluate(model, test):.4f}")
print(autocompress.read_header(outcome.best_path)["plan"]["layers"]["fc1"])
