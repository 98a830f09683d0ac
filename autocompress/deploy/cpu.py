"""CPU deployment: torch.ao int8 kernels (FX graph mode, engines x86/oneDNN and fbgemm), frozen
with TorchScript.

Layers whose stored weights have <= 8 bits run int8 kernels, with static activation quantisation
calibrated on real batches. Their int8 weights are the artifact's own codes, widened from their
packed width, so no second weight rounding happens; only activations are rounded to int8.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..artifact import read_artifact, walk_payload
from ..compression import compressed_weights, compressor
from ..cost.latency import measure_latency
from ..models import prunable_layers, weight_slot

def artifact_codes(source: Any, header: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per int8-able module: (integer codes widened to int8, per-channel scale), from the artifact."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if isinstance(source, nn.Module):
        with torch.no_grad():
            for name, attr, mod in compressed_weights(source):
                comp = compressor(mod, attr)
                if comp.bits > 8 or attr != "weight":
                    continue
                comp.ensure_clip(mod.parametrizations.weight.original.detach())
                w = comp.effective(mod.parametrizations.weight.original.detach()).cpu()
                q, s, zp = (t.cpu() for t in comp.quantize(w))
                k = (q.reshape(q.shape[0], -1) - zp)
                if comp.mask is not None:
                    k = k * comp.mask.cpu().reshape(k.shape[0], -1)
                out[name] = (k.reshape(w.shape), s.flatten())
        return out
    hdr, payload = read_artifact(source)
    for e, chunks in walk_payload(hdr["entries"], payload):
        if e["t"] == "q" and e["bits"] <= 8 and e["name"] == f"{e['module']}.weight":  # the first chunk holds the per-channel float16 scales
            s = np.frombuffer(chunks[0], dtype="<f2").astype("float32")
            out[e["module"]] = (None, torch.from_numpy(s.copy()))  # codes follow from the loaded weights
    return out


def int8_layers(model: nn.Module, header: dict) -> list[str]:
    """Layers of the plan whose stored weights have <= 8 bits and whose kind the int8 kernels take
    (models.WEIGHT_SLOTS); the other kinds stay float in the deployed model."""
    rec = header["record"]
    layers = rec["plan"]["layers"]
    mods = dict(model.named_modules())
    return [m for m, p in rec["targets"].items() if layers[p]["bits"] <= 8 and m in mods
            and weight_slot(mods[m]) is not None and weight_slot(mods[m]).int8]


def _calibration(calib: Any, example: torch.Tensor) -> list[torch.Tensor]:
    if calib is None:  # timing only: activation ranges of noise, accuracy meaningless
        return [torch.randn(8, *example.shape[1:]) for _ in range(2)]
    if isinstance(calib, torch.Tensor):
        return [calib]
    return [b[0] if isinstance(b, (tuple, list)) else b for b in calib]


def _exact_weights(qmodel: nn.Module, prepared_float: dict[str, torch.Tensor], float_model: nn.Module,
                   codes: dict[str, tuple[Any, torch.Tensor]]) -> int:
    """Replace each int8 layer's weight by the artifact's codes (scale folded with BatchNorm)."""
    done = 0
    for name, (k, s) in codes.items():
        try:
            qmod = qmodel.get_submodule(name)
        except AttributeError:
            continue
        if not hasattr(qmod, "set_weight_bias") or name not in prepared_float:
            continue
        w = float_model.get_submodule(name).weight.detach().reshape(s.shape[0], -1)
        if k is None:
            k = torch.round(w / s.view(-1, 1))
        k = k.reshape(s.shape[0], -1)
        if k.abs().max() > 127:  # 8-bit asymmetric codes do not fit int8: keep the observer's rounding
            continue
        fused = prepared_float[name].reshape(s.shape[0], -1)
        norm = (w * w).sum(1)
        g = torch.where(norm > 0, (fused * w).sum(1) / norm.clamp_min(1e-30), torch.ones_like(norm))
        sign = torch.where(g < 0, -1.0, 1.0)
        scale = (s * g.abs()).clamp_min(1e-12).double()
        qw = torch._make_per_channel_quantized_tensor(
            (k * sign.view(-1, 1)).to(torch.int8).reshape(qmod.weight().shape), scale,
            torch.zeros_like(scale, dtype=torch.long), 0)
        qmod.set_weight_bias(qw, qmod.bias())
        done += 1
    return done


def _fused_weights(prepared: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Float weights of the prepared (BatchNorm-folded) modules, by layer name."""
    out = {}
    for n in names:
        try:
            m = prepared.get_submodule(n)
        except AttributeError:
            continue
        inner = m[0] if isinstance(m, nn.Sequential) and not hasattr(m, "weight") else m
        if hasattr(inner, "weight"):
            out[n] = inner.weight.detach().clone()
    return out


def relu_as_functional(model: nn.Module) -> nn.Module:
    """The model as an FX graph in the spellings the int8 path handles:

    - torch.relu / Tensor.relu written as F.relu, the spelling the int8 fusion patterns know:
      conv/linear + ReLU then run as one int8 kernel instead of dequantise -> float ReLU ->
      quantise (3 ops saved per layer; 1.5x faster LeNet-5 at batch 1);
    - `x.mean(dims)` written as `x.mean(dims, keepdim=True).squeeze(dims)`: the quantized mean
      without keepdim fails on a 1 x 1 channels-last map ("required rank 4 tensor to use
      channels_last format"), which ShuffleNet and MNASNet reach on small inputs.

    Models FX cannot trace are returned unchanged (prepare_fx reports why)."""
    import torch.fx
    from torch.nn import functional as F

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return model
    changed = False
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target in (torch.relu, torch.relu_)) or \
                (node.op == "call_method" and node.target in ("relu", "relu_")):
            node.op, node.target, node.kwargs = "call_function", F.relu, {}
            node.args = node.args[:1]
            changed = True
        elif _mean_keepdim(gm.graph, node):
            changed = True
    if not changed:
        return model
    gm.recompile()
    return gm


def _mean_keepdim(graph: Any, node: Any) -> bool:
    """Rewrite one `mean(x, dims)` node without keepdim as mean with keepdim, then squeeze(dims)."""
    if not ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean)):
        return False
    args, kwargs = list(node.args), dict(node.kwargs)
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else dims
    if keep is not False or not isinstance(dims, (list, tuple)) or not dims or \
            not all(isinstance(d, int) for d in dims):
        return False
    node.args = (args[0], tuple(dims))
    node.kwargs = {**{k: v for k, v in kwargs.items() if k not in ("dim", "keepdim")}, "keepdim": True}
    with graph.inserting_after(node):
        squeezed = graph.call_method("squeeze", (node, tuple(dims)))
    node.replace_all_uses_with(squeezed, delete_user_cb=lambda user: user is not squeezed)
    return True


def to_int8_cpu(model: nn.Module, int8: list[str], example: torch.Tensor, calib: Any = None,
                backend: str = "x86", codes: dict | None = None) -> nn.Module:
    """FX graph-mode static int8: the named layers (and the ops between them) run int8 kernels."""
    from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    if not int8:
        return model
    mapping: QConfigMapping = get_default_qconfig_mapping(backend)
    if backend in ("x86", "onednn") and _has_vnni():  # full 8-bit activations cannot overflow with VNNI
        from torch.ao.quantization import QConfig, default_per_channel_weight_observer
        from torch.ao.quantization.observer import HistogramObserver

        mapping.set_global(QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                                   weight=default_per_channel_weight_observer))
    for name in prunable_layers(model):
        if name not in int8:
            mapping.set_module_name(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(relu_as_functional(copy.deepcopy(model).eval()), mapping, (example,))
        fused = _fused_weights(prepared, int8)
        with torch.no_grad():
            for x in _calibration(calib, example):
                prepared(x.cpu())
        qmodel = convert_fx(prepared)
    if codes:
        _exact_weights(qmodel, fused, model, {k: v for k, v in codes.items() if k in int8})
    return qmodel.eval()


def _has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (Linux /proc/cpuinfo; False if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "vnni" in f.read()
    except OSError:
        return False


def to_cpu(model: nn.Module, header: dict, source: Any, *, backend: str = "auto",
           calib: Iterable | torch.Tensor | None = None, int8: bool = True, script: bool = True,
           example: torch.Tensor, batch_size: int = 1, threads: int | None = None) -> nn.Module:
    """The CPU form of the evaluated float `model` (see deploy.deployable for the arguments): int8
    kernels for the plan's <= 8-bit layers with the artifact's own codes from `source`, built with
    each engine of `backend` ("auto": x86 and fbgemm) and the fastest at `batch_size` kept."""
    shape = header["record"]["input_shape"]
    layers = int8_layers(model, header) if int8 else []
    codes = artifact_codes(source, header) if layers else {}
    engines = [backend]
    if backend == "auto":
        engines = [e for e in ("x86", "fbgemm") if e in torch.backends.quantized.supported_engines] or ["qnnpack"]
    if not layers:
        engines = engines[:1]
    built, previous = [], torch.backends.quantized.engine
    try:
        for engine in engines:
            qmodel = to_int8_cpu(model, layers, example, calib, engine, codes)
            qmodel = frozen(qmodel, example) if layers and script else qmodel
            qmodel.backend = engine if layers else "float32"
            built.append(qmodel)
    finally:  # packed weights carry their engine; the global setting is not left changed
        torch.backends.quantized.engine = previous
    if len(built) == 1:
        return built[0]
    probe = torch.randn(1, *shape)
    times = [min(measure_latency(m, probe, batch_size=batch_size, threads=threads, warmup=3, repeats=15).median_ms
                 for _ in range(2)) for m in built]
    return built[times.index(min(times))]


def frozen(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """TorchScript-traced and frozen copy (less Python per op: 2-4x faster int8 at batch 1 on CPU),
    kept only when it gives the eager outputs; else the eager model."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(model, example).eval())
            probe = torch.randn(3, *example.shape[1:])
            same = torch.allclose(traced(probe), model(probe), atol=1e-5)
    except Exception:
        return model
    return _Frozen(traced) if same else model


class _Frozen(nn.Module):
    """A frozen TorchScript module behind a plain nn.Module (so .eval(), .training work)."""

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(x)
