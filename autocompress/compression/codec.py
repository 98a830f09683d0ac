"""Bit-level codecs for the artifact: fixed-width packing, Golomb-Rice gaps, N:M combination indices.

Everything is vectorised with numpy (no Python loop per weight). Every size depends only on the
mask and the bit widths, never on the weight values, so it is fixed before fine-tuning.
"""
from __future__ import annotations

import math

import numpy as np

MAX_RICE_K = 30
CHUNK = 1 << 22  # values per step of the chunked loops (a multiple of 8)


def nbytes(nbits: int) -> int:
    return (nbits + 7) // 8


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers at `width` bits each, MSB first, into ceil(n*width/8) bytes.

    Works through CHUNK values at a time (a multiple of 8, so every chunk ends on a byte): the
    bit matrix is width bytes per value, which for a whole VGG fc layer would be gigabytes."""
    v = np.asarray(values).ravel()
    if width == 0 or v.size == 0:
        return b""
    dtype = ">u1" if width <= 8 else ">u4" if width <= 32 else ">u8"
    nbits = np.dtype(dtype).itemsize * 8
    out = []
    for i in range(0, v.size, CHUNK):
        part = v[i:i + CHUNK].astype(dtype).view(np.uint8).reshape(-1, nbits // 8)
        bits = np.unpackbits(part, axis=1)[:, nbits - width:]
        out.append(np.packbits(bits.ravel()).tobytes())
    return b"".join(out)


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
    return _best_k(gaps.size, _shifted_sums([gaps]))


def _shifted_sums(gap_chunks) -> list[int]:
    """sum(gap >> k) for k = 0..MAX_RICE_K over an iterable of gap arrays."""
    totals = [0] * (MAX_RICE_K + 1)
    for gaps in gap_chunks:
        for k in range(MAX_RICE_K + 1):
            part = int((gaps >> k).sum())
            if part == 0:
                break
            totals[k] += part
    return totals


def _best_k(count: int, shifted: list[int]) -> tuple[int, int]:
    best = (0, 1 << 62)
    for k in range(MAX_RICE_K + 1):
        size = nbytes(shifted[k] + count) + nbytes(count * k)
        if size < best[1]:
            best = (k, size)
        if k and shifted[k] == 0:
            break
    return best


def _run_gaps(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero gaps of gaps_of(mask) and of gaps_of(~mask), from the mask's runs.

    Every gap before a set position is 0 except the first of a run of ones, whose gap is the run
    of zeros before it: so the non-zero gaps are the zero runs not at the end (one-runs for the
    inverted mask). Runs are far fewer than positions, and gaps of 0 add nothing to a Rice size."""
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    lengths = np.diff(starts, prepend=0, append=mask.size)
    first_is_one = bool(mask[0])
    ones = lengths[0 if first_is_one else 1::2]
    zeros = lengths[1 if first_is_one else 0::2]
    last_is_one = bool(mask[-1])
    return (zeros if last_is_one else zeros[:-1]), (ones[:-1] if last_is_one else ones)


def mask_code(mask: np.ndarray, nm: tuple[int, int] | None = None) -> tuple[dict, list[int]]:
    """The cheapest coding of a flat boolean mask (bitmap, Rice gaps of ones or of zeros, N:M
    index) and its stream lengths in bytes, without building the streams: what encode_mask
    writes, in a fraction of the time and memory (the artifact is sized many times per search)."""
    mask = mask.astype(bool, copy=False).ravel()
    options: list[tuple[int, dict, list[int]]] = [(nbytes(mask.size), {"kind": "bitmap"}, [nbytes(mask.size)])]
    nm_option = []
    if nm is not None and mask.size % nm[1] == 0:
        n, m = nm
        if (np.count_nonzero(mask.reshape(-1, m), axis=1) == n).all():
            size = nbytes(mask.size // m * nm_width(n, m))
            nm_option.append((size, {"kind": "nm", "n": n, "m": m}, [size]))
    best = min(o[0] for o in options + nm_option)
    ones = int(np.count_nonzero(mask))
    counts = {False: ones, True: mask.size - ones}
    rice = [inv for inv in (False, True) if _rice_floor(mask, not inv, counts[inv]) < best]
    if rice:  # the runs only when a Rice coding can be the cheapest (dense N:M masks have many)
        for invert, gaps in zip((False, True), _run_gaps(mask)):
            if invert in rice:
                count = counts[invert]
                shifted = _shifted_sums([gaps])
                k, size = _best_k(count, shifted)
                sizes = [nbytes(shifted[k] + count), nbytes(count * k)]
                options.append((size, {"kind": "rice", "k": k, "invert": invert, "count": count}, sizes))
    _, info, sizes = min(options + nm_option, key=lambda o: o[0])
    return info, sizes


def _rice_floor(mask: np.ndarray, value: bool, count: int) -> int:
    """A lower bound of the bytes of any Rice coding of the `count` positions where mask == value:
    with k = 0 the unary stream holds every gap plus a stop bit per position (the gaps add up to
    the other values before the last such position); with k >= 1 it holds at least a stop bit per
    position and the remainders at least a bit each."""
    if count == 0:
        return 0
    last = mask.size - 1 - int(np.argmax(mask[::-1] == value))
    return min(nbytes(last + 1), 2 * nbytes(count))


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
    """The cheapest coding of a flat boolean mask (chosen by mask_code), and its streams."""
    mask = mask.astype(bool, copy=False).ravel()
    info, sizes = mask_code(mask, nm)
    streams = mask_streams(mask, info)
    assert [len(s) for s in streams] == sizes
    return info, streams


def mask_streams(mask: np.ndarray, info: dict) -> list[bytes]:
    """The streams of a flat boolean mask in the coding `info` (as mask_code chose it)."""
    mask = mask.astype(bool, copy=False).ravel()
    if info["kind"] == "bitmap":
        return [np.packbits(mask).tobytes()]
    if info["kind"] == "rice":
        return rice_encode(gaps_of(mask != info["invert"]), info["k"])
    return [pack_uint(nm_rank(mask, info["n"], info["m"]), nm_width(info["n"], info["m"]))]


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
