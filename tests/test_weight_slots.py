"""Every weight is reachable by a plan: MultiheadAttention, Conv1d, ConvTranspose2d and Embedding
weights compress, export and load back exactly; BatchNorm is folded; floats are stored as float16;
the default space's floor is at least 50x on small MobileNet- and ViT-like models."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from autocompress.artifact import export, load, read_header
from autocompress.compression import compress
from autocompress.cost import artifact_size, space_untouchable, untouchable_bytes
from autocompress.deploy import deployable
from autocompress.models import ModelSpec, param_bytes, prunable_layers
from autocompress.plan import CompressionPlan, LayerPlan
from autocompress.space import load_space


class Mixed(nn.Module):
    """One layer of each newly reachable kind, with BatchNorm after three of them."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, 8, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn_conv = nn.BatchNorm2d(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.emb = nn.Embedding(6, 8)
        self.c1 = nn.Conv1d(8, 16, 3, padding=1)
        self.bn_c1 = nn.BatchNorm1d(16)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_conv(self.conv(torch.relu(self.bn_up(self.up(x))))))
        t = y.flatten(2).transpose(1, 2)
        a, _ = self.attn(t, t, t, need_weights=False)
        t = self.norm(t + a).mean(1)
        e = self.emb(torch.arange(6, device=x.device)).t().unsqueeze(0) * x.flatten(1)[:, :6].unsqueeze(1)
        e = torch.relu(self.bn_c1(self.c1(e))).mean(2)
        return self.head(torch.cat([t, e], 1))


class InputNorm(nn.Module):
    """A BatchNorm with no layer before it, and one after an addition: neither can be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(1)
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.bn_sum = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_in(x)
        return self.fc(torch.relu(self.bn_sum(self.a(x) + self.b(x))).flatten(1))


SPEC = ModelSpec(f"{__name__}:Mixed", 10, 1, 8)


@pytest.fixture(scope="module")
def mixed():
    """A Mixed model with real BatchNorm statistics (a few train-mode passes)."""
    sys.modules.setdefault(__name__, sys.modules[__name__])
    torch.manual_seed(0)
    m = Mixed()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8))
    return m.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _plan(model: nn.Module, kind: str, float_bits: int = 16) -> CompressionPlan:
    return CompressionPlan(layers={n: LayerPlan(prune=kind, amount=0.5, bits=4) for n in prunable_layers(model)},
                           float_bits=float_bits)


def test_new_layer_kinds_are_planned_layers(mixed, batch):
    assert prunable_layers(mixed) == ["up", "conv", "attn", "attn.out_proj", "emb", "c1", "head"]
    bound = load_space(None).bind(mixed, batch[0][:2])  # every option tried once on a copy
    for name in ("up", "attn", "emb", "c1"):
        assert {"unstructured", "nm", "block"} <= set(bound.layers[name]["prune"].values)
    assert "channel" not in bound.layers["attn"]["prune"].values


@pytest.mark.parametrize("kind", ["none", "unstructured", "nm", "block"])
def test_every_kind_round_trips_with_identical_logits(mixed, batch, tmp_path, kind):
    x, y = batch
    c = compress(mixed, _plan(mixed, kind), x[:2], [(x, y)])
    path = tmp_path / "m.acz"
    assert export(c, path, SPEC) == artifact_size(c, SPEC) == os.path.getsize(path)
    names = {e["name"] for e in read_header(path)["entries"] if e["t"] == "q"}
    assert {"attn.in_proj_weight", "emb.weight", "c1.weight", "up.weight"} <= names
    loaded = load(path, mixed)
    with torch.no_grad():
        assert torch.equal(c.eval()(x), loaded(x))
        # the planned weights really are quantised: 4-bit codes give at most 16 values per row
        w = loaded.attn.in_proj_weight
        assert max(len(torch.unique(r)) for r in w) <= 16
        if kind != "none":
            assert float((loaded.emb.weight == 0).float().mean()) >= 0.45


def test_batchnorm_is_folded_into_the_layer_before_it(mixed, batch, tmp_path):
    x, y = batch
    c = compress(mixed, _plan(mixed, "unstructured"), x[:2], [(x, y)])
    assert sorted(c.autocompress_record["folded"]) == [["c1", "bn_c1"], ["conv", "bn_conv"], ["up", "bn_up"]]
    export(c, tmp_path / "m.acz", SPEC)
    loaded = load(tmp_path / "m.acz", mixed)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    assert loaded.conv.bias is not None  # the conv had none; the folded BatchNorm shift lives there
    names = {e["name"] for e in read_header(tmp_path / "m.acz")["entries"]}
    assert not any(n.startswith("bn_") for n in names)
    with torch.no_grad():
        assert torch.equal(c.eval()(x), loaded(x))
    deployed = deployable(tmp_path / "m.acz", calib=[x], backend="x86")
    with torch.no_grad():
        assert deployed(x).shape == (16, 10)


def test_batchnorm_without_a_foldable_layer_before_it_stays(tmp_path):
    torch.manual_seed(0)
    m = InputNorm().eval()
    x = torch.randn(4, 1, 8, 8)
    c = compress(m, CompressionPlan.uniform(prunable_layers(m), bits=4), x[:2])
    assert c.autocompress_record["folded"] == []
    sys.modules.setdefault(__name__, sys.modules[__name__])
    export(c, tmp_path / "n.acz", ModelSpec(f"{__name__}:InputNorm", 10, 1, 8))
    loaded = load(tmp_path / "n.acz", m)
    assert isinstance(loaded.bn_in, nn.BatchNorm2d) and isinstance(loaded.bn_sum, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(c.eval()(x), loaded(x))


def test_fine_tuning_trains_through_the_batchnorm(mixed, batch):
    x, y = batch
    c = compress(mixed, _plan(mixed, "unstructured"), x[:2], [(x, y)])
    c.train()
    nn.functional.cross_entropy(c(x), y).backward()
    assert c.bn_conv.weight.grad is not None and c.bn_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("float_bits", [16, 32])
def test_float_tensors_are_stored_at_float_bits(mixed, batch, tmp_path, float_bits):
    x, y = batch
    c = compress(mixed, _plan(mixed, "none", float_bits), x[:2], [(x, y)])
    size = export(c, tmp_path / "f.acz", SPEC)
    assert size == os.path.getsize(tmp_path / "f.acz")
    floats = [e for e in read_header(tmp_path / "f.acz")["entries"] if e["t"] == "f"]
    assert {"norm.weight", "attn.in_proj_bias", "conv.bias"} <= {e["name"] for e in floats}
    assert {e["bits"] for e in floats} == {float_bits}
    with torch.no_grad():
        assert torch.equal(c.eval()(x), load(tmp_path / "f.acz", mixed)(x))


def test_untouchable_bytes_are_what_no_plan_changes(mixed, batch):
    x, y = batch
    small = compress(mixed, _plan(mixed, "unstructured"), x[:2])
    dense = compress(mixed, CompressionPlan(layers={n: LayerPlan(bits=8) for n in prunable_layers(mixed)},
                                            float_bits=16), x[:2])
    # the same float tensors and nearly the same header: only the planned weights differ
    assert abs(untouchable_bytes(small, SPEC) - untouchable_bytes(dense, SPEC)) < 64
    assert untouchable_bytes(small, SPEC) < artifact_size(small, SPEC)
    bound = load_space(None).bind(mixed)
    assert space_untouchable(mixed, bound, SPEC, x[:2]) <= untouchable_bytes(small, SPEC) + 64


def _floor_ratio(model: nn.Module, size: int) -> float:
    spec = ModelSpec("torchvision:x", 10, 3, size)
    plan = load_space(None).bind(model).smallest()
    assert plan.float_bits == 16
    c = compress(model, plan, torch.zeros(1, 3, size, size), calibrate=False)
    return param_bytes(model) / artifact_size(c, spec)


def test_default_floor_of_a_small_mobilenet_is_50x():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5).eval()
    assert _floor_ratio(model, 32) >= 50


def test_default_floor_of_a_small_vit_is_50x():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=128,
                              mlp_dim=512, num_classes=10).eval()
    assert "encoder.layers.encoder_layer_0.self_attention" in prunable_layers(model)
    assert _floor_ratio(model, 32) >= 50
