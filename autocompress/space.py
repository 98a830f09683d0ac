"""The search space: a YAML file of per-layer choices, turned into a CompressionPlan per Optuna trial.

This is the only module that calls `trial.suggest_*`. Parameter names are fixed for a study
(`conv1.bits`, `fc1.prune`, ...) and every trial suggests the same parameters with the same
choices, so TPE sees one unchanging space and `optuna.trial.FixedTrial(best.params)` rebuilds
the best plan without a study.
"""
from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from torch import nn

from .errors import UserError
from .plan import (IMPORTANCE_KINDS, PRUNE_KINDS, VALID_ACT_BITS, VALID_BITS, CompressionPlan,
                   LayerPlan)

LAYER_KEYS = ("prune", "amount", "nm", "block_size", "importance", "bits", "symmetric",
              "rank_ratio", "act_bits")
RECOVERY_KEYS = ("distill", "temperature", "l1", "float_bits")
TOP_KEYS = ("include", "exclude", "layer", "overrides", "recovery")

SPACES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")

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
        """Read a YAML space; a bare name like 'default' means search_spaces/default.yaml."""
        if not os.path.exists(path) and os.path.exists(os.path.join(SPACES_DIR, f"{path}.yaml")):
            path = os.path.join(SPACES_DIR, f"{path}.yaml")
        if not os.path.isfile(path):
            raise UserError(f"search space file not found: {path}")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"search space {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(raw, source=os.path.basename(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": self.include, "exclude": self.exclude,
            "layer": {k: c.to_obj() for k, c in self.layer.items()},
            "overrides": [{"match": m, **{k: c.to_obj() for k, c in o.items()}} for m, o in self.overrides],
            "recovery": {k: c.to_obj() for k, c in self.recovery.items()},
        }

    def bind(self, model: nn.Module) -> BoundSpace:
        """Resolve the choices for each layer of this model (drops impossible options per layer)."""
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


def load_space(path: str | None) -> SearchSpace:
    """The space at `path`, or search_spaces/default.yaml."""
    return SearchSpace.from_yaml(path or os.path.join(SPACES_DIR, "default.yaml"))
