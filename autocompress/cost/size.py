"""Artifact size: the exact byte count export() would write for a compressed model.

Computed without building the payload: artifact.layout builds the header from the masks and
shapes alone (never from weight values), and every entry's stream sizes follow from it by the
format's one size rule (artifact.chunk_sizes). The writer fills the payload from the same layout,
so the two cannot disagree. The repair and the warm start size dozens of plans per trial; this
takes a fraction of artifact_bytes' time and memory (no code array is quantised or packed).
tests/test_size.py asserts equality with the written file for every kind of plan.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..artifact import chunk_sizes, framing_size, layout, payload_size
from ..models import ModelSpec


def artifact_size(model: nn.Module, spec: ModelSpec) -> int:
    """Bytes of the artifact (equals os.path.getsize of the exported file)."""
    header = layout(model, spec)
    return framing_size(header) + payload_size(header["entries"])


def size_breakdown(model: nn.Module, spec: ModelSpec) -> dict[str, int]:
    """Bytes per stored tensor plus 'header' (framing + compressed JSON) and 'total'."""
    header = layout(model, spec)
    out = {e.get("name") or f"{e['module']}.act": sum(chunk_sizes(e)) for e in header["entries"]}
    out["header"] = framing_size(header)
    out["total"] = sum(out.values())
    return out


def untouchable_bytes(model: nn.Module, spec: ModelSpec) -> int:
    """Bytes of a compressed model's artifact that no layer plan changes: the framing, the header
    and the float tensors outside every weight slot (biases, BatchNorm that could not be folded,
    LayerNorm, positional embeddings, class tokens), stored at the plan's float_bits. Measured on
    the space's floor plan (see space_untouchable), it is what stays whatever the plan."""
    header = layout(model, spec)
    return framing_size(header) + payload_size(e for e in header["entries"] if e["t"] != "q")


def space_untouchable(model: nn.Module, space: Any, spec: ModelSpec, example: torch.Tensor) -> int:
    """untouchable_bytes of the space's smallest plan (a BoundSpace): the bytes no plan can touch."""
    from ..compression import compress

    return untouchable_bytes(compress(model, space.smallest(), example, calibrate=False), spec)
