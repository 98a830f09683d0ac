"""CUDA deployment: BatchNorm folded, float16 (or bfloat16) channels-last, replayed as a CUDA graph.

N:M 2:4 Linear layers become semi-structured sparse where the GPU supports it. Exercised by
bench/latency.py --device cuda on a GPU machine; the tests run on CPU only (fold_batchnorm is
device-independent and tested there).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import device_of

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
