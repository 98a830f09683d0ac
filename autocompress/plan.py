"""The compression plan: a plain, JSON round-trippable value describing what to do to each layer.

The plan is the contract between the search space (which proposes it), the compression engine
(which applies it), the cost model and the exporter. It imports nothing from the package.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

PLAN_VERSION = 1

PRUNE_KINDS = ("none", "unstructured", "nm", "channel", "block")
IMPORTANCE_KINDS = ("magnitude", "taylor")
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
VALID_ACT_BITS = (4, 8, 32)


class PlanError(ValueError):
    """A plan (or budget) that cannot be applied; the message names the offending layer or field."""


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one Linear/Conv layer.

    prune: "none", "unstructured" (by magnitude or Taylor score), "nm" (keep n of every m
    consecutive input weights), "channel" (remove whole output channels, physically), or
    "block" (remove 1 x block_size blocks along the input dimension).
    amount: the fraction of weights / channels / blocks removed (ignored for "nm" and "none").
    bits: weight bits; 32 keeps float32, 16 stores float16, 1-8 are integer codes per output channel.
    rank_ratio: 1.0 keeps the layer whole; below 1 factorises it into two layers of rank
    ceil(rank_ratio * min(out, in * k * k)).
    act_bits: 32 leaves the layer's input alone; 8 or 4 fake-quantises it per tensor.
    """

    prune: str = "none"
    amount: float = 0.0
    n: int = 2
    m: int = 4
    block_size: int = 4
    importance: str = "magnitude"
    bits: int = 32
    symmetric: bool = True
    rank_ratio: float = 1.0
    act_bits: int = 32

    def validate(self, name: str = "?") -> None:
        """Raise PlanError naming `name` if a field is out of range."""
        if self.prune not in PRUNE_KINDS:
            raise PlanError(f"layer {name}: prune must be one of {', '.join(PRUNE_KINDS)}, got {self.prune!r}")
        if not 0.0 <= self.amount < 1.0:
            raise PlanError(f"layer {name}: amount must be in [0, 1), got {self.amount}")
        if self.prune == "nm" and not (1 <= self.n < self.m <= 32):
            raise PlanError(f"layer {name}: N:M needs 1 <= n < m <= 32, got {self.n}:{self.m}")
        if self.prune == "block" and self.block_size < 2:
            raise PlanError(f"layer {name}: block_size must be >= 2, got {self.block_size}")
        if self.importance not in IMPORTANCE_KINDS:
            raise PlanError(f"layer {name}: importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {self.importance!r}")
        if self.bits not in VALID_BITS:
            raise PlanError(f"layer {name}: bits must be 1-8, 16 or 32, got {self.bits}")
        if not 0.0 < self.rank_ratio <= 1.0:
            raise PlanError(f"layer {name}: rank_ratio must be in (0, 1], got {self.rank_ratio}")
        if self.act_bits not in VALID_ACT_BITS:
            raise PlanError(f"layer {name}: act_bits must be one of {VALID_ACT_BITS}, got {self.act_bits}")

    @property
    def sparsity(self) -> float:
        """Nominal fraction of this layer's weights set to zero by pruning."""
        if self.prune == "none":
            return 0.0
        if self.prune == "nm":
            return 1.0 - self.n / self.m
        return self.amount

    def stored(self) -> LayerPlan:
        """This layer as an artifact stores it: what does not shape the deployed layer at its
        default. The N:M pattern unless pruned N:M, the block size unless pruned in blocks, the
        amount when N:M, the importance score that chose what to prune; pruned by an amount of 0 is
        not pruned (a warm-start plan leaves the output layer unpruned, its trial prunes it
        "unstructured" by 0 where the space has no "none")."""
        plain, nm = LayerPlan(), self.prune == "nm"
        return replace(self, prune=self.prune if nm or self.amount > 0 else "none", importance=plain.importance,
                       n=self.n if nm else plain.n, m=self.m if nm else plain.m,
                       block_size=self.block_size if self.prune == "block" else plain.block_size,
                       amount=plain.amount if nm else self.amount)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown layer-plan key(s): {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class CompressionPlan:
    """A per-layer plan plus the fine-tune recovery options that belong to the same trial.

    layers maps a layer name (as in model.named_modules()) to its LayerPlan; layers not named
    are left as they are. distill is the weight of the distillation loss (0 = off), temperature
    its softmax temperature, l1 the coefficient of an L1 penalty on the kept weights.
    float_bits (32 or 16) is how the remaining float tensors (biases, BatchNorm) are stored.
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    distill: float = 0.0
    temperature: float = 4.0
    l1: float = 0.0
    float_bits: int = 32
    version: int = PLAN_VERSION

    def validate(self) -> None:
        for name, lp in self.layers.items():
            lp.validate(name)
        if not 0.0 <= self.distill <= 1.0:
            raise PlanError(f"distill must be in [0, 1], got {self.distill}")
        if self.temperature <= 0:
            raise PlanError(f"temperature must be > 0, got {self.temperature}")
        if self.l1 < 0:
            raise PlanError(f"l1 must be >= 0, got {self.l1}")
        if self.float_bits not in (16, 32):
            raise PlanError(f"float_bits must be 16 or 32, got {self.float_bits}")

    def stored(self) -> CompressionPlan:
        """The plan as an artifact's header stores it: what the deployed model is made of
        (LayerPlan.stored per layer), with the fine-tune's options (distill, temperature, l1) at
        their defaults.

        Why: the header is compressed, so those values cost bytes, and a trial whose plan the warm
        start fixed has them drawn by the sampler. Such a trial's artifact came out 50-60 bytes
        larger than the plan the warm start sized, over a budget the plan had been fitted to
        within 30 bytes (mnasnet0_5 at 20x), and every such trial paid a repair (8 sizings, 1.3 s
        of overhead) before training."""
        plain = CompressionPlan()
        return replace(self, layers={name: lp.stored() for name, lp in self.layers.items()},
                       distill=plain.distill, temperature=plain.temperature, l1=plain.l1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "distill": self.distill,
            "temperature": self.temperature,
            "l1": self.l1,
            "float_bits": self.float_bits,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionPlan:
        d = dict(d)
        version = d.pop("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version} is not supported (this build reads {PLAN_VERSION})")
        layers = {k: LayerPlan.from_dict(v) for k, v in d.pop("layers", {}).items()}
        known = {"distill", "temperature", "l1", "float_bits"}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown plan key(s): {', '.join(sorted(unknown))}")
        return cls(layers=layers, version=version, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        return cls.from_dict(json.loads(text))

    @classmethod
    def uniform(cls, layer_names: list[str], **layer_kwargs: Any) -> CompressionPlan:
        """The same LayerPlan for every named layer (the 'uniform baseline')."""
        lp = LayerPlan(**layer_kwargs)
        return cls(layers={n: lp for n in layer_names})

    def with_layer(self, name: str, **changes: Any) -> CompressionPlan:
        layers = dict(self.layers)
        layers[name] = replace(layers.get(name, LayerPlan()), **changes)
        return replace(self, layers=layers)

    def summary(self) -> dict[str, Any]:
        """Short scalar summary for logging (mean bits, mean sparsity, counts per granularity)."""
        lps = list(self.layers.values())
        counts = {k: sum(lp.prune == k for lp in lps) for k in PRUNE_KINDS}
        return {
            "layers": len(lps),
            "mean_bits": round(sum(lp.bits for lp in lps) / max(len(lps), 1), 3),
            "mean_sparsity": round(sum(lp.sparsity for lp in lps) / max(len(lps), 1), 4),
            "lowrank_layers": sum(lp.rank_ratio < 1.0 for lp in lps),
            "act_quant_layers": sum(lp.act_bits < 32 for lp in lps),
            **{f"n_{k}": v for k, v in counts.items()},
            "distill": self.distill,
            "l1": self.l1,
        }


_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_BUDGET_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A size budget: absolute bytes, or a compression ratio of the original's fp32 size."""

    bytes: int | None = None
    ratio: float | None = None

    def limit(self, original_bytes: int) -> int:
        """The largest allowed artifact size in bytes."""
        if self.bytes is not None:
            return self.bytes
        assert self.ratio is not None
        return int(math.floor(original_bytes / self.ratio))

    def __str__(self) -> str:
        return f"{self.ratio:g}x" if self.ratio is not None else f"{self.bytes} B"


def parse_budget(text: str) -> Budget:
    """Parse '50KB', '1.5MiB', '2000B', '20x'. Decimal units (KB=1000) and binary (KiB=1024).

    Raises PlanError with a message saying what is accepted.
    """
    hint = "use a size like 50KB, 1.5MB, 200KiB, 2000B or a ratio like 20x"
    m = _BUDGET_RE.match(str(text))
    if not m:
        raise PlanError(f"cannot parse budget {text!r}: {hint}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"budget must be positive, got {text!r}: {hint}")
    if unit == "x":
        if value <= 1:
            raise PlanError(f"a ratio budget must be above 1x, got {text!r}")
        return Budget(ratio=value)
    if unit == "":
        raise PlanError(f"budget {text!r} has no unit: {hint}")
    if unit not in _UNITS:
        raise PlanError(f"unknown budget unit {m.group(2)!r} in {text!r}: {hint}")
    n = int(round(value * _UNITS[unit]))
    if n < 1:
        raise PlanError(f"budget {text!r} is below one byte")
    return Budget(bytes=n)


def format_bytes(n: float) -> str:
    """Human-readable decimal size: 1234 -> '1.23 KB'."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
