"""Artifact size: the exact byte count export() would write for a compressed model."""
from __future__ import annotations

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
