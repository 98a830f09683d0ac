"""autocompress: AutoML model-compression search for PyTorch.

    import autocompress
    outcome = autocompress.search("50KB", model="lenet5", data="fashion-mnist")
    model = autocompress.load(outcome.best_path)

Heavy modules (torch, optuna, mlflow) load on first use, so the CLI answers `--help` at once.
"""
from __future__ import annotations

from typing import Any

from .errors import UserError
from .plan import Budget, CompressionPlan, LayerPlan, PlanError, parse_budget

__all__ = ["Budget", "CompressionPlan", "LayerPlan", "PlanError", "UserError", "parse_budget",
           "search", "load", "export", "read_header", "compress", "artifact_size", "SearchSpace"]
__version__ = "0.1.0"

_LAZY = {"search": ".api", "load": ".artifact", "export": ".artifact", "read_header": ".artifact",
         "compress": ".compression", "artifact_size": ".cost", "SearchSpace": ".space"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'autocompress' has no attribute {name!r}")
