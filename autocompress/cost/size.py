"""Artifact size: the exact byte count export() would write for a compressed model.

Computed without building the payload: every payload stream's length follows from the shapes,
the bit widths and the masks (never from weight values), so only the masks are read, never the
quantised codes. The header (compressed JSON) is built for real, with the same entries as the
writer's. The repair and the warm start size dozens of plans per trial; this takes a fraction of
artifact_bytes' time and memory (no parametrization is evaluated, no code array is packed).
tests/test_artifact.py asserts equality with the written file for every kind of plan.
"""
from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models import ModelSpec


def _layer_entry(name: str, attr: str, mod: nn.Module, lp: dict) -> dict:
    """artifact._quantized_entry's header entry (with its stream sizes), from the mask alone."""
    from ..compression import codec, compressor
    from ..compression.prune import blocks_of

    comp = compressor(mod, attr)
    bits, sym = comp.bits, comp.symmetric
    shape = list(mod.parametrizations[attr].original.shape)
    out, numel = shape[0], int(np.prod(shape))
    sizes: list[int] = []
    if bits <= 8:
        sizes.append(2 * out)  # float16 scales
        if not sym and bits > 1:
            sizes.append(codec.nbytes(out * bits))  # zero points
    entry: dict = {"t": "q", "name": f"{name}.{attr}", "module": name, "shape": shape, "bits": bits, "sym": sym}
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
        if not (bits > 1 or count == numel) or sparse_size < dense_size:
            entry["mask"] = dict(info, unit=unit, **({"bs": lp["block_size"]} if unit == "b" else {}))
            entry["sizes"] = sizes + msizes + [codec.nbytes(count * bits)]
            return entry
    entry["mask"] = {"kind": "dense"}
    entry["sizes"] = sizes + [dense_size]
    return entry


def _float_shapes(model: nn.Module, skip: set[str]) -> dict[str, list[int]]:
    """Names and shapes of artifact._plain_state's tensors, without evaluating parametrizations
    (every parametrization compress() registers keeps its tensor's shape; others are evaluated),
    leaving out the modules in `skip` (folded BatchNorms) and everything below them."""
    from ..artifact import _ACT_BUFFERS
    from ..compression.fold import FoldedBias
    from ..compression.quantize import HalfRound, WeightCompressor

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
                same = all(isinstance(f, (WeightCompressor, HalfRound, FoldedBias)) for f in plist)
                out[prefix + k] = list(plist.original.shape if same else getattr(mod, k).shape)
        for k, t in mod._buffers.items():
            if t is None or k in mod._non_persistent_buffers_set or k in _ACT_BUFFERS:
                continue
            if k == "num_batches_tracked" or "parametrizations" in k:
                continue
            out[prefix + k] = list(t.shape)
    return out


def layout(model: nn.Module, spec: ModelSpec) -> tuple[dict, list[int]]:
    """(the artifact's header, each entry's payload bytes), as artifact.encode would write them."""
    from ..artifact import FORMAT_VERSION, _layer_plan, chunk_sizes
    from ..compression import RECORD_ATTR, compressed_weights
    from ..errors import UserError

    record = getattr(model, RECORD_ATTR, None)
    if record is None:
        raise UserError("the model was not produced by autocompress.compress(); nothing to export")
    plan_fb = record["plan"].get("float_bits", 32)
    entries: list[dict] = []
    qnames = set()
    for name, attr, mod in compressed_weights(model):
        e = _layer_entry(name, attr, mod, _layer_plan(record, name))
        entries.append(e)
        qnames.add(e["name"])
    for key, shape in _float_shapes(model, {bn for _, bn in record.get("folded", [])}).items():
        if key in qnames:
            continue
        entries.append({"t": "f", "name": key, "shape": shape, "bits": plan_fb})
    for name in record["acts"]:
        entries.append({"t": "act", "module": name, "bits": model.get_submodule(name).act_bits})
    sizes = [sum(chunk_sizes(e)) for e in entries]  # the writer's and reader's size rule per entry
    rec = {k: record[k] for k in ("plan", "input_shape", "channel_replay", "ranks", "targets", "acts")}
    if record.get("folded"):
        rec["folded"] = record["folded"]
    header = {"format": FORMAT_VERSION, "spec": spec.to_dict(), "record": rec, "entries": entries}
    return header, sizes


def _framing(header: dict) -> int:
    """Bytes of everything but the payload: prefix, compressed JSON header, CRC32."""
    from ..artifact import _PRE

    hz = zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), 9)
    return _PRE.size + len(hz) + 4


def artifact_size(model: nn.Module, spec: ModelSpec) -> int:
    """Bytes of the artifact (equals os.path.getsize of the exported file)."""
    header, sizes = layout(model, spec)
    return _framing(header) + sum(sizes)


def size_breakdown(model: nn.Module, spec: ModelSpec) -> dict[str, int]:
    """Bytes per stored tensor plus 'header' (framing + compressed JSON) and 'total'."""
    header, sizes = layout(model, spec)
    out: dict[str, int] = {}
    for e, n in zip(header["entries"], sizes):
        key = e.get("name") or f"{e['module']}.act"
        out[key] = n
    out["header"] = _framing(header)
    out["total"] = out["header"] + sum(sizes)
    return out


def untouchable_bytes(model: nn.Module, spec: ModelSpec) -> int:
    """Bytes of a compressed model's artifact that no layer plan changes: the framing, the header
    and the float tensors outside every weight slot (biases, BatchNorm that could not be folded,
    LayerNorm, positional embeddings, class tokens), stored at the plan's float_bits. Measured on
    the space's floor plan (see space_untouchable), it is what stays whatever the plan."""
    header, sizes = layout(model, spec)
    return _framing(header) + sum(n for e, n in zip(header["entries"], sizes) if e["t"] != "q")


def space_untouchable(model: nn.Module, space: Any, spec: ModelSpec, example: torch.Tensor) -> int:
    """untouchable_bytes of the space's smallest plan (a BoundSpace): the bytes no plan can touch."""
    from ..compression import compress

    return untouchable_bytes(compress(model, space.smallest(), example, calibrate=False), spec)
