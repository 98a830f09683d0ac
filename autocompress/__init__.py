"""autocompress: AutoML model-compression search for PyTorch."""
from __future__ import annotations

from .plan import Budget, CompressionPlan, LayerPlan, parse_budget

__all__ = ["Budget", "CompressionPlan", "LayerPlan", "parse_budget"]
__version__ = "0.1.0"
