"""Channel pruning on one small model of each classifier family, and the space's bind-time checks.

Families: grouped convolutions with squeeze-excitation (RegNet-Y), depthwise (MobileNetV2), channel
shuffle (ShuffleNetV2), attention (ViT), concatenation with an auxiliary classifier that only
training mode runs (as GoogLeNet's). Each is channel pruned, exported, and loaded back with the
compressed model's logits; the bound default space offers only options each layer can take.
"""
from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn
from torchvision.models import MobileNetV2, ShuffleNetV2, VisionTransformer
from torchvision.models.regnet import BlockParams, RegNet

from autocompress.artifact import export, load
from autocompress.compression import channel, compress
from autocompress.models import ModelSpec, prunable_layers
from autocompress.plan import CompressionPlan, LayerPlan, PlanError
from autocompress.space import load_space


class AuxNet(nn.Module):
    """Two concatenated branches; an auxiliary classifier on them that runs only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.aux = nn.Sequential(nn.Conv2d(12, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 10))
        self.mix = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], 1)
        aux = self.aux(x) if self.training else None
        y = self.fc(torch.relu(self.mix(x)).mean((2, 3)))
        return (y, aux) if self.training else y


FAMILIES = {
    "grouped": (lambda: RegNet(BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                                            se_ratio=0.25), num_classes=10, stem_width=8), 32),
    "depthwise": (lambda: MobileNetV2(num_classes=10, width_mult=0.25,
                                      inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]]), 32),
    "shuffle": (lambda: ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 64], num_classes=10), 32),
    "attention": (lambda: VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                            mlp_dim=32, num_classes=10), 16),
    "concat-aux": (AuxNet, 16),
}


def _build(family: str) -> tuple[nn.Module, torch.Tensor]:
    factory, side = FAMILIES[family]
    torch.manual_seed(0)
    return factory().eval(), torch.randn(2, 3, side, side)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_channel_prunes_exports_and_loads(family, tmp_path):
    model, x = _build(family)
    layers = prunable_layers(model)
    refused = channel.check_layers(model, x, layers[:-1], layers[-1])
    plan = CompressionPlan(layers={n: LayerPlan(prune="channel", amount=0.3, bits=8)
                                   if n != layers[-1] and n not in refused else LayerPlan(bits=8) for n in layers})
    small = compress(model, plan, x, calibrate=False).eval()
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    assert kept < 0.85, f"{family}: only {1 - kept:.0%} of the parameters went"
    with torch.no_grad():
        y = small(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    path = tmp_path / "m.acz"
    export(small, path, ModelSpec("unused", 10, 3, x.shape[-1]))
    back = load(path, model=model)
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, rtol=1e-4, atol=1e-5)
    if family == "grouped":  # grouped convs keep equal groups, and lost channels
        convs = [m for m in small.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]
        assert convs and all(m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0 for m in convs)
        assert any(m.out_channels < o.out_channels for m, o in zip(
            convs, [m for m in model.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]))
    if family == "shuffle":  # inside a unit channels go; through the shuffle they cannot
        assert "stage2.0.branch2.0" not in refused and "stage2.1.branch2.5" in refused
        assert small.get_submodule("stage2.0.branch2.0").out_channels < model.get_submodule(
            "stage2.0.branch2.0").out_channels
    if family == "attention":  # the hidden width goes in whole heads, and the model's hidden_dim follows
        assert small.hidden_dim == small.conv_proj.out_channels < 16 and small.hidden_dim % 2 == 0
    if family == "concat-aux":  # the auxiliary head lost the inputs its concatenation lost
        assert small.aux[0].in_channels == small.mix.in_channels < 12
        small.train()
        small(x)  # still runs in training mode, auxiliary head included


def test_refused_group_is_a_plan_error():
    model, x = _build("shuffle")
    plan = CompressionPlan(layers={"stage2.1.branch2.5": LayerPlan(prune="channel", amount=0.3)})
    with pytest.raises(PlanError, match="channel shuffle"):
        compress(model, plan, x, calibrate=False)


@pytest.mark.parametrize("family", ["grouped", "shuffle"])
def test_bind_drops_options_a_layer_cannot_take(family):
    model, x = _build(family)
    static = load_space(None).bind(model).layers
    bound = load_space(None).bind(model, x)
    grouped = [n for n in bound.layers if 1 < getattr(model.get_submodule(n), "groups", 1)
               < model.get_submodule(n).out_channels]
    if family == "grouped":
        assert grouped
        for n in grouped:  # N:M, blocks and low rank cannot apply to a grouped conv
            assert "nm" in static[n]["prune"].values
            assert not {"nm", "block"} & set(bound.layers[n]["prune"].values)
    refused = [n for n, c in bound.layers.items() if "channel" in static[n]["prune"].values
               and "channel" not in c["prune"].values]
    assert bool(refused) == (family == "shuffle")
    # every option left compresses: the most compressed plan and a trial taking channels wherever offered
    compress(model, bound.smallest(), x, calibrate=False).eval()(x)
    params = {}
    for n, c in bound.layers.items():
        if not c["prune"].fixed:
            params[f"{n}.prune"] = "channel" if "channel" in c["prune"].values else c["prune"].values[0]
        for k, ch in c.items():
            if k != "prune" and not ch.fixed:
                params[f"{n}.{k}"] = ch.low if ch.low is not None else ch.values[0]
    params.update({f"recovery.{k}": ch.values[0] for k, ch in bound.recovery.items() if not ch.fixed})
    for n in bound.layers:
        if f"{n}.amount" in params:
            params[f"{n}.amount"] = 0.5
    plan = bound.suggest(optuna.trial.FixedTrial(params))
    compress(model, plan, x, calibrate=False).eval()(x)
