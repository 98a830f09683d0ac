"""The model that is really deployed: real int8 kernels on CPU, half precision on CUDA.

`load()` gives the evaluated model (plain float layers holding dequantised weights), which is
no faster than the original. `deployable()` turns it into what runs on the target:

- channel-pruned layers are already physically smaller (the artifact replays the removal);
- CPU: layers whose weights have <= 8 bits run torch.ao int8 kernels (FX graph mode, static
  activation quantisation calibrated on real batches, x86 = oneDNN/fbgemm). The int8 weights are
  the artifact's own codes, widened from their packed width, so no second weight rounding
  happens; only activations are rounded to int8 (the stated tolerance: see TOLERANCE);
- CUDA: BatchNorm folded, float16 (or bfloat16) weights and activations in channels-last layout,
  replayed as a CUDA graph (`graphs`); N:M 2:4 Linear layers become semi-structured sparse where
  the GPU supports it. The CUDA path is exercised by bench/latency.py --device cuda on a GPU
  machine; the tests run on CPU only.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .compression import RECORD_ATTR, compressed_weights, compressor, plain_copy
from .compression import quantize as fq
from .models import device_of, prunable_layers, weight_slot

# Deployed int8 model vs evaluated (fake-quantised) model, on a test split: argmax agreement at
# least this fraction, accuracy within this many points. Activations are the only new rounding.
TOLERANCE = {"agreement": 0.99, "accuracy_points": 0.5}

def _as_artifact(source: Any) -> tuple[nn.Module, dict]:
    """(float model, header) from an artifact path, or from a compressed model (same values as load())."""
    from .artifact import load, read_header

    if isinstance(source, nn.Module):
        record = getattr(source, RECORD_ATTR, None)
        if record is None:
            raise ValueError("deployable() needs an artifact path or a model from autocompress.compression()")
        return _from_compressed(source), {"record": record}
    with torch.enable_grad():  # the channel replay traces the model with autograd
        return load(source), read_header(source)


def _from_compressed(model: nn.Module) -> nn.Module:
    """A float copy of a compressed model as load() rebuilds it (see compression.plain_copy)."""
    return plain_copy(model)


def _strip_act_quant(model: nn.Module) -> None:
    """Drop the fake activation quantisers: the int8 kernels quantise activations themselves."""
    for mod in model.modules():
        for key, hook in list(mod._forward_pre_hooks.items()):
            if hook is fq.act_quant_hook:
                del mod._forward_pre_hooks[key]


def _codes(source: Any, header: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per int8-able module: (integer codes widened to int8, per-channel scale), from the artifact."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if isinstance(source, nn.Module):
        with torch.no_grad():
            for name, attr, mod in compressed_weights(source):
                comp = compressor(mod, attr)
                if comp.bits > 8 or attr != "weight":
                    continue
                w = comp.effective(mod.parametrizations.weight.original.detach()).cpu()
                q, s, zp = (t.cpu() for t in comp.quantize(w))
                k = (q.reshape(q.shape[0], -1) - zp)
                if comp.mask is not None:
                    k = k * comp.mask.cpu().reshape(k.shape[0], -1)
                out[name] = (k.reshape(w.shape), s.flatten())
        return out
    from .artifact import _read

    hdr, payload = _read(source)
    pos = 0
    for e in hdr["entries"]:
        if e["t"] == "q":
            if e["bits"] <= 8 and e["name"] == f"{e['module']}.weight":
                n = e["sizes"][0]
                s = np.frombuffer(bytes(payload[pos:pos + n]), dtype="<f2").astype("float32")
                out[e["module"]] = (None, torch.from_numpy(s.copy()))  # codes follow from the loaded weights
            pos += sum(e["sizes"])
        elif e["t"] == "f":
            pos += int(torch.tensor(e["shape"]).prod()) * e["bits"] // 8
        else:
            pos += 5
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
    """The model as an FX graph with torch.relu / Tensor.relu written as F.relu, the spelling the
    int8 fusion patterns know: conv/linear + ReLU then run as one int8 kernel instead of
    dequantise -> float ReLU -> quantise (3 ops saved per layer; 1.5x faster LeNet-5 at batch 1).
    Models FX cannot trace are returned unchanged (prepare_fx reports why)."""
    import torch.fx
    from torch.nn import functional as F

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return model
    changed = False
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target in (torch.relu, torch.relu_)) or \
                (node.op == "call_method" and node.target in ("relu", "relu_")):
            node.op, node.target, node.kwargs = "call_function", F.relu, {}
            node.args = node.args[:1]
            changed = True
    if not changed:
        return model
    gm.recompile()
    return gm


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


class _Cast(nn.Module):
    """Runs the wrapped model in `dtype` (channels-last) and returns float32 logits (CUDA deployment)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


class CudaGraphed(nn.Module):
    """Replays a CUDA graph of the wrapped model, captured once per input shape and dtype.

    At small batches a ResNet's eager forward is bound by the launch of ~50 kernels from Python;
    one graph replay launches them all at once. Inputs are copied into the graph's static buffer
    and the output is cloned out (the next replay overwrites it). Used for inference only: no
    autograd through the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._graphs: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled())
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        static_in = x.detach().clone()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(stream):  # warm-up (cuDNN picks its kernels) off the graph
            for _ in range(3):
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out


def fold_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Conv+BatchNorm pairs folded into one conv (eval mode, FX-traceable models), kept only when
    it gives the same outputs on a random input of `input_shape` (no batch dimension); else the
    model as is. Halves the kernels a ResNet launches at inference."""
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        fused = fuse(model, inplace=False)
        with torch.no_grad():
            probe = torch.randn(2, *input_shape, device=device_of(model))
            same = torch.allclose(fused(probe), model(probe), rtol=1e-3, atol=1e-4)
    except Exception:  # not traceable (data-dependent control flow): keep the unfolded model
        return model
    return fused.eval() if same else model


def to_cuda(model: nn.Module, header: dict, device: str = "cuda", dtype: torch.dtype = torch.float16,
            graphs: bool = True) -> nn.Module:
    """The GPU form: BatchNorm folded into the convolutions, `dtype` (half) weights and activations in
    channels-last layout (tensor-core convolutions), 2:4 N:M Linear layers semi-structured sparse
    where the GPU and kernels take them, and, with `graphs`, replayed as a CUDA graph."""
    model = fold_batchnorm(model, tuple(header["record"]["input_shape"]))
    model = model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last).eval()
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        rec = header["record"]
        for mname, pname in rec["targets"].items():
            lp = rec["plan"]["layers"][pname]
            try:
                mod = model.get_submodule(mname)
            except AttributeError:  # folded away or renamed by the fusion
                continue
            if isinstance(mod, nn.Linear) and lp["prune"] == "nm" and (lp["n"], lp["m"]) == (2, 4):
                try:
                    from torch.sparse import to_sparse_semi_structured

                    mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
                except Exception:  # shape or dtype the sparse kernels do not take: stays dense
                    pass
    cast = _Cast(model, dtype).eval()
    return CudaGraphed(cast).eval() if graphs else cast


def deployable(source: Any, *, device: str = "cpu", backend: str = "auto", calib: Iterable | torch.Tensor | None = None,
               int8: bool = True, script: bool = True, dtype: torch.dtype = torch.float16, batch_size: int = 1,
               threads: int | None = None, graphs: bool = True) -> nn.Module:
    """The deployed form of an artifact (path) or of a compressed model, in eval mode.

    `calib`: real input batches (tensors or (x, y) pairs) for the int8 activation ranges; without
    them, noise is used, which is fine for timing and wrong for accuracy. `script`: freeze the int8
    model with TorchScript (CPU). Plans without int8 layers stay eager float32.
    `backend` "auto" (CPU): build the int8 model with each quantized engine this torch has (x86,
    fbgemm) and keep the fastest at `batch_size` / `threads` on this machine: the engines' kernels
    differ by 2x on small convolutions (x86 hands them to oneDNN, whose per-call cost dominates a
    LeNet-5 at batch 1). The chosen engine is in the result's `backend` attribute.
    CUDA (`device` "cuda"): see to_cuda; `dtype` float16 or bfloat16, `graphs` CUDA-graph replay.
    """
    model, header = _as_artifact(source)
    _strip_act_quant(model)
    model.eval()
    shape = header["record"]["input_shape"]
    example = torch.zeros(1, *shape)
    if str(device).startswith("cuda"):
        return to_cuda(model, header, device, dtype, graphs)
    layers = int8_layers(model, header) if int8 else []
    codes = _codes(source, header) if layers else {}
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
    from .cost.latency import measure_latency

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
