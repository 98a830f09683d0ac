"""Fake quantisation of weights and activations with a straight-through estimator.

The same functions compute the integer codes for the exporter and the dequantised values for
the training forward, so the deployed model (plain layers holding dequantised weights) gives
bit-identical outputs to the compressed model in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models import batchnorm_scale, device_of, half_round

CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def round_scale(s: torch.Tensor) -> torch.Tensor:
    """Scales are stored as float16: round them so the forward uses exactly the stored value."""
    return s.clamp(2.0 ** -24, 65504.0).half().float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The one dequantisation formula used by both the forward and the loader."""
    return (q - zero_point) * scale


def _quant(w: torch.Tensor, bits: int, symmetric: bool, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales, zero-points of a (out, K) weight clipped at ratio r of its range.

    r is (out, 1) for one ratio per channel, or (R, 1, 1) to try R ratios at once.
    """
    if symmetric:
        qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        amax = w.abs().amax(dim=1, keepdim=True)
        s = round_scale(amax * r / qmax)
        zp = torch.zeros_like(s)
        q = torch.clamp(torch.round(w / s), qmin, qmax)
    else:
        qmax = 2 ** bits - 1
        lo = w.amin(dim=1, keepdim=True).clamp(max=0.0)
        hi = w.amax(dim=1, keepdim=True).clamp(min=0.0)
        s = round_scale((hi - lo) * r / qmax)
        zp = torch.clamp(torch.round(-lo * r / s), 0, qmax)
        q = torch.clamp(torch.round(w / s) + zp, 0, qmax)
    return q, s, zp


def search_clip(w: torch.Tensor, bits: int, symmetric: bool, rows: int = 1 << 20) -> torch.Tensor:
    """Per output channel, the ratio of CLIP_RATIOS with the smallest squared error: shape (out, 1).

    Works through about `rows` weights at a time (whole output channels): the temporaries of
    each try are then a few MB instead of several copies of the layer (a VGG fc layer is 400 MB),
    and stay in cache."""
    w2 = w.detach().reshape(w.shape[0], -1)
    if bits > 8:
        return torch.ones(w2.shape[0], 1, device=w2.device)
    step = max(1, rows // max(w2.shape[1], 1))
    return torch.cat([_search_clip_rows(w2[i:i + step], bits, symmetric) for i in range(0, w2.shape[0], step)])


def _search_clip_rows(w2: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    ratios = torch.tensor(CLIP_RATIOS, dtype=w2.dtype, device=w2.device)
    best_err = torch.full((w2.shape[0],), float("inf"), device=w2.device)
    best = torch.ones(w2.shape[0], 1, device=w2.device)
    for r in ratios:
        q, s, zp = _quant(w2, bits, symmetric, r.view(1, 1))
        err = ((dequantize(q, s, zp) - w2) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = r
    return best


def quantize_weight(w: torch.Tensor, bits: int, symmetric: bool,
                    clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel codes (float tensor, shape of w), scale and zero-point (shape (out, 1)).

    clip is the per-channel clipping ratio (from search_clip, fixed at compress time). 1 bit is
    sign * mean |w| over the non-zero weights (its MSE-optimal scale).
    """
    w2 = w.detach().reshape(w.shape[0], -1)
    if bits == 1:
        count = (w2 != 0).sum(dim=1, keepdim=True).clamp(min=1)
        s = round_scale(w2.abs().sum(dim=1, keepdim=True) / count)
        q = torch.where(w2 >= 0, 1.0, -1.0).to(w2.dtype)
        return q.view_as(w), s, torch.zeros_like(s)
    q, s, zp = _quant(w2, bits, symmetric, clip)
    return q.view_as(w), s, zp


def code_offset(bits: int, symmetric: bool) -> int:
    """What is added to a code to store it unsigned (signed symmetric codes are offset)."""
    return 2 ** (bits - 1) if symmetric and bits > 1 else 0


class WeightCompressor(nn.Module):
    """Parametrization of a layer weight: fixed mask, then fake quantisation (STE)."""

    def __init__(self, mask: torch.Tensor | None, bits: int, symmetric: bool) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.register_buffer("mask", mask)
        self.register_buffer("clip", None)
        self.fold_axis: int | None = None

    def set_fold(self, bn: nn.Module, axis: int) -> None:
        """Fold BatchNorm `bn` (a reference, not a submodule) along weight axis `axis` in eval mode."""
        self.__dict__["fold_bn"] = bn
        self.fold_axis = axis

    def effective(self, w: torch.Tensor) -> torch.Tensor:
        """The weight that is quantised and stored: masked, times the folded BatchNorm scale."""
        w = self.masked(w)
        if self.fold_axis is None:
            return w
        shape = [1] * w.dim()
        shape[self.fold_axis] = -1
        return w * batchnorm_scale(self.__dict__["fold_bn"]).view(shape)

    def choose_clip(self, w: torch.Tensor) -> None:
        """(Re)choose the per-channel clipping ratios for the current weight (MSE search)."""
        self.clip = search_clip(self.masked(w.detach()), self.bits, self.symmetric)

    def ensure_clip(self, raw: torch.Tensor) -> None:
        """Choose the clipping ratios on first use: compress() leaves them unset when it only sizes
        a plan (the bytes do not depend on them, and the search costs most of a sizing's time)."""
        if self.clip is None and self.bits < 16:
            self.choose_clip(raw)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, scale, zero-point of an already masked weight."""
        return quantize_weight(w, self.bits, self.symmetric, self.clip)

    def masked(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.mask is None else w * self.mask

    def values(self, w: torch.Tensor) -> torch.Tensor:
        """Dequantised value of an already masked weight (no gradient)."""
        w = w.detach()
        if self.bits == 32:
            return w
        if self.bits == 16:
            return half_round(w)
        q, s, zp = self.quantize(w)
        shape = (-1,) + (1,) * (w.dim() - 1)
        deq = dequantize(q, s.view(shape), zp.view(shape))
        return deq if self.mask is None else deq * self.mask

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.ensure_clip(w)
        w = self.masked(w) if self.training else self.effective(w)
        if self.bits == 32:
            return w
        return self.values(w) + (w - w.detach())


class HalfRound(nn.Module):
    """Parametrization rounding a float tensor to float16 values (stored at float_bits=16)."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return half_round(p.detach()) + (p - p.detach())


def round_bn_stats_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: in eval mode, use float16-rounded running statistics (as exported)."""
    if not module.training:
        with torch.no_grad():
            for name in ("running_mean", "running_var"):
                t = getattr(module, name, None)
                if t is not None:
                    t.copy_(half_round(t))


def act_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric fake quantisation of an activation (value only)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)
    return dequantize(q, scale, zero_point)


def act_quant_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: observe the input range while calibrating, else fake-quantise it (STE)."""
    x = args[0]
    if getattr(module, "act_observing", False):
        lo, hi = float(x.detach().min()), float(x.detach().max())
        module.act_range = (min(lo, module.act_range[0]), max(hi, module.act_range[1]))
        return None
    xq = act_fake_quant(x.detach(), module.act_scale, module.act_zero_point, module.act_bits)
    return (xq + (x - x.detach()),) + tuple(args[1:])


def attach_act_quant(module: nn.Module, bits: int, scale: float = 1.0, zero_point: float = 0.0) -> None:
    """Give a module an input fake-quantiser: buffers act_scale/act_zero_point plus the pre-hook."""
    device = device_of(module)
    module.act_bits = bits
    module.register_buffer("act_scale", torch.tensor(scale, dtype=torch.float32, device=device))
    module.register_buffer("act_zero_point", torch.tensor(zero_point, dtype=torch.float32, device=device))
    module.register_forward_pre_hook(act_quant_hook)


def set_act_range(module: nn.Module, lo: float, hi: float) -> None:
    """Fix the quantiser from an observed range (widened to include 0, scale rounded to float32)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2 ** module.act_bits - 1
    scale = torch.tensor(max((hi - lo) / qmax, 1e-8), dtype=torch.float32)
    module.act_scale.copy_(scale)
    module.act_zero_point.copy_(torch.clamp(torch.round(-lo / scale), 0, qmax))
