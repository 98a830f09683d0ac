"""BatchNorm folding: a BatchNorm that directly follows a conv/linear layer is folded into it.

The fold is exact in eval mode, W' = W * g and b' = (b - mean) * g + beta with
g = gamma / sqrt(running_var + eps) along the layer's output axis. The compressed model keeps
its BatchNorm for training (batch statistics, recalibration and the fine-tune work as before);
in eval mode the BatchNorm passes its input through and the layer's weight quantiser and bias
use the folded values, which are exactly what the artifact stores. So the stored codes include
the BatchNorm scale, the artifact holds one bias instead of four vectors, and load() rebuilds
the layer with that bias and an Identity in place of the BatchNorm.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models import batchnorm_scale, half_round, weight_slot

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
_PAIRS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, str]]]" = weakref.WeakKeyDictionary()


def _out_axis(layer: nn.Module) -> int | None:
    slot = weight_slot(layer)
    if slot is None or not isinstance(layer, _FOLDABLE):
        return None
    if isinstance(layer, nn.modules.conv._ConvTransposeNd) and layer.groups != 1:
        return None  # its weight axis 1 holds out/groups channels
    return slot.axis


def _trace_pairs(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # not FX-traceable (data-dependent control flow): nothing is folded
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[user.target] != 1 or not user.args or user.args[0] is not node:
            continue
        layer, bn = model.get_submodule(node.target), model.get_submodule(user.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        axis = _out_axis(layer)
        if axis is not None and layer.weight.shape[axis] == bn.num_features:
            pairs.append((node.target, user.target))
    return pairs


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) names where the BatchNorm is the only consumer of the layer's output,
    found by FX tracing; remembered per model object (a search compresses the same one often)."""
    if model not in _PAIRS or not all(_still_pair(model, p, b) for p, b in _PAIRS[model]):
        _PAIRS[model] = _trace_pairs(model)
    return list(_PAIRS[model])


def _still_pair(model: nn.Module, layer_name: str, bn_name: str) -> bool:
    """Whether a remembered pair still names a layer and a BatchNorm of matching size."""
    try:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    except AttributeError:
        return False
    axis = _out_axis(layer)
    return (axis is not None and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and layer.weight.shape[axis] == bn.num_features)


def folded_bias(bias: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """(b - mean) * g + beta."""
    out = (bias - bn.running_mean) * batchnorm_scale(bn)
    return out + bn.bias if bn.bias is not None else out


def bypass_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a folded BatchNorm: in eval mode its layer already applied it."""
    return None if module.training else args[0]


class FoldedBias(nn.Module):
    """Parametrization of a folded layer's bias: itself in training, the folded bias in eval
    (rounded to float16 when float_bits=16, as stored)."""

    def __init__(self, bn: nn.Module, half: bool) -> None:
        super().__init__()
        self.__dict__["bn"] = bn  # a reference, not a submodule (the BatchNorm lives in the model)
        self.half = half

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        if self.training:
            return half_round(b.detach()) + (b - b.detach()) if self.half else b
        out = folded_bias(b, self.bn)
        return half_round(out.detach()) + (out - out.detach()) if self.half else out


def attach(model: nn.Module, layer_name: str, bn_name: str, half: bool) -> None:
    """Fold BatchNorm `bn_name` into the compressed layer `layer_name` (see the module docstring)."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    comp = layer.parametrizations.weight[0]
    comp.set_fold(bn, _out_axis(layer))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(bn.num_features, device=bn.running_mean.device))
    parametrize.register_parametrization(layer, "bias", FoldedBias(bn, half))
    bn.register_forward_hook(bypass_hook)


def replay(model: nn.Module, folded: list[list[str]]) -> None:
    """load(): give each folded layer a bias and put an Identity where its BatchNorm was."""
    for layer_name, bn_name in folded:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(bn.num_features))
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
