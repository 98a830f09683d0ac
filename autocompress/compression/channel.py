"""Physical, dependency-aware channel pruning with Torch-Pruning, replayable from stored indices.

Torch-Pruning's dependency graph finds every layer whose channels go with a pruned layer's outputs
(BatchNorm, the next layers' inputs, residual sums, concatenations). On top of it, this module:
- removes the same positions in every group where a coupled layer is grouped (grouped and
  depthwise convolutions, GroupNorm, attention heads), as Torch-Pruning's own pruner does;
- traces models in training mode when evaluation mode skips layers (the auxiliary classifiers
  of GoogLeNet and Inception-v3), so those layers lose the channels that feed them;
- traces torchvision's channel shuffle as one opaque op and refuses groups that reach it (the
  shuffle permutes channels, which the graph cannot map), so ShuffleNet keeps the layers whose
  channels stay inside a unit;
- refuses groups whose index lists explode through reshapes (Swin's windows), before they use
  the memory, and maps reshapes once per graph rather than before every group;
- re-derives attributes that hold a width (ViT's hidden_dim) after pruning.
A layer whose group is refused raises PlanError; `check_layers` finds those once per model.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..plan import PlanError

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)
MAX_GROUP_INDICES = 500_000  # a coupled group this long comes from reshapes the graph cannot map
MAX_GROUP_DEPS = 3_000  # (Torch-Pruning's group building is quadratic in its length)
_SHUFFLE = "_ChannelShuffleBackward"


class _GroupTooLarge(Exception):
    pass


def _out_fn(layer: nn.Module):
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels


class _ChannelShuffle(torch.autograd.Function):
    """torchvision's channel shuffle as one autograd node, so the graph sees it as a single op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        ctx.groups = groups
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        b, c, h, w = g.shape
        return g.view(b, c // ctx.groups, ctx.groups, h, w).transpose(1, 2).reshape(b, c, h, w), None


def _concat_widths(node: Any) -> tuple[int, ...] | None:
    """The input widths Torch-Pruning keeps for a concatenation node (it updates them when an input
    loses channels); None until they are inferred."""
    sizes = getattr(node.module, "concat_sizes", None)
    return None if sizes is None else tuple(sizes)


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """While tracing: torchvision's channel shuffle is opaque, and groups are capped in length."""
    import torchvision.models.shufflenetv2 as shufflenet
    from torch_pruning.dependency import graph as tp_graph

    base = tp_graph.Group

    class Bounded(base):  # type: ignore[misc, valid-type]
        def add_dep(self, dep, idxs):  # noqa: ANN001
            self._count = getattr(self, "_count", 0) + len(idxs)
            if self._count > MAX_GROUP_INDICES or len(self._group) >= MAX_GROUP_DEPS:
                raise _GroupTooLarge()
            super().add_dep(dep, idxs)

    update = tp_graph.index_mapping.update_index_mapping

    def update_once(graph):  # noqa: ANN001
        """Reshape mappings in full once per graph: pruning keeps their strides, and re-deriving them
        before every group costs minutes on Swin. Concatenations and splits follow every prune; a
        concatenation only when its input widths changed since it was last mapped (re-mapping all of
        DenseNet-201's, quadratic in their inputs, took 4 of the 5 minutes of one channel plan)."""
        if not getattr(graph, "_reshapes_mapped", False):
            update(graph)
            graph._reshapes_mapped = True
            for node in graph.module2node.values():
                if node.type == tp.ops.OPTYPE.CONCAT:
                    node._mapped_widths = _concat_widths(node)
            return
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT:
                widths = _concat_widths(node)
                if widths is None or widths != getattr(node, "_mapped_widths", None):
                    tp_graph.index_mapping.update_concat_index_mapping(graph, node)
                    node._mapped_widths = _concat_widths(node)
            elif node.type == tp.ops.OPTYPE.SPLIT:
                tp_graph.index_mapping.update_split_index_mapping(graph, node)
            elif node.type == tp.ops.OPTYPE.SLICE:
                tp_graph.index_mapping.update_slice_index_mapping(graph, node)

    shuffle = shufflenet.channel_shuffle
    shufflenet.channel_shuffle = _ChannelShuffle.apply
    tp_graph.Group = Bounded
    tp_graph.index_mapping.update_index_mapping = update_once
    try:
        yield
    finally:
        shufflenet.channel_shuffle = shuffle
        tp_graph.Group = base
        tp_graph.index_mapping.update_index_mapping = update


def _train_forward(model: nn.Module, x: torch.Tensor):
    """A training-mode forward with the buffers (BatchNorm statistics) left as they were."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    try:  # two samples at least: training-mode BatchNorm refuses one value per channel (load() traces one)
        return model(x if x.shape[0] > 1 else torch.cat([x, x]))
    finally:
        model.eval()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def _graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    training = model.training
    model.eval()  # tracing must not touch BatchNorm statistics
    try:
        with _tracing(), torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
            layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            if any(m not in dg.module2node for m in layers):  # layers only training mode runs
                try:
                    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                               forward_fn=_train_forward, verbose=False)
                except Exception:
                    pass  # keep the evaluation-mode graph; the skipped layers cannot lose channels
    except _GroupTooLarge:
        raise PlanError("channel pruning: the model's graph couples too many indices") from None
    except PlanError:
        raise
    except Exception as e:
        raise PlanError(f"channel pruning cannot trace this model ({type(e).__name__}: {e})".splitlines()[0]) from None
    finally:
        model.train(training)
    return dg


def _reason(e: Exception) -> str:
    if isinstance(e, _GroupTooLarge):
        return "its coupled group is too large to map"
    text = (str(e).splitlines() or [""])[0]
    return text if isinstance(e, PlanError) else f"{type(e).__name__}: {text}"


def _channel_groups(group) -> int:  # noqa: ANN001
    """How many equal groups the coupled channels fall into (grouped convs, GroupNorm, heads)."""
    g = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups != m.out_channels:
            g = math.lcm(g, m.groups)
        elif isinstance(m, nn.GroupNorm):
            g = math.lcm(g, m.num_groups)
        elif isinstance(m, nn.MultiheadAttention):
            g = math.lcm(g, m.num_heads)
    return g


def _sync_widths(model: nn.Module) -> None:
    """Attributes that restate a pruned width (torchvision ViT's hidden_dim) follow the layers."""
    for m in model.modules():
        conv = getattr(m, "conv_proj", None)
        if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(conv, nn.Conv2d):
            m.hidden_dim = conv.out_channels


def _accumulate_grads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    model.train(training)


def _select(dg: tp.DependencyGraph, layer: nn.Module, amount: float, importance: str) -> list[int]:
    """The output channels of `layer` to remove: the same positions in every channel group."""
    if layer not in dg.module2node:
        raise PlanError("the traced graph does not reach it as a layer (it runs inside another module, or never)")
    fn = _out_fn(layer)
    total = layer.weight.shape[0]
    full = dg.get_pruning_group(layer, fn, list(range(total)))
    if any(dep.target.grad_fn is not None and _SHUFFLE in dep.target.grad_fn.name() for dep, _ in full):
        raise PlanError("its channels pass through a channel shuffle, which cannot lose channels")
    groups = _channel_groups(full)
    if total % groups:
        raise PlanError(f"its {total} channels do not split into {groups} equal groups")
    size = total // groups
    remove = min(int(round(amount * size)), size - 1)
    if remove <= 0:
        return []
    imp_fn = tp.importance.GroupTaylorImportance() if importance == "taylor" else \
        tp.importance.GroupMagnitudeImportance(p=2)
    try:
        imp = imp_fn(full)
    except Exception:
        imp = None
    if imp is None or imp.numel() != total:  # a score the group cannot give: the layer's own weights
        imp = layer.weight.detach().flatten(1).norm(dim=1)
    per_group = imp.detach().float().view(groups, size).mean(0)
    chosen = torch.argsort(per_group, stable=True)[:remove].tolist()
    return sorted(i + g * size for g in range(groups) for i in chosen)


def _prune_group(dg: tp.DependencyGraph, layer: nn.Module, idxs: list[int], names: dict[nn.Module, str],
                 output_layer: str | None) -> set[str]:
    """Prune the group of `layer` at `idxs`; return the layers that lost output channels."""
    group = dg.get_pruning_group(layer, _out_fn(layer), idxs)
    touched = {names.get(dep.target.module) for dep, _ in group if dep.handler in _OUT_FNS}
    if output_layer is not None and output_layer in touched:
        raise PlanError(f"its channels are coupled with the output layer {output_layer}, which cannot lose outputs")
    if not dg.check_pruning_group(group):
        raise PlanError("it would remove every channel of a coupled layer")
    group.prune()
    return {t for t in touched if t}


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
        try:
            with _tracing():
                idxs = _select(dg, layer, amount, importance)
                if idxs:
                    done |= _prune_group(dg, layer, idxs, names, output_layer)
        except Exception as e:
            raise PlanError(f"layer {name}: channel pruning refused: {_reason(e)}") from None
        if idxs:
            replay.append((name, idxs))
    _sync_widths(model)
    model.zero_grad(set_to_none=True)
    return replay


def replay_channels(model: nn.Module, example_input: torch.Tensor, replay: list[tuple[str, list[int]]]) -> None:
    """Apply a stored replay list to a freshly built model (same architecture)."""
    if not replay:
        return
    dg = _graph(model, example_input)
    with _tracing():
        for name, idxs in replay:
            layer = model.get_submodule(name)
            dg.get_pruning_group(layer, _out_fn(layer), list(idxs)).prune()
    _sync_widths(model)


def check_layers(model: nn.Module, example_input: torch.Tensor, names: list[str], output_layer: str,
                 amount: float = 0.3) -> dict[str, str]:
    """Which of `names` cannot lose channels: {layer: reason}. Never touches `model`.

    All groups are pruned together on one copy, which then must run; when it does not, halves are
    tried on fresh copies until each failing group is found. Layers of one coupled group share
    their outcome, so a model costs a few copies, not one per layer."""
    bad: dict[str, str] = {}
    _check(model, example_input, list(names), output_layer, amount, bad)
    return bad


def _check(model: nn.Module, x: torch.Tensor, names: list[str], output_layer: str, amount: float,
           bad: dict[str, str]) -> None:
    if not names:
        return
    net = copy.deepcopy(model).eval()
    try:
        dg = _graph(net, x)
    except PlanError as e:
        bad.update({n: str(e) for n in names})
        return
    mods = {m: n for n, m in net.named_modules()}
    members: dict[str, set[str]] = {}  # pruned layer -> the named layers that lost channels with it
    for name in names:
        if any(name in ms for ms in members.values()):
            continue
        layer = net.get_submodule(name)
        try:
            with _tracing():
                idxs = _select(dg, layer, amount, "magnitude") or _select(dg, layer, 0.99, "magnitude")
                if not idxs:
                    raise PlanError("it has a single channel")
                group = dg.get_pruning_group(layer, _out_fn(layer), idxs)
                touched = {mods.get(dep.target.module) for dep, _ in group if dep.handler in _OUT_FNS} - {None}
                if output_layer in touched:
                    raise PlanError(f"its channels are coupled with the output layer {output_layer}")
                if not dg.check_pruning_group(group):
                    raise PlanError("it would remove every channel of a coupled layer")
        except Exception as e:  # Torch-Pruning's index mappings fail in many ways on graphs they cannot map
            bad[name] = _reason(e)
            continue
        try:
            with _tracing():
                group.prune()
        except Exception:  # the copy may be half pruned: test the rest on a fresh one
            bad[name] = "pruning its coupled group fails"
            _check(model, x, [n for n in names if n not in bad], output_layer, amount, bad)
            return
        members[name] = (touched | {name}) & set(names)
    _sync_widths(net)
    try:
        with torch.no_grad():
            net(x)
        return
    except Exception as e:
        why = f"the pruned model does not run ({type(e).__name__})"
    del net, dg
    if len(members) <= 1:
        for ms in members.values():
            bad.update({n: why for n in ms})
        return
    reps = list(members)
    half = len(reps) // 2
    _check(model, x, reps[:half], output_layer, amount, bad)
    _check(model, x, reps[half:], output_layer, amount, bad)
    for rep, ms in members.items():
        if rep in bad:
            bad.update({n: bad[rep] for n in ms if n not in bad})
