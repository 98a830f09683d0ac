"""The search space: a YAML file of per-layer choices, turned into a CompressionPlan per Optuna trial.

This is the only module that calls `trial.suggest_*`. Parameter names are fixed for a study
(`conv1.bits`, `fc1.prune`, ...) and every trial suggests the same parameters with the same
choices, so TPE sees one unchanging space and `optuna.trial.FixedTrial(best.params)` rebuilds
the best plan without a study.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from .errors import UserError
from .plan import (IMPORTANCE_KINDS, PRUNE_KINDS, VALID_ACT_BITS, VALID_BITS, CompressionPlan,
                   LayerPlan)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

LAYER_KEYS = ("prune", "amount", "nm", "block_size", "importance", "bits", "symmetric",
              "rank_ratio", "act_bits")
RECOVERY_KEYS = ("distill", "temperature", "l1", "float_bits")
TOP_KEYS = ("include", "exclude", "layer", "overrides", "recovery")


def _bundled_spaces() -> Traversable:
    """The folder of bundled spaces: the package data autocompress.search_spaces of an installed
    wheel (pyproject.toml maps the top-level search_spaces/ folder to it), or that folder itself
    when the package runs from a source checkout, where the mapped package does not exist."""
    try:
        return resources.files("autocompress.search_spaces")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "search_spaces"


SPACES_DIR = str(_bundled_spaces())

_ALLOWED = {
    "prune": set(PRUNE_KINDS), "importance": set(IMPORTANCE_KINDS), "bits": set(VALID_BITS),
    "act_bits": set(VALID_ACT_BITS), "symmetric": {True, False}, "float_bits": {16, 32},
}


@dataclass(frozen=True)
class Choice:
    """One searchable dimension: a categorical list, or a float range {low, high, step?, log?}."""

    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def fixed(self) -> bool:
        return self.low is None and len(self.values) == 1

    def suggest(self, trial: Any, name: str) -> Any:
        if self.low is not None:
            return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        if len(self.values) == 1:
            return self.values[0]
        return trial.suggest_categorical(name, list(self.values))

    def extreme(self, largest: bool) -> Any:
        """The largest/smallest value this choice can take (for the space's size floor)."""
        if self.low is not None:
            return self.high if largest else self.low
        return max(self.values) if largest else min(self.values)

    def to_obj(self) -> Any:
        if self.low is not None:
            return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}
        return list(self.values)


def _parse_choice(key: str, raw: Any, where: str) -> Choice:
    if isinstance(raw, dict):
        extra = set(raw) - {"low", "high", "step", "log"}
        if extra or "low" not in raw or "high" not in raw:
            raise UserError(f"{where}: {key} range needs low and high (optional step, log), got {raw}")
        low, high = float(raw["low"]), float(raw["high"])
        if not low <= high:
            raise UserError(f"{where}: {key} range has low {low} above high {high}")
        step = float(raw["step"]) if raw.get("step") is not None else None
        return Choice(low=low, high=high, step=step, log=bool(raw.get("log", False)))
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise UserError(f"{where}: {key} has an empty choice list; give at least one value")
    if key in _ALLOWED:
        bad = [v for v in values if v not in _ALLOWED[key]]
        if bad:
            raise UserError(f"{where}: {key} has invalid value(s) {bad}; allowed: {sorted(map(str, _ALLOWED[key]))}")
    if key == "nm":
        for v in values:
            parts = str(v).split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
                raise UserError(f"{where}: nm value {v!r} is not an N:M pattern like \"2:4\"")
        values = [str(v) for v in values]
    if key in ("amount",) and any(not 0 <= float(v) < 1 for v in values):
        raise UserError(f"{where}: amount values must be in [0, 1), got {values}")
    if key == "rank_ratio" and any(not 0 < float(v) <= 1 for v in values):
        raise UserError(f"{where}: rank_ratio values must be in (0, 1], got {values}")
    return Choice(values=tuple(values))


def _parse_layer_block(raw: Any, where: str, required: bool) -> dict[str, Choice]:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping of {', '.join(LAYER_KEYS)}")
    unknown = set(raw) - set(LAYER_KEYS) - {"match"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(LAYER_KEYS)}")
    out = {k: _parse_choice(k, raw[k], where) for k in LAYER_KEYS if k in raw}
    if required:
        missing = [k for k in ("prune", "bits") if k not in out]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}")
    return out


@dataclass
class SearchSpace:
    """Per-layer choices (with pattern overrides) plus recovery options, read from YAML."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    layer: dict[str, Choice] = field(default_factory=dict)
    overrides: list[tuple[str, dict[str, Choice]]] = field(default_factory=list)
    recovery: dict[str, Choice] = field(default_factory=dict)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> SearchSpace:
        if not isinstance(raw, dict):
            raise UserError(f"search space {source}: expected a mapping with keys {', '.join(TOP_KEYS)}")
        unknown = set(raw) - set(TOP_KEYS)
        if unknown:
            raise UserError(f"search space {source}: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(TOP_KEYS)}")
        layer = _parse_layer_block(raw.get("layer", {}), f"search space {source}: layer", required=True)
        overrides = []
        for i, o in enumerate(raw.get("overrides") or []):
            where = f"search space {source}: overrides[{i}]"
            if not isinstance(o, dict) or "match" not in o:
                raise UserError(f"{where} needs a 'match' pattern")
            overrides.append((str(o["match"]), _parse_layer_block(o, where, required=False)))
        rec_raw = raw.get("recovery") or {}
        if not isinstance(rec_raw, dict):
            raise UserError(f"search space {source}: recovery must be a mapping")
        unknown = set(rec_raw) - set(RECOVERY_KEYS)
        if unknown:
            raise UserError(f"search space {source}: recovery has unknown key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(RECOVERY_KEYS)}")
        recovery = {k: _parse_choice(k, v, f"search space {source}: recovery") for k, v in rec_raw.items()}
        as_list = lambda v: [str(x) for x in (v if isinstance(v, list) else [v])]  # noqa: E731
        return cls(include=as_list(raw.get("include", ["*"])), exclude=as_list(raw.get("exclude", [])),
                   layer=layer, overrides=overrides, recovery=recovery, source=source)

    @classmethod
    def from_yaml(cls, path: str) -> SearchSpace:
        """Read a YAML space file."""
        if not os.path.isfile(path):
            raise UserError(f"search space file not found: {path}")
        with open(path) as f:
            return cls.from_text(f.read(), os.path.basename(path))

    @classmethod
    def from_text(cls, text: str, source: str) -> SearchSpace:
        """Parse a space from YAML text; `source` names it in error messages."""
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"search space {source} is not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(raw, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": self.include, "exclude": self.exclude,
            "layer": {k: c.to_obj() for k, c in self.layer.items()},
            "overrides": [{"match": m, **{k: c.to_obj() for k, c in o.items()}} for m, o in self.overrides],
            "recovery": {k: c.to_obj() for k, c in self.recovery.items()},
        }

    def bind(self, model: nn.Module, example_input: torch.Tensor | None = None) -> BoundSpace:
        """Resolve the choices for each layer of this model (drops impossible options per layer).

        With `example_input` (a batch the model takes), every option left is also tried once on a
        copy: a real compress and forward per layer and option kind (channel pruning per coupled
        group, on the whole model), and the options that fail are dropped for that layer. So no
        trial fails on an option its layer cannot take, and the study's parameters stay fixed."""
        from .models import prunable_layers

        names = prunable_layers(model)
        if not names:
            raise UserError("the model has no layer to compress (Linear, Conv, Embedding, MultiheadAttention)")
        output_layer = names[-1]
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.include)
                  and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]
        if not chosen:
            raise UserError(f"search space {self.source}: include/exclude patterns match no layer; "
                            f"layers are: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
        layers: dict[str, dict[str, Choice]] = {}
        for name in chosen:
            choices = dict(self.layer)
            for pattern, o in self.overrides:
                if fnmatch.fnmatchcase(name, pattern):
                    choices.update(o)
                    break
            layers[name] = _feasible(choices, model.get_submodule(name), name == output_layer)
        if example_input is not None:
            _drop_failing(layers, model, example_input, output_layer)
        return BoundSpace(layers=layers, recovery=dict(self.recovery))


def _fan_in(module: nn.Module) -> int:
    from .models import layer_weight

    return int(math.prod(layer_weight(module).shape[1:]))


def _feasible(choices: dict[str, Choice], module: nn.Module, is_output: bool) -> dict[str, Choice]:
    """Remove choices that cannot apply to this layer (channel pruning of the output layer,
    N:M patterns or blocks that do not divide its fan-in); fixed per study, so names stay fixed."""
    from .models import weight_slot

    out = dict(choices)
    fan_in = _fan_in(module)
    prune = list(out["prune"].values)
    slot = weight_slot(module)
    if (is_output or not slot.channel) and "channel" in prune:
        prune.remove("channel")
    if not slot.lowrank and "rank_ratio" in out:
        out["rank_ratio"] = Choice(values=(1.0,))
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and "act_bits" in out:
        out["act_bits"] = Choice(values=(32,))
    if "nm" in out:
        nms = tuple(v for v in out["nm"].values if fan_in % int(v.split(":")[1]) == 0)
        if nms:
            out["nm"] = Choice(values=nms)
        else:
            del out["nm"]
    if "nm" not in out and "nm" in prune:
        prune.remove("nm")
    if "block_size" in out:
        bs = tuple(v for v in out["block_size"].values if fan_in % int(v) == 0)
        if bs:
            out["block_size"] = Choice(values=bs)
        else:
            del out["block_size"]
    if "block_size" not in out and "block" in prune:
        prune.remove("block")
    out["prune"] = Choice(values=tuple(prune or ["none"]))
    return out


def _probe_input(module: nn.Module) -> torch.Tensor:
    """A small batch a lone layer of a reachable kind (models.WEIGHT_SLOTS) takes."""
    if isinstance(module, nn.Linear):
        return torch.randn(2, module.in_features)
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (2, 3))
    if isinstance(module, nn.MultiheadAttention):
        return torch.randn(3, 2, module.embed_dim)
    k = max((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation))
    side = k + 2 * max(module.stride)
    return torch.randn(2, module.in_channels, *[side] * len(module.kernel_size))


class _Lone(nn.Module):
    """One layer alone as submodule "0", fed the way its kind takes input (bind-time checks)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.add_module("0", module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._modules["0"]
        if isinstance(m, nn.MultiheadAttention):
            k = x if m.kdim == m.embed_dim else x.new_zeros(*x.shape[:-1], m.kdim)
            v = x if m.vdim == m.embed_dim else x.new_zeros(*x.shape[:-1], m.vdim)
            return m(x, k, v, need_weights=False)[0]
        return m(x)


def _trial_options(c: dict[str, Choice]) -> list[tuple[str, dict[str, Any]]]:
    """One layer plan per option kind left in the choices (other than none and channel)."""
    bits = min(c["bits"].values) if "bits" in c and not c["bits"].low else 8
    base = {"bits": bits, "amount": 0.5}
    out = [(kind, {**base, "prune": kind, **({"nm": c["nm"].values[0]} if kind == "nm" else {}),
                   **({"block_size": c["block_size"].values[0]} if kind == "block" else {})})
           for kind in c["prune"].values if kind not in ("none", "channel")]
    if "rank_ratio" in c and any(float(v) < 1 for v in c["rank_ratio"].values):
        low = min(float(v) for v in c["rank_ratio"].values)
        out.append(("rank_ratio", {**base, "prune": "none", "rank_ratio": low}))
    return out


def _layer_fails(module: nn.Module, values: dict[str, Any]) -> bool:
    """Whether compressing this layer alone with these options fails or gives a model that does not run."""
    from .compression import compress

    net = _Lone(copy.deepcopy(module))
    plan = CompressionPlan(layers={"0": _layer_plan(values)})
    try:
        x = _probe_input(module)
        with torch.no_grad():
            compress(net, plan, x, calibrate=False).eval()(x)
        return False
    except Exception:
        return True


def _drop_failing(layers: dict[str, dict[str, Choice]], model: nn.Module, example_input: torch.Tensor,
                  output_layer: str) -> None:
    """Try each option once (per layer shape and option kind) and drop the ones that fail."""
    from .compression.channel import check_layers
    from .models import layer_weight

    cache: dict[tuple, bool] = {}
    for name, c in layers.items():
        module = model.get_submodule(name)
        key = (type(module), tuple(layer_weight(module).shape), getattr(module, "groups", 1))
        for kind, values in _trial_options(c):
            k = key + (kind, tuple(sorted(values.items())))
            if k not in cache:
                cache[k] = _layer_fails(module, values)
            if not cache[k]:
                continue
            if kind == "rank_ratio":
                c["rank_ratio"] = Choice(values=(1.0,))
            else:
                c["prune"] = Choice(values=tuple(v for v in c["prune"].values if v != kind) or ("none",))
    wants = [n for n, c in layers.items() if "channel" in c["prune"].values]
    for name in check_layers(model, example_input, wants, output_layer):
        c = layers[name]
        c["prune"] = Choice(values=tuple(v for v in c["prune"].values if v != "channel") or ("none",))
    for c in layers.values():
        if "nm" in c and "nm" not in c["prune"].values:
            del c["nm"]
        if "block_size" in c and "block" not in c["prune"].values:
            del c["block_size"]


@dataclass
class BoundSpace:
    """A search space resolved against one model: the exact Optuna parameters of a study."""

    layers: dict[str, dict[str, Choice]]
    recovery: dict[str, Choice]

    def suggest(self, trial: Any) -> CompressionPlan:
        """Turn an Optuna trial (or FixedTrial) into a plan; every layer suggests the same names."""
        layer_plans = {}
        for name, choices in self.layers.items():
            v = {k: c.suggest(trial, f"{name}.{k}") for k, c in choices.items()}
            layer_plans[name] = _layer_plan(v)
        rec = {k: c.suggest(trial, f"recovery.{k}") for k, c in self.recovery.items()}
        return CompressionPlan(layers=layer_plans, **rec)

    def smallest(self) -> CompressionPlan:
        """The most compressed plan the space allows: max sparsity, fewest bits, lowest rank."""
        layer_plans = {}
        for name, c in self.layers.items():
            best = {"prune": "none", "amount": 0.0}
            best_sparsity = 0.0
            amount = c["amount"].extreme(largest=True) if "amount" in c else 0.0
            for kind in c["prune"].values:
                if kind == "nm":
                    for nm in c["nm"].values:
                        n, m = map(int, nm.split(":"))
                        if 1 - n / m > best_sparsity:
                            best, best_sparsity = {"prune": "nm", "nm": nm}, 1 - n / m
                elif kind != "none" and amount > best_sparsity:
                    best, best_sparsity = {"prune": kind, "amount": amount}, amount
            v = {k: ch.extreme(largest=False) for k, ch in c.items() if k not in ("prune", "amount", "nm")}
            v["act_bits"] = 32  # activation scales only add bytes, and need calibration data
            v["importance"] = "magnitude"
            layer_plans[name] = _layer_plan({**v, **best})
        float_bits = self.recovery["float_bits"].extreme(largest=False) if "float_bits" in self.recovery else 32
        return CompressionPlan(layers=layer_plans, float_bits=int(float_bits))

    def param_names(self) -> list[str]:
        names = [f"{n}.{k}" for n, c in self.layers.items() for k, ch in c.items() if not ch.fixed]
        return names + [f"recovery.{k}" for k, ch in self.recovery.items() if not ch.fixed]


def _layer_plan(v: dict[str, Any]) -> LayerPlan:
    kw: dict[str, Any] = {"prune": v.get("prune", "none")}
    if "nm" in v:
        kw["n"], kw["m"] = map(int, str(v["nm"]).split(":"))
    for key in ("amount", "rank_ratio"):
        if key in v:
            kw[key] = float(v[key])
    for key in ("bits", "act_bits", "block_size"):
        if key in v:
            kw[key] = int(v[key])
    for key in ("importance", "symmetric"):
        if key in v:
            kw[key] = v[key]
    if kw["prune"] == "none":
        kw["amount"] = 0.0
    return LayerPlan(**kw)


def bundled_space_names() -> list[str]:
    """Names of the spaces shipped with the package ('default', 'full', ...), for `--space NAME`."""
    return sorted(p.name[:-len(".yaml")] for p in _bundled_spaces().iterdir() if p.name.endswith(".yaml"))


def load_space(space: str | None) -> SearchSpace:
    """A bundled space by name ('default' when None), or the space in a YAML file at path `space`."""
    space = space or "default"
    if os.path.isfile(space):
        return SearchSpace.from_yaml(space)
    bundled = _bundled_spaces() / f"{space}.yaml"
    if bundled.is_file():
        return SearchSpace.from_text(bundled.read_text(encoding="utf-8"), f"{space}.yaml")
    if os.sep in space or space.endswith((".yaml", ".yml")):
        raise UserError(f"search space file not found: {space}")
    raise UserError(f"unknown search space {space!r}: bundled spaces are {', '.join(bundled_space_names())}; "
                    f"or pass the path of a YAML file")
