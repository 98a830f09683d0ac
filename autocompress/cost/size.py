"""Artifact size: the exact byte count export() would write for a compressed model."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import ModelSpec


def artifact_size(model: nn.Module, spec: ModelSpec) -> int:
    """Bytes of the artifact (equals os.path.getsize of the exported file)."""
    from ..artifact import artifact_bytes

    return len(artifact_bytes(model, spec))


def size_breakdown(model: nn.Module, spec: ModelSpec) -> dict[str, int]:
    """Bytes per stored tensor plus 'header' (framing + compressed JSON) and 'total'."""
    from ..artifact import artifact_bytes, chunk_sizes, encode

    header, _ = encode(model, spec)
    out: dict[str, int] = {}
    for e in header["entries"]:
        out[e.get("name") or f"{e['module']}.act"] = sum(chunk_sizes(e))
    total = len(artifact_bytes(model, spec))
    out["header"] = total - sum(out.values())
    out["total"] = total
    return out


def untouchable_bytes(model: nn.Module, spec: ModelSpec) -> int:
    """Bytes of a compressed model's artifact that no layer plan changes: the framing, the header
    and the float tensors outside every weight slot (biases, BatchNorm that could not be folded,
    LayerNorm, positional embeddings, class tokens), stored at the plan's float_bits. Measured on
    the space's floor plan (see space_untouchable), it is what stays whatever the plan."""
    from ..artifact import artifact_bytes, chunk_sizes, encode

    header, _ = encode(model, spec)
    planned = sum(sum(chunk_sizes(e)) for e in header["entries"] if e["t"] == "q")
    return len(artifact_bytes(model, spec)) - planned


def space_untouchable(model: nn.Module, space: Any, spec: ModelSpec, example: torch.Tensor) -> int:
    """untouchable_bytes of the space's smallest plan (a BoundSpace): the bytes no plan can touch."""
    from ..compression import compress

    return untouchable_bytes(compress(model, space.smallest(), example, calibrate=False), spec)
