"""Low-rank factorisation of Linear/Conv2d layers by truncated SVD."""
from __future__ import annotations

import math

import torch
from torch import nn


def rank_for(layer: nn.Module, ratio: float) -> int:
    """ceil(ratio * min(out, in * k * k)): the plan's rank for a layer."""
    w = layer.weight
    return max(1, math.ceil(ratio * min(w.shape[0], w[0].numel())))


def skeleton(layer: nn.Module, rank: int) -> nn.Sequential:
    """The two-factor replacement of a layer, with uninitialised weights of the right shapes."""
    if isinstance(layer, nn.Linear):
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False),
                             nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
    assert isinstance(layer, nn.Conv2d) and layer.groups == 1
    first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, bias=False, padding_mode=layer.padding_mode)
    second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
    return nn.Sequential(first, second)


def factorise(layer: nn.Module, rank: int) -> nn.Sequential:
    """Replace W (out x in*k*k) by B @ A with A = sqrt(S) V^T (rank rows), B = U sqrt(S)."""
    seq = skeleton(layer, rank)
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # threaded LAPACK SVD stalls badly on busy small machines; one thread is fast
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).float()
    b = (u[:, :rank] * root[None, :]).float()
    with torch.no_grad():
        seq[0].weight.copy_(a.reshape(seq[0].weight.shape))
        seq[1].weight.copy_(b.reshape(seq[1].weight.shape))
        if layer.bias is not None:
            seq[1].bias.copy_(layer.bias.detach())
    return seq.to(layer.weight.device).train(layer.training)
