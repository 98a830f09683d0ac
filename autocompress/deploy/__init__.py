"""The model that is really deployed: real int8 kernels on CPU, half precision on CUDA.

`load()` gives the evaluated model (plain float layers holding dequantised weights), which is
no faster than the original. `deployable()` turns it into what runs on the target:

- channel-pruned layers are already physically smaller (the artifact replays the removal);
- CPU (deploy.cpu): layers whose weights have <= 8 bits run torch.ao int8 kernels (FX graph mode,
  static activation quantisation calibrated on real batches, x86 = oneDNN/fbgemm). The int8
  weights are the artifact's own codes, widened from their packed width, so no second weight
  rounding happens; only activations are rounded to int8 (the stated tolerance: see TOLERANCE);
- CUDA (deploy.cuda): BatchNorm folded, float16 (or bfloat16) weights and activations in
  channels-last layout, replayed as a CUDA graph (`graphs`); N:M 2:4 Linear layers become
  semi-structured sparse where the GPU supports it. The CUDA path is exercised by
  bench/latency.py --device cuda on a GPU machine; the tests run on CPU only.

This module turns the source (an artifact path or a compressed model) into the evaluated float
model and hands it to the target's module.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..artifact import load, read_header
from ..compression import RECORD_ATTR, plain_copy
from ..compression import quantize as fq
from .cpu import frozen, int8_layers, relu_as_functional, to_cpu, to_int8_cpu
from .cuda import CudaGraphed, fold_batchnorm, to_cuda

__all__ = ["TOLERANCE", "CudaGraphed", "deployable", "fold_batchnorm", "frozen", "int8_layers",
           "relu_as_functional", "to_cuda", "to_int8_cpu"]

# Deployed int8 model vs evaluated (fake-quantised) model, on a test split: argmax agreement at
# least this fraction, accuracy within this many points. Activations are the only new rounding.
TOLERANCE = {"agreement": 0.99, "accuracy_points": 0.5}


def _as_artifact(source: Any) -> tuple[nn.Module, dict]:
    """(float model, header) from an artifact path, or from a compressed model (same values as load())."""
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
    return to_cpu(model, header, source, backend=backend, calib=calib, int8=int8, script=script,
                  example=example, batch_size=batch_size, threads=threads)
