"""Physical, dependency-aware channel pruning with torch-pruning, replayable from stored indices."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..plan import PlanError

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def _out_fn(layer: nn.Module):
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


def _graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    training = model.training
    model.eval()  # tracing must not touch BatchNorm statistics
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    model.train(training)
    return dg


def _accumulate_grads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    model.train(training)


def prune_channels(model: nn.Module, example_input: torch.Tensor,
                   targets: list[tuple[str, float, str]], output_layer: str,
                   batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[tuple[str, list[int]]]:
    """Remove output channels in place for each (layer, amount, importance); return the replay list.

    Channels are ranked by the L2 norm (or Taylor score) of the whole coupled group. A layer whose
    channels were already removed with an earlier group is skipped.
    """
    if not targets:
        return []
    if any(imp == "taylor" for _, _, imp in targets):
        _accumulate_grads(model, batches or [])
    names = {m: n for n, m in model.named_modules()}
    dg = _graph(model, example_input)
    done: set[str] = set()
    replay: list[tuple[str, list[int]]] = []
    for name, amount, importance in targets:
        if name in done:
            continue
        layer = model.get_submodule(name)
        fn = _out_fn(layer)
        total = layer.weight.shape[0]
        remove = min(int(round(amount * total)), total - 1)
        if remove <= 0:
            continue
        full = dg.get_pruning_group(layer, fn, list(range(total)))
        if importance == "taylor":
            imp = tp.importance.GroupTaylorImportance()(full)
        else:
            imp = tp.importance.GroupMagnitudeImportance(p=2)(full)
        idxs = sorted(torch.argsort(imp.detach(), stable=True)[:remove].tolist())
        group = dg.get_pruning_group(layer, fn, idxs)
        touched = {names.get(dep.target.module) for dep, _ in group if dep.handler in _OUT_FNS}
        if output_layer in touched:
            raise PlanError(f"layer {name}: its channels are coupled with the output layer {output_layer}, "
                            "which cannot lose outputs")
        if not dg.check_pruning_group(group):
            raise PlanError(f"layer {name}: channel pruning would remove every channel of a coupled layer")
        group.prune()
        done |= {t for t in touched if t}
        replay.append((name, idxs))
    model.zero_grad(set_to_none=True)
    return replay


def replay_channels(model: nn.Module, example_input: torch.Tensor, replay: list[tuple[str, list[int]]]) -> None:
    """Apply a stored replay list to a freshly built model (same architecture)."""
    if not replay:
        return
    dg = _graph(model, example_input)
    for name, idxs in replay:
        layer = model.get_submodule(name)
        dg.get_pruning_group(layer, _out_fn(layer), list(idxs)).prune()
