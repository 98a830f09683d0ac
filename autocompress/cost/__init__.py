"""Cost of a compressed model: artifact size in bytes (latency lives beside it)."""
from __future__ import annotations

from .size import artifact_size, size_breakdown, space_untouchable, untouchable_bytes

__all__ = ["artifact_size", "size_breakdown", "space_untouchable", "untouchable_bytes"]
