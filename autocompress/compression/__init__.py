"""compress(model, plan): apply a CompressionPlan to a deep copy of a model.

Order: validate -> channel pruning (physical) -> low-rank factorisation -> fixed masks and
weight fake quantisation -> BatchNorm folding (applied in eval mode, see fold.py) -> float16
rounding of the other tensors (float_bits=16) -> BatchNorm recalibration -> least-squares refit of
the Linear layers whose inputs lost channels (reconstruct.py) -> activation quantiser calibration. Which weights a plan reaches, per layer kind, is models.WEIGHT_SLOTS. The returned model trains with
plain optimizers (masks and quantisers are parametrizations) and carries
`autocompress_record`, the structure the exporter stores.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models import layer_weight, layer_weights, prunable_layers, set_submodule, weight_slot
from ..plan import CompressionPlan, LayerPlan, PlanError
from . import channel, fold, lowrank, prune, quantize, reconstruct
from .quantize import HalfRound, WeightCompressor

__all__ = ["compress", "compressed_layers", "compressed_weights", "compressor", "kept_weights", "sparsity_report",
           "refresh_clipping", "plain_copy", "recalibrate_bn", "RECORD_ATTR"]

RECORD_ATTR = "autocompress_record"
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _check_static(model: nn.Module, plan: CompressionPlan, batches: Batches | None) -> str:
    plan.validate()
    layers = prunable_layers(model)
    if not layers:
        raise PlanError("the model has no layer to compress (Linear, Conv, Embedding, MultiheadAttention)")
    output = layers[-1]
    for name, lp in plan.layers.items():
        if name not in layers:
            raise PlanError(f"layer {name}: no compressible layer of that name in the model "
                            f"(layers: {', '.join(layers[:20])}{' ...' if len(layers) > 20 else ''})")
        mod = model.get_submodule(name)
        slot = weight_slot(mod)
        kind = type(mod).__name__
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1 and (lp.rank_ratio < 1 or lp.prune in ("nm", "block")):
            raise PlanError(f"layer {name}: grouped convolution (groups={mod.groups}) cannot be "
                            "factorised or N:M/block pruned")
        if lp.prune == "channel" and not slot.channel:
            raise PlanError(f"layer {name}: a {kind} layer cannot be channel pruned")
        if lp.rank_ratio < 1 and not slot.lowrank:
            raise PlanError(f"layer {name}: a {kind} layer cannot be factorised (rank_ratio < 1)")
        fan_in = layer_weight(mod)[0].numel()
        if lp.prune == "nm" and fan_in % lp.m:
            raise PlanError(f"layer {name}: N:M {lp.n}:{lp.m} needs the input size {fan_in} "
                            f"to be a multiple of {lp.m}")
        if lp.prune == "channel" and name == output:
            raise PlanError(f"layer {name}: the output layer cannot be channel pruned (it would change the outputs)")
        if not batches and lp.importance == "taylor" and lp.sparsity > 0:
            raise PlanError(f"layer {name}: taylor importance needs calibration batches")
        if lp.act_bits < 32 and not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            raise PlanError(f"layer {name}: act_bits applies to Linear and Conv layers, not {kind}")
        if not batches and lp.act_bits < 32:
            raise PlanError(f"layer {name}: act_bits {lp.act_bits} needs calibration batches")
    return output


def _targets(model: nn.Module, plan: CompressionPlan, ranks: dict[str, int]) -> dict[str, LayerPlan]:
    """Module name -> plan for every weight to compress (both factors of a low-rank layer)."""
    out: dict[str, LayerPlan] = {}
    for name, lp in plan.layers.items():
        names = [f"{name}.0", f"{name}.1"] if name in ranks else [name]
        for n in names:
            out[n] = lp
    return out


def _mask(weight: torch.Tensor, score: torch.Tensor | None, lp: LayerPlan) -> torch.Tensor | None:
    s = score if score is not None else weight.detach().abs()
    if lp.prune == "unstructured":
        return prune.unstructured_mask(s, lp.amount)
    if lp.prune == "nm":
        return prune.nm_mask(s.reshape(s.shape[0], -1), lp.n, lp.m).view_as(weight)
    if lp.prune == "block":
        return prune.block_mask(weight, s, lp.block_size, lp.amount, lp.importance)
    return None


def _random_in_training(module: nn.Module) -> bool:
    """Dropout and stochastic depth: layers that drop at random in training mode. They are held
    in eval mode while BatchNorm statistics are gathered, so the statistics are those of the network
    that is evaluated and deployed (with branches dropped they are not: a random-weight
    EfficientNet's eval activations then grow by about 10^4 per stage, to inf)."""
    from torchvision.ops import StochasticDepth

    return isinstance(module, (nn.modules.dropout._DropoutNd, StochasticDepth))


def recalibrate_bn(model: nn.Module, batches: Batches) -> None:
    """Re-estimate every BatchNorm's running statistics on `batches` (the cumulative average over
    them), with the rest of the model as it runs in training (fake-quantised, unfolded) but without
    dropout. Used after compression, and after each fine-tune before it is evaluated: a few steps
    at a high learning rate move low-bit weights far, and the running averages lag behind them
    (the eval-mode model of a fine-tuned 2-bit EfficientNet-B6 gave NaN logits without this)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for m in model.modules():
        if _random_in_training(m):
            m.eval()
    device = bns[0].running_mean.device
    with torch.no_grad():
        for x, _ in batches:
            model(x.to(device))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.train(training)


def _calibrate_acts(model: nn.Module, names: list[str], batches: Batches) -> None:
    mods = [model.get_submodule(n) for n in names]
    for m in mods:
        m.act_observing, m.act_range = True, (float("inf"), float("-inf"))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m in mods:
        quantize.set_act_range(m, *m.act_range)
        del m.act_observing, m.act_range


def _round_floats(model: nn.Module, skip: set[str]) -> None:
    """float_bits=16: every float tensor but the planned weights (and what folding replaces) is
    used, and stored, as float16. `skip` holds module names and "module.param" names."""
    for mname, mod in list(model.named_modules()):
        if "parametrizations" in mname.split(".") or mname in skip:
            continue
        for pname, p in list(mod._parameters.items()):
            if p is not None and f"{mname}.{pname}" not in skip:
                parametrize.register_parametrization(mod, pname, HalfRound())
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.register_forward_pre_hook(quantize.round_bn_stats_hook)


def compress(model: nn.Module, plan: CompressionPlan, example_input: torch.Tensor,
             batches: Batches | None = None, calibrate: bool = True) -> nn.Module:
    """Return a compressed deep copy of `model` following `plan` (raises PlanError on a bad plan).

    `calibrate=False` leaves BatchNorm statistics and activation ranges as they are (see
    calibrate_model): for sizing (the artifact's bytes do not depend on them), it skips the forward
    passes that make up most of compress()'s time (85% for a ResNet-18 on CPU), which the repair's
    and the warm start's bisections pay dozens of times."""
    training = model.training
    pairs = fold.bn_pairs(model)  # traced once per source model, not per copy
    source, model = model, copy.deepcopy(model).eval()
    output = _check_static(model, plan, batches)
    original_out = {n: layer_weight(model.get_submodule(n)).shape[weight_slot(model.get_submodule(n)).axis]
                    for n in plan.layers}
    chan = [(n, lp.amount, lp.importance) for n, lp in plan.layers.items() if lp.prune == "channel"]
    replay = channel.prune_channels(model, example_input, chan, output, batches)

    ranks: dict[str, int] = {}
    for name, lp in plan.layers.items():
        if lp.rank_ratio < 1.0:
            layer = model.get_submodule(name)
            ranks[name] = lowrank.rank_for(layer, lp.rank_ratio)
            set_submodule(model, name, lowrank.factorise(layer, ranks[name]))

    targets = _targets(model, plan, ranks)
    taylor = {f"{n}.{a}": w for n, lp in targets.items()
              if lp.importance == "taylor" and lp.prune in ("unstructured", "nm", "block")
              for a, w in layer_weights(model.get_submodule(n))}
    scores = prune.taylor_scores(model, taylor, batches or []) if taylor else {}
    for name, lp in targets.items():
        mod = model.get_submodule(name)
        for attr, w in layer_weights(mod):
            comp = WeightCompressor(_mask(w, scores.get(f"{name}.{attr}"), lp), lp.bits, lp.symmetric)
            if calibrate:  # else chosen on first use (WeightCompressor.ensure_clip): sizing never needs it
                comp.choose_clip(w)
            parametrize.register_parametrization(mod, attr, comp, unsafe=True)  # shape kept: skip the check's forward
    folded = [[f"{p}.1" if p in ranks else p, bn] for p, bn in pairs if p in plan.layers]
    for layer_name, bn_name in folded:
        fold.attach(model, layer_name, bn_name, half=plan.float_bits == 16)
    if plan.float_bits == 16:
        skip = {f"{n}.{a}" for n in targets for a in weight_slot(model.get_submodule(n)).attrs}
        skip |= {f"{n}.bias" for n, _ in folded} | {bn for _, bn in folded}
        _round_floats(model, skip)

    acts = [n for n, lp in plan.layers.items() if lp.act_bits < 32]
    for n in acts:
        quantize.attach_act_quant(model.get_submodule(n), plan.layers[n].act_bits)

    record: dict[str, Any] = {
        "plan": plan.to_dict(),
        "input_shape": list(example_input.shape[1:]),
        "channel_replay": [[n, list(i)] for n, i in replay],
        "ranks": ranks,
        "targets": {n: plan_name for plan_name in plan.layers
                    for n in ([f"{plan_name}.0", f"{plan_name}.1"] if plan_name in ranks else [plan_name])},
        "acts": {n: plan.layers[n].act_bits for n in acts},
        "original_out": original_out,
        "folded": folded,
    }
    setattr(model, RECORD_ATTR, record)
    if calibrate:
        calibrate_model(model, batches, source)
    return model.train(training)


def calibrate_model(model: nn.Module, batches: Batches | None, source: nn.Module | None = None) -> None:
    """Calibrate a compressed model in place: BatchNorm statistics re-estimated on `batches`; with
    the `source` model it was compressed from, the Linear layers whose inputs lost channels refitted
    to its outputs (reconstruct.py); then activation ranges observed. compress() does this unless
    calibrate=False; a search sizes plans uncalibrated and calibrates only the one it trains."""
    record = getattr(model, RECORD_ATTR)
    acts = list(record["acts"])
    mods = [model.get_submodule(n) for n in acts]
    for m in mods:  # the activation quantisers only observe (pass through) while BN statistics are gathered
        m.act_observing, m.act_range = True, (float("inf"), float("-inf"))
    if batches:
        recalibrate_bn(model, batches)
        model.eval()
        if source is not None and record["channel_replay"]:
            folded = {layer for layer, _ in record["folded"]}
            dense = [n for n in record["plan"]["layers"] if n not in folded and n not in record["ranks"]
                     and _unmasked(model.get_submodule(n))]
            reconstruct.reconstruct(source, model, dense, record["channel_replay"], batches)
    for m in mods:
        del m.act_observing, m.act_range
    if acts:
        _calibrate_acts(model, acts, batches or [])


def _unmasked(module: nn.Module) -> bool:
    """No weight of the layer is masked: a refit solves for every weight, and a mask would then
    zero some of them (a masked layer would need a least squares over its kept weights alone)."""
    if not parametrize.is_parametrized(module, "weight"):
        return True
    comp = compressor(module)
    mask = comp.mask if isinstance(comp, WeightCompressor) else None
    return mask is None or bool(mask.all())


def compressed_weights(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module name, weight attribute, module) of every weight carrying a mask/quantiser."""
    out = []
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m):
            out += [(n, a, m) for a, p in m.parametrizations.items() if isinstance(p[0], WeightCompressor)]
    return out


def compressed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer with at least one compressed weight."""
    seen: dict[str, nn.Module] = {}
    for n, _, m in compressed_weights(model):
        seen.setdefault(n, m)
    return list(seen.items())


def compressor(module: nn.Module, attr: str = "weight") -> WeightCompressor:
    """The WeightCompressor of a compressed layer's weight `attr`."""
    return module.parametrizations[attr][0]


def kept_weights(model: nn.Module) -> list[torch.Tensor]:
    """The masked float weights (differentiable w.r.t. the trained params), e.g. for an L1 penalty."""
    return [compressor(m, a).masked(m.parametrizations[a].original) for _, a, m in compressed_weights(model)]


def refresh_clipping(model: nn.Module) -> None:
    """Re-run the per-channel clipping search on the current weights (e.g. once per epoch).

    Optional: clipping ratios are chosen at compress time; the scales always follow the weights.
    Sizes do not change.
    """
    with torch.no_grad():
        for _, a, m in compressed_weights(model):
            compressor(m, a).choose_clip(m.parametrizations[a].original)


def sparsity_report(model: nn.Module) -> dict[str, float]:
    """Achieved zero fraction per compressed weight; for channel-pruned layers, the channel fraction removed."""
    record = getattr(model, RECORD_ATTR, {})
    plans = record.get("plan", {}).get("layers", {})
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, mod in compressed_layers(model):
            plan_name = record.get("targets", {}).get(name, name)
            ws = [compressor(mod, a).masked(mod.parametrizations[a].original) for a in mod.parametrizations
                  if isinstance(mod.parametrizations[a][0], WeightCompressor)]
            if plans.get(plan_name, {}).get("prune") == "channel" and name == plan_name:
                out[name] = 1.0 - ws[0].shape[weight_slot(mod).axis] / record["original_out"][name]
            else:
                out[name] = sum(float((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    return out


def _plain_module(mod: nn.Module) -> nn.Module:
    """A plain (unparametrized) module of the same class holding the evaluated tensors. Built
    anew rather than by remove_parametrizations: a deep copy shares its parametrized class with
    the original, which removal would alter."""
    base = type(mod).__bases__[0]
    new = base.__new__(base)
    new.__dict__.update(mod.__dict__)
    new._modules = type(mod._modules)((k, v) for k, v in mod._modules.items() if k != "parametrizations")
    new._parameters = type(mod._parameters)(mod._parameters)
    with torch.no_grad():
        for attr in mod.parametrizations:
            new._parameters[attr] = nn.Parameter(getattr(mod, attr).detach().clone(), requires_grad=False)
    return new


def plain_copy(model: nn.Module) -> nn.Module:
    """The compressed model as load() rebuilds it (eval mode, CPU): parametrized layers become
    plain layers with the evaluated (masked, dequantised, folded, rounded) tensors, and folded
    BatchNorms become Identity. Keeps activation quantisers (hooks and buffers)."""
    plain = copy.deepcopy(model).cpu().eval()
    for name, mod in [(n, m) for n, m in plain.named_modules() if parametrize.is_parametrized(m)]:
        if name:
            set_submodule(plain, name, _plain_module(mod))
    if parametrize.is_parametrized(plain):  # the model's own tensors (ViT's class_token at float16): last,
        plain = _plain_module(plain)        # once its children are plain (it was kept as a child named "")
    for _, bn_name in getattr(model, RECORD_ATTR, {}).get("folded", []):
        set_submodule(plain, bn_name, nn.Identity())
    return plain.eval()
