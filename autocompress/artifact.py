"""The packed artifact: writer, reader and load().

Layout: MAGIC | version (u8) | header length (u32 LE) | zlib(JSON header) | payload | CRC32 (u32 LE).
The header holds structure only (names, shapes, codecs, bits, plan, spec, channel-prune replay,
ranks); the payload holds fixed-width data whose length depends only on that structure. So the
size of a freshly compressed model's artifact is exactly the size after fine-tuning.
"""
from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
import zlib
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .compression import RECORD_ATTR, channel, codec, compressed_weights, compressor, fold, lowrank, quantize
from .compression.prune import blocks_of
from .errors import UserError
from .models import HALF_MAX, ModelSpec, build_model, set_submodule
from .plan import CompressionPlan

MAGIC = b"ACZP"
FORMAT_VERSION = 1
_PRE = struct.Struct("<4sBI")
_ACT_BUFFERS = ("act_scale", "act_zero_point")
_FLOAT_DTYPE = {16: np.dtype("<f2"), 32: np.dtype("<f4")}
# An activation entry's payload: the input quantiser's scale (float32) and zero point (uint8).
ACT_RECORD = struct.Struct("<fB")
ACT_BYTES = ACT_RECORD.size


def chunk_sizes(entry: dict) -> list[int]:
    """Byte lengths of one header entry's payload chunks: the size rule of each entry kind, in one place.

    "q" (quantised weight): its recorded `sizes` (scales, zero points, mask streams, codes);
    "f" (float tensor): one chunk of shape x bits / 8; "act" (activation quantiser): ACT_BYTES.
    Every length follows from the header alone, which is what makes the artifact's size known
    before fine-tuning and lets the reader check a file's length before decoding it."""
    kind = entry["t"]
    if kind == "q":
        return [int(n) for n in entry["sizes"]]
    if kind == "f":
        return [int(np.prod(entry["shape"])) * entry["bits"] // 8]
    if kind == "act":
        return [ACT_BYTES]
    raise ValueError(f"unknown payload entry kind {kind!r}")


def payload_size(entries: Iterable[dict]) -> int:
    """Total payload bytes the header entries describe."""
    return sum(sum(chunk_sizes(e)) for e in entries)


def walk_payload(entries: Iterable[dict], payload: bytes | memoryview) -> Iterator[tuple[dict, list[memoryview]]]:
    """Each header entry with its payload chunks (zero-copy views), in payload order."""
    view, pos = memoryview(payload), 0
    for e in entries:
        chunks = []
        for n in chunk_sizes(e):
            if pos + n > len(view):
                raise ValueError(f"payload ends inside entry {e.get('name') or e.get('module')!r}")
            chunks.append(view[pos:pos + n])
            pos += n
        yield e, chunks


def _plain_state(model: nn.Module, skip: set[str] = frozenset(), skip_keys: set[str] = frozenset()
                 ) -> dict[str, torch.Tensor]:
    """Effective float tensors (parametrizations evaluated) under their plain state-dict names,
    leaving out the modules in `skip` (folded BatchNorms) and everything below them, and the
    tensors named in `skip_keys` (stored elsewhere: not evaluated)."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mname, mod in model.named_modules():
            if "parametrizations" in mname.split(".") or any(mname == s or mname.startswith(s + ".") for s in skip):
                continue
            prefix = f"{mname}." if mname else ""
            names = [k for k, p in mod._parameters.items() if p is not None]
            if parametrize.is_parametrized(mod):
                names += list(mod.parametrizations.keys())
            for k in names:
                if prefix + k not in skip_keys:
                    out[prefix + k] = getattr(mod, k).detach()
            for k, t in mod._buffers.items():
                if t is None or k in mod._non_persistent_buffers_set or k in _ACT_BUFFERS:
                    continue
                if k == "num_batches_tracked" or "parametrizations" in k:
                    continue
                out[prefix + k] = t.detach()
    return out


def _layer_plan(record: dict, module: str) -> dict:
    return record["plan"]["layers"][record["targets"][module]]


def _weight_entry(name: str, attr: str, mod: nn.Module, lp: dict) -> dict:
    """The header entry of a compressed weight, with its stream sizes, from its mask and shape
    alone: scales (and zero points) at <= 8 bits, then the codes of every weight (dense), or the
    mask's streams and the codes of the kept weights, whichever is smaller."""
    comp = compressor(mod, attr)
    bits, sym = comp.bits, comp.symmetric
    shape = list(mod.parametrizations[attr].original.shape)
    out, numel = shape[0], int(np.prod(shape))
    sizes: list[int] = []
    if bits <= 8:
        sizes.append(2 * out)  # float16 scales
        if not sym and bits > 1:
            sizes.append(codec.nbytes(out * bits))  # zero points
    entry: dict[str, Any] = {"t": "q", "name": f"{name}.{attr}", "module": name, "shape": shape, "bits": bits,
                             "sym": sym}
    dense_size = codec.nbytes(numel * bits)
    if comp.mask is not None:
        mask = (comp.mask != 0).cpu().numpy().ravel()
        count = int(np.count_nonzero(mask))
        unit, nm = "w", None
        if lp["prune"] == "block":
            unit, unit_mask = "b", (blocks_of(comp.mask, lp["block_size"]) != 0).cpu().numpy().ravel()
        else:
            unit_mask = mask
            if lp["prune"] == "nm":
                nm = (lp["n"], lp["m"])
        info, msizes = codec.mask_code(unit_mask, nm)
        sparse_size = sum(msizes) + codec.nbytes(count * bits)
        if not (bits > 1 or count == numel) or sparse_size < dense_size:  # 1-bit codes cannot hold a zero
            entry["mask"] = dict(info, unit=unit, **({"bs": lp["block_size"]} if unit == "b" else {}))
            entry["sizes"] = sizes + msizes + [codec.nbytes(count * bits)]
            return entry
    entry["mask"] = {"kind": "dense"}
    entry["sizes"] = sizes + [dense_size]
    return entry


def _float_shapes(model: nn.Module, skip: set[str]) -> dict[str, list[int]]:
    """Names and shapes of _plain_state's tensors without evaluating the parametrizations that
    keep their tensor's shape (every one compress() registers); others are evaluated."""
    from .compression.quantize import HalfRound, WeightCompressor

    out: dict[str, list[int]] = {}
    for mname, mod in model.named_modules():
        if "parametrizations" in mname.split(".") or any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        prefix = f"{mname}." if mname else ""
        for k, p in mod._parameters.items():
            if p is not None:
                out[prefix + k] = list(p.shape)
        if parametrize.is_parametrized(mod):
            for k, plist in mod.parametrizations.items():
                same = all(isinstance(f, (WeightCompressor, HalfRound, fold.FoldedBias)) for f in plist)
                out[prefix + k] = list(plist.original.shape if same else getattr(mod, k).shape)
        for k, t in mod._buffers.items():
            if t is None or k in mod._non_persistent_buffers_set or k in _ACT_BUFFERS:
                continue
            if k == "num_batches_tracked" or "parametrizations" in k:
                continue
            out[prefix + k] = list(t.shape)
    return out


def layout(model: nn.Module, spec: ModelSpec) -> dict:
    """The artifact's header for a compressed model, built from masks and shapes alone (no weight
    value is read, no code packed): every entry with its stream sizes. encode() fills the payload
    from it, and the size (cost.artifact_size) is the framing plus payload_size(entries), exactly."""
    record = getattr(model, RECORD_ATTR, None)
    if record is None:
        raise UserError("the model was not produced by autocompress.compress(); nothing to export")
    plan_fb = record["plan"].get("float_bits", 32)
    entries = [_weight_entry(name, attr, mod, _layer_plan(record, name))
               for name, attr, mod in compressed_weights(model)]
    qnames = {e["name"] for e in entries}
    for key, shape in _float_shapes(model, {bn for _, bn in record.get("folded", [])}).items():
        if key not in qnames:
            entries.append({"t": "f", "name": key, "shape": shape, "bits": plan_fb})
    for name in record["acts"]:
        entries.append({"t": "act", "module": name, "bits": model.get_submodule(name).act_bits})
    rec = {k: record[k] for k in ("input_shape", "channel_replay", "ranks", "targets", "acts")}
    rec["plan"] = CompressionPlan.from_dict(record["plan"]).stored().to_dict()
    if record.get("folded"):
        rec["folded"] = record["folded"]
    return {"format": FORMAT_VERSION, "spec": spec.to_dict(), "record": rec, "entries": entries}


def _as_stored(t: torch.Tensor, bits: int) -> np.ndarray:
    """A float tensor as the flat array stored at `bits` (16: saturated to the float16 range, as
    models.half_round gives the model the same values)."""
    arr = t.detach().float().cpu().flatten().numpy()
    return (np.clip(arr, -HALF_MAX, HALF_MAX) if bits == 16 else arr).astype(_FLOAT_DTYPE[bits])


def _weight_streams(mod: nn.Module, attr: str, entry: dict) -> list[bytes]:
    """The payload streams of a compressed weight, in the coding its header entry says."""
    comp = compressor(mod, attr)
    bits, sym = comp.bits, comp.symmetric
    comp.ensure_clip(mod.parametrizations[attr].original.detach())
    w_dev = comp.effective(mod.parametrizations[attr].original.detach())
    streams: list[bytes] = []
    if bits <= 8:
        q, s, zp = (t.cpu() for t in comp.quantize(w_dev))
        codes = (q.flatten().numpy() + quantize.code_offset(bits, sym)).astype(np.int64)
        if bits == 1:
            codes = (codes + 1) // 2
        streams.append(s.flatten().numpy().astype("<f2").tobytes())
        if not sym and bits > 1:
            streams.append(codec.pack_uint(zp.flatten().numpy().astype(np.int64), bits))
        pack = lambda sel: codec.pack_uint(codes[sel], bits)  # noqa: E731
    else:
        vals = _as_stored(w_dev, bits)
        pack = lambda sel: vals[sel].tobytes()  # noqa: E731
    minfo = entry["mask"]
    if minfo["kind"] == "dense":
        return streams + [pack(slice(None))]
    mask = comp.mask.detach().cpu().numpy().astype(bool).ravel()
    unit_mask = blocks_of(comp.mask, minfo["bs"]).cpu().numpy().astype(bool).ravel() if minfo["unit"] == "b" else mask
    return streams + codec.mask_streams(unit_mask, minfo) + [pack(mask)]


def encode(model: nn.Module, spec: ModelSpec) -> tuple[dict, list[bytes]]:
    """The artifact's header (layout) and its payload streams (the chunks walk_payload gives back)."""
    header = layout(model, spec)
    record = getattr(model, RECORD_ATTR)
    qnames = {e["name"] for e in header["entries"] if e["t"] == "q"}
    training = model.training
    model.eval()  # the folded BatchNorm values are the eval-mode ones
    try:
        state = _plain_state(model, {bn for _, bn in record.get("folded", [])}, qnames)
        streams: list[bytes] = []
        for e in header["entries"]:
            if e["t"] == "q":
                chunks = _weight_streams(model.get_submodule(e["module"]), e["name"].rpartition(".")[2], e)
            elif e["t"] == "f":
                chunks = [_as_stored(state[e["name"]], e["bits"]).tobytes()]
            else:
                mod = model.get_submodule(e["module"])
                chunks = [ACT_RECORD.pack(float(mod.act_scale), int(mod.act_zero_point))]
            if [len(c) for c in chunks] != chunk_sizes(e):
                raise RuntimeError(f"artifact entry {e.get('name') or e['module']}: streams do not match the layout")
            streams += chunks
    finally:
        model.train(training)
    return header, streams


def header_bytes(header: dict) -> bytes:
    """The compressed JSON header as stored."""
    return zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), 9)


def framing_size(header: dict) -> int:
    """Bytes of everything but the payload: prefix, compressed JSON header, CRC32."""
    return _PRE.size + len(header_bytes(header)) + 4


def artifact_bytes(model: nn.Module, spec: ModelSpec) -> bytes:
    """The complete artifact of a compressed model, as bytes."""
    header, streams = encode(model, spec)
    hz = header_bytes(header)
    body = _PRE.pack(MAGIC, FORMAT_VERSION, len(hz)) + hz + b"".join(streams)
    return body + struct.pack("<I", zlib.crc32(body))


def export(model: nn.Module, path: str | os.PathLike, spec: ModelSpec) -> int:
    """Write the artifact atomically (temp file + os.replace); return the bytes written."""
    data = artifact_bytes(model, spec)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".autocompress-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def read_artifact(path: str | os.PathLike) -> tuple[dict, memoryview]:
    """The artifact's full header and its payload, after checking framing, length and checksum."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read artifact {path}: {e.strerror}") from None
    bad = f"{path} is not a valid autocompress artifact"
    if len(data) < _PRE.size + 4:
        raise UserError(f"{bad}: file is truncated ({len(data)} bytes)")
    magic, version, hlen = _PRE.unpack_from(data)
    if magic != MAGIC:
        raise UserError(f"{bad}: wrong magic bytes")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: artifact format {version} is not supported (this build reads {FORMAT_VERSION})")
    try:
        header = json.loads(zlib.decompress(data[_PRE.size:_PRE.size + hlen]))
        total = payload_size(header["entries"])
    except Exception:
        raise UserError(f"{bad}: header is truncated or corrupt") from None
    if len(data) != _PRE.size + hlen + total + 4:
        raise UserError(f"{bad}: expected {_PRE.size + hlen + total + 4} bytes, found {len(data)} (truncated?)")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if crc != zlib.crc32(data[:-4]):
        raise UserError(f"{bad}: checksum mismatch (file is corrupt)")
    return header, memoryview(data)[_PRE.size + hlen:-4]


def read_header(path: str | os.PathLike) -> dict:
    """The artifact's header: format version, model spec, plan and structure."""
    header, _ = read_artifact(path)
    return {"format": header["format"], "spec": header["spec"], "plan": header["record"]["plan"],
            **{k: v for k, v in header.items() if k not in ("format", "spec")}}


def _decode_quantized(e: dict, chunks: list[bytes]) -> torch.Tensor:
    shape, bits, sym = e["shape"], e["bits"], e["sym"]
    numel, out = int(np.prod(shape)), shape[0]
    chunks = list(chunks)
    if bits <= 8:
        s = torch.from_numpy(np.frombuffer(chunks.pop(0), dtype="<f2").astype(np.float32)).view(out, 1)
        zp = torch.zeros_like(s)
        if not sym and bits > 1:
            zp = torch.from_numpy(codec.unpack_uint(chunks.pop(0), out, bits).astype(np.float32)).view(out, 1)
    minfo = e["mask"]
    mask = None
    if minfo["kind"] != "dense":
        unit = minfo["unit"]
        mstreams = chunks[:-1]
        if unit == "b":
            bs = minfo["bs"]
            nb = -(-(numel // out) // bs)
            blocks = codec.decode_mask(minfo, mstreams, out * nb)
            full = np.repeat(blocks.reshape(out, nb), bs, axis=1)[:, :numel // out]
            mask = full.ravel()
        else:
            mask = codec.decode_mask(minfo, mstreams, numel)
    count = numel if mask is None else int(mask.sum())
    if bits <= 8:
        kept = codec.unpack_uint(chunks[-1], count, bits)
        codes = np.repeat(zp.numpy().astype(np.int64).ravel(), numel // out) if not sym else \
            np.full(numel, quantize.code_offset(bits, sym), dtype=np.int64)
        if mask is None:
            codes = kept
        else:
            codes[mask] = kept
        if bits == 1:
            q = codes * 2 - 1
        else:
            q = codes - quantize.code_offset(bits, sym)
        w2 = quantize.dequantize(torch.from_numpy(q.astype(np.float32)).view(out, -1), s, zp)
    else:
        vals = np.frombuffer(chunks[-1], dtype=_FLOAT_DTYPE[bits]).astype(np.float32)
        full = vals if mask is None else np.zeros(numel, dtype=np.float32)
        if mask is not None:
            full[mask] = vals
        w2 = torch.from_numpy(full.copy()).view(out, -1)
    if mask is not None:
        w2 = w2 * torch.from_numpy(mask.astype(np.float32)).view(out, -1)
    return w2.reshape(shape)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the deployable model (plain layers, dequantised weights, eval mode) from an artifact."""
    header, payload = read_artifact(path)
    try:
        rec = header["record"]
        spec = ModelSpec(**header["spec"])
    except (KeyError, TypeError):
        raise UserError(f"{path}: artifact header has a malformed model spec") from None
    model = build_model(spec) if model is None else copy.deepcopy(model)
    model.eval()
    try:
        channel.replay_channels(model, torch.zeros(1, *rec["input_shape"]), rec["channel_replay"])
        for name, rank in rec["ranks"].items():
            set_submodule(model, name, lowrank.skeleton(model.get_submodule(name), rank))
        fold.replay(model, rec.get("folded", []))
    except Exception as e:
        raise UserError(f"{path}: the artifact does not fit model {spec.spec!r} ({type(e).__name__}: {e})"
                        .splitlines()[0]) from None
    state: dict[str, torch.Tensor] = {}
    acts: dict[str, tuple[int, float, int]] = {}
    try:
        for e, chunks in walk_payload(header["entries"], payload):
            if e["t"] == "q":
                state[e["name"]] = _decode_quantized(e, [bytes(c) for c in chunks])
            elif e["t"] == "f":
                vals = np.frombuffer(chunks[0], dtype=_FLOAT_DTYPE[e["bits"]]).astype(np.float32)
                state[e["name"]] = torch.from_numpy(vals.copy()).reshape(e["shape"])
            else:
                scale, zp = ACT_RECORD.unpack(chunks[0])
                acts[e["module"]] = (e["bits"], scale, zp)
    except Exception as ex:  # the checksum passed, so this is a malformed (not a damaged) file
        raise UserError(f"{path}: artifact payload is corrupt ({ex})".splitlines()[0]) from None
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    bad = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad:
        what = sorted(missing)[:3] + sorted(extra)[:3] + sorted(bad)[:3]
        raise UserError(f"{path}: the artifact does not fit model {spec.spec!r} (mismatched: {', '.join(what)})")
    state = OrderedDict(state)  # with the model's own metadata: MNASNet refuses a state dict without its version
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=False)
    for name, (bits, scale, zp) in acts.items():
        quantize.attach_act_quant(model.get_submodule(name), bits, scale, zp)
    return model.eval()
