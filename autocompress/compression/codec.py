"""Bit-level codecs for the artifact: fixed-width packing, Golomb-Rice gaps, N:M combination indices.

Everything is vectorised with numpy (no Python loop per weight). Every size depends only on the
mask and the bit widths, never on the weight values, so it is fixed before fine-tuning.
"""
from __future__ import annotations

import math

import numpy as np

MAX_RICE_K = 30


def nbytes(nbits: int) -> int:
    return (nbits + 7) // 8


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers at `width` bits each, MSB first, into ceil(n*width/8) bytes."""
    v = np.asarray(values, dtype=np.uint64).ravel()
    if width == 0 or v.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel()).tobytes()


def unpack_uint(buf: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of pack_uint: `count` integers of `width` bits (int64)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    weights = (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def gaps_of(mask: np.ndarray) -> np.ndarray:
    """Zero-run lengths before each set position of a flat boolean array."""
    pos = np.flatnonzero(mask).astype(np.int64)
    return np.diff(pos, prepend=-1) - 1


def rice_bits(gaps: np.ndarray, k: int) -> tuple[int, int]:
    """(unary bits, remainder bits) of Rice-coding `gaps` with parameter k."""
    return int((gaps >> k).sum()) + gaps.size, gaps.size * k


def best_rice_k(gaps: np.ndarray) -> tuple[int, int]:
    """The Rice parameter with the fewest bytes, and that byte count."""
    best = (0, 1 << 62)
    for k in range(MAX_RICE_K + 1):
        u, r = rice_bits(gaps, k)
        size = nbytes(u) + nbytes(r)
        if size < best[1]:
            best = (k, size)
        if k and (gaps >> k).sum() == 0:
            break
    return best


def rice_encode(gaps: np.ndarray, k: int) -> list[bytes]:
    """Two streams: unary quotients (q zeros then a one) and k-bit remainders."""
    if gaps.size == 0:
        return [b"", b""]
    q = gaps >> k
    ends = np.cumsum(q + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    bits[ends] = 1
    return [np.packbits(bits).tobytes(), pack_uint(gaps & ((1 << k) - 1), k)]


def rice_decode(unary: bytes, rem: bytes, count: int, k: int) -> np.ndarray:
    """Inverse of rice_encode: the `count` gaps."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(np.unpackbits(np.frombuffer(unary, dtype=np.uint8)))[:count]
    if ends.size != count:
        raise ValueError("Rice stream ends early")
    q = np.diff(ends, prepend=-1) - 1
    return (q.astype(np.int64) << k) | unpack_uint(rem, count, k)


def _comb_table(m: int, n: int) -> np.ndarray:
    return np.array([[math.comb(c, j) for j in range(n + 1)] for c in range(m + 1)], dtype=np.int64)


def nm_width(n: int, m: int) -> int:
    """Bits per group of an N:M combination index: ceil(log2 C(m, n))."""
    return max(0, math.ceil(math.log2(math.comb(m, n))))


def nm_rank(mask: np.ndarray, n: int, m: int) -> np.ndarray | None:
    """Combinatorial-number-system index of each group of m (None if a group does not keep n)."""
    groups = mask.reshape(-1, m)
    if not (groups.sum(axis=1) == n).all():
        return None
    pos = np.nonzero(groups)[1].reshape(-1, n)  # ascending within each group
    table = _comb_table(m, n)
    return sum(table[pos[:, j], j + 1] for j in range(n))


def nm_unrank(ranks: np.ndarray, n: int, m: int) -> np.ndarray:
    """Inverse of nm_rank: the flat boolean mask."""
    table = _comb_table(m, n)
    r = ranks.astype(np.int64).copy()
    out = np.zeros((r.size, m), dtype=bool)
    rows = np.arange(r.size)
    for j in range(n, 0, -1):
        col = table[:m, j]
        c = np.searchsorted(col, r, side="right") - 1
        r -= col[c]
        out[rows, c] = True
    return out.ravel()


def encode_mask(mask: np.ndarray, nm: tuple[int, int] | None = None) -> tuple[dict, list[bytes]]:
    """The cheapest coding of a flat boolean mask: bitmap, Rice gaps of ones or of zeros, N:M index."""
    mask = mask.astype(bool).ravel()
    options: list[tuple[int, dict, object]] = [(nbytes(mask.size), {"kind": "bitmap"}, None)]
    for invert in (False, True):
        gaps = gaps_of(mask != invert)
        k, size = best_rice_k(gaps)
        options.append((size, {"kind": "rice", "k": k, "invert": invert, "count": int(gaps.size)}, gaps))
    if nm is not None and mask.size % nm[1] == 0:
        ranks = nm_rank(mask, *nm)
        if ranks is not None:
            options.append((nbytes(ranks.size * nm_width(*nm)), {"kind": "nm", "n": nm[0], "m": nm[1]}, ranks))
    size, info, data = min(options, key=lambda o: o[0])
    if info["kind"] == "bitmap":
        streams = [np.packbits(mask).tobytes()]
    elif info["kind"] == "rice":
        streams = rice_encode(data, info["k"])
    else:
        streams = [pack_uint(data, nm_width(*nm))]
    assert sum(map(len, streams)) == size
    return info, streams


def decode_mask(info: dict, streams: list[bytes], size: int) -> np.ndarray:
    """Inverse of encode_mask: the flat boolean mask of `size` entries."""
    kind = info["kind"]
    if kind == "bitmap":
        return np.unpackbits(np.frombuffer(streams[0], dtype=np.uint8), count=size).astype(bool)
    if kind == "rice":
        gaps = rice_decode(streams[0], streams[1], info["count"], info["k"])
        pos = np.cumsum(gaps + 1) - 1
        if pos.size and pos[-1] >= size:
            raise ValueError("Rice positions out of range")
        out = np.zeros(size, dtype=bool)
        out[pos] = True
        return out != info["invert"]
    if kind == "nm":
        n, m = info["n"], info["m"]
        return nm_unrank(unpack_uint(streams[0], size // m, nm_width(n, m)), n, m)
    raise ValueError(f"unknown mask codec {kind!r}")
