"""The artifact: its size is known before fine-tuning, and load() reproduces the compressed model."""
from __future__ import annotations

import os

import pytest
import torch
from conftest_models import TinyResNet, warm_bn
from torch import nn

import numpy as np

from autocompress.compression import codec, compress, refresh_clipping
from autocompress.cost import artifact_size, size_breakdown
from autocompress.errors import UserError
from autocompress.artifact import export, load, read_header
from autocompress.models import LeNet5, ModelSpec, param_bytes
from autocompress.plan import CompressionPlan, LayerPlan

SPEC = ModelSpec("lenet5", 10, 1, 28)
LENET_FP32 = 1_724_320


def _granularity_plan(kind: str, bits: int) -> CompressionPlan:
    """One granularity on every LeNet-5 layer it fits (conv1 has 25 inputs; fc2 is the output layer)."""
    lp = {"none": dict(), "unstructured": dict(prune="unstructured", amount=0.8),
          "nm": dict(prune="nm", n=2, m=4), "channel": dict(prune="channel", amount=0.5),
          "block": dict(prune="block", amount=0.6, block_size=4)}[kind]
    layers = {n: LayerPlan(bits=bits, **lp) for n in ("conv1", "conv2", "fc1", "fc2")}
    if kind == "nm":
        layers["conv1"] = LayerPlan(bits=bits, prune="unstructured", amount=0.3)
    if kind == "channel":
        layers["fc2"] = LayerPlan(bits=bits, prune="unstructured", amount=0.5)
    return CompressionPlan(layers=layers)


def _sgd(model: nn.Module, batches, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


def _same_outputs(model: nn.Module, loaded: nn.Module, x: torch.Tensor, tol: float = 1e-4) -> None:
    with torch.no_grad():
        a, b = model.eval()(x), loaded(x)
    assert (a - b).abs().max().item() < tol
    assert a.argmax(1).equal(b.argmax(1))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 32])
@pytest.mark.parametrize("kind", ["none", "unstructured", "nm", "channel", "block"])
def test_size_is_exact_before_and_after_training(lenet, data, tmp_path, kind, bits):
    c = compress(lenet, _granularity_plan(kind, bits), data[0][:1], data[1][:1])
    before = artifact_size(c, SPEC)
    _sgd(c, data[1][:1], steps=1)
    path = tmp_path / "m.acz"
    written = export(c, path, SPEC)
    assert before == written == os.path.getsize(path) == artifact_size(c, SPEC)
    _same_outputs(c, load(path), data[0])


@pytest.mark.parametrize("name,plan", [
    ("act quant 8/4", CompressionPlan(layers={"conv2": LayerPlan(bits=4, act_bits=8),
                                              "fc1": LayerPlan(bits=4, act_bits=4, prune="unstructured", amount=0.9)})),
    ("float16", CompressionPlan(layers={"fc1": LayerPlan(bits=16, prune="unstructured", amount=0.5),
                                        "conv2": LayerPlan(bits=3)}, float_bits=16)),
    ("taylor", CompressionPlan(layers={n: LayerPlan(bits=4, prune="unstructured", amount=0.9, importance="taylor")
                                       for n in ("conv2", "fc1")})),
    ("asymmetric", CompressionPlan(layers={n: LayerPlan(bits=b, symmetric=False, prune="unstructured", amount=0.5)
                                           for n, b in (("conv1", 2), ("conv2", 3), ("fc1", 5), ("fc2", 8))})),
    ("1 bit", CompressionPlan(layers={"fc1": LayerPlan(bits=1, prune="unstructured", amount=0.9),
                                      "conv2": LayerPlan(bits=1)})),
    ("low rank", CompressionPlan(layers={"fc1": LayerPlan(bits=4, rank_ratio=0.2, prune="nm", n=1, m=4),
                                         "conv2": LayerPlan(bits=6, rank_ratio=0.5, act_bits=8)})),
    ("taylor channel", CompressionPlan(layers={"conv1": LayerPlan(prune="channel", amount=0.4, importance="taylor",
                                                                  bits=8), "fc1": LayerPlan(bits=4)})),
])
def test_every_technique_round_trips(lenet, data, tmp_path, name, plan):
    c = compress(lenet, plan, data[0][:1], data[1])
    before = artifact_size(c, SPEC)
    _sgd(c, data[1], steps=1)
    refresh_clipping(c)  # re-choosing clipping ratios changes values, never sizes
    path = tmp_path / "m.acz"
    assert export(c, path, SPEC) == before
    loaded = load(path)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in loaded.modules() if hasattr(m, "weight"))
    _same_outputs(c, loaded, data[0])
    _same_outputs(c, load(path, LeNet5()), data[0])  # onto a given skeleton


def test_residual_bn_net_round_trips(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    net = warm_bn(TinyResNet(), x)
    plan = CompressionPlan(layers={
        "stem": LayerPlan(prune="channel", amount=0.5, bits=8),
        "layer1.conv1": LayerPlan(prune="unstructured", amount=0.5, bits=4, act_bits=8),
        "layer2.conv1": LayerPlan(prune="channel", amount=0.25, bits=4, symmetric=False),
        "layer2.conv2": LayerPlan(prune="nm", n=2, m=4, bits=3, rank_ratio=0.5),
        "fc": LayerPlan(bits=8)}, float_bits=16)
    c = compress(net, plan, x[:1], [(x, y)])
    spec = ModelSpec("tests/conftest_models.py:TinyResNet", 10, 1, 8)
    before = artifact_size(c, spec)
    _sgd(c, [(x, y)], steps=2)
    path = tmp_path / "r.acz"
    assert export(c, path, spec) == before == os.path.getsize(path)
    _same_outputs(c, load(path, TinyResNet()), x)


def test_float16_storage_saturates_instead_of_overflowing(tmp_path):
    """A BatchNorm with a near-zero variance (a random-weight EfficientNet after calibration)
    folds into a bias beyond float16's range: stored as inf, it made the search's model and its
    artifact give NaN. Those values saturate at +-65504, in the model and in the file alike."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    net = warm_bn(TinyResNet(), x)
    with torch.no_grad():
        net.bn.running_var.fill_(1e-12)
        net.bn.running_mean.fill_(1.0)
        net.bn.eps = 1e-12
        net.layer1.bn1.running_mean.fill_(1e6)  # not folded at float_bits=16 alone: stored as is
    plan = CompressionPlan(layers={"stem": LayerPlan(bits=8), "fc": LayerPlan(bits=8)}, float_bits=16)
    c = compress(net, plan, x[:1], calibrate=False)
    with torch.no_grad():
        assert float(c.eval().stem.bias.abs().max()) == 65504.0  # the folded bias, saturated
        out = c(x)
    assert torch.isfinite(out).all()
    spec = ModelSpec("tests/conftest_models.py:TinyResNet", 10, 1, 8)
    export(c, tmp_path / "h.acz", spec)
    _same_outputs(c, load(tmp_path / "h.acz", TinyResNet()), x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_b_bit_tensors_take_b_bits(lenet, data, symmetric):
    """Dense b-bit codes: 2 bytes of float16 scale per row, b-bit zero-points, ceil(numel*b/8) bytes of codes."""
    for bits in (1, 2, 3, 4, 5, 6, 7, 8):
        if bits == 1 and not symmetric:
            continue
        plan = CompressionPlan.uniform(["conv1", "conv2", "fc1", "fc2"], bits=bits, symmetric=symmetric)
        sizes = size_breakdown(compress(lenet, plan, data[0][:1]), SPEC)
        for n in ("conv1", "conv2", "fc1", "fc2"):
            w = lenet.get_submodule(n).weight
            zp = 0 if symmetric or bits == 1 else -(-w.shape[0] * bits // 8)
            assert sizes[f"{n}.weight"] == 2 * w.shape[0] + zp + -(-w.numel() * bits // 8)
        assert sizes["fc1.bias"] == 500 * 4
    p4 = size_breakdown(compress(lenet, CompressionPlan.uniform(["fc1"], bits=4), data[0][:1]), SPEC)
    p6 = size_breakdown(compress(lenet, CompressionPlan.uniform(["fc1"], bits=6), data[0][:1]), SPEC)
    assert (p6["total"] - p6["header"]) - (p4["total"] - p4["header"]) == 400_000 * 2 // 8


def test_sparse_coding_beats_a_bitmap_at_100x(lenet, data, tmp_path):
    plan = CompressionPlan(layers={
        "conv1": LayerPlan(bits=6),
        "conv2": LayerPlan(prune="unstructured", amount=0.8, bits=4),
        "fc1": LayerPlan(prune="unstructured", amount=0.985, bits=3),
        "fc2": LayerPlan(prune="unstructured", amount=0.5, bits=4)}, float_bits=16)
    c = compress(lenet, plan, data[0][:1])
    size = export(c, tmp_path / "m.acz", SPEC)
    assert param_bytes(lenet) == LENET_FP32
    assert size < LENET_FP32 / 40
    fc1 = size_breakdown(c, SPEC)["fc1.weight"]
    bitmap = 400_000 // 8 + -(-6000 * 3 // 8) + 1000
    assert fc1 < bitmap / 2


def test_header_holds_plan_and_spec(lenet, data, tmp_path):
    plan = CompressionPlan(layers={"fc1": LayerPlan(bits=4, prune="unstructured", amount=0.5)})
    path = tmp_path / "m.acz"
    export(compress(lenet, plan, data[0][:1]), path, SPEC)
    h = read_header(path)
    assert h["format"] == 1 and h["spec"] == SPEC.to_dict()
    assert CompressionPlan.from_dict(h["plan"]) == plan


def test_what_does_not_shape_the_model_costs_no_bytes(lenet, data, tmp_path):
    """A warm-start plan fixes prune, amount and bits; the sampler draws the rest (an N:M pattern
    for a channel-pruned layer, distill), and an unpruned layer becomes "unstructured" by 0 where
    the space has no "none". Those must not change the artifact: mnasnet0_5's warm-start
    plans came out 50-60 bytes larger as trials than as sized, over the budget they were fitted
    to, and each paid a repair before training."""
    base = {"conv2": LayerPlan(bits=4, prune="channel", amount=0.25),
            "fc1": LayerPlan(bits=3, prune="unstructured", amount=0.8), "fc2": LayerPlan(bits=4, prune="nm", n=1, m=4),
            "conv1": LayerPlan(bits=5)}
    drawn = {"conv2": LayerPlan(bits=4, prune="channel", amount=0.25, n=1, m=8, block_size=8),
             "fc1": LayerPlan(bits=3, prune="unstructured", amount=0.8, n=1, m=4, block_size=2),
             "fc2": LayerPlan(bits=4, prune="nm", n=1, m=4, amount=0.6),
             "conv1": LayerPlan(bits=5, prune="unstructured", amount=0.0)}  # where the space has no "none"
    example = data[0][:1]
    a = compress(lenet, CompressionPlan(layers=base), example)
    b = compress(lenet, CompressionPlan(layers=drawn, distill=0.5, temperature=2.0, l1=1e-5), example)
    assert artifact_size(a, SPEC) == artifact_size(b, SPEC) == export(b, tmp_path / "b.acz", SPEC)
    assert read_header(tmp_path / "b.acz")["plan"] == CompressionPlan(layers=base).to_dict()
    different = compress(lenet, CompressionPlan(layers={**base, "fc2": LayerPlan(bits=4, prune="nm", n=2, m=4)}),
                         example)
    export(different, tmp_path / "c.acz", SPEC)
    assert read_header(tmp_path / "c.acz")["plan"]["layers"]["fc2"]["n"] == 2  # an N:M layer keeps its pattern


def test_payload_walker_tiles_the_payload_with_each_entrys_streams(lenet, data, tmp_path):
    from autocompress.artifact import ACT_BYTES, encode, read_artifact, walk_payload

    plan = CompressionPlan(layers={"conv2": LayerPlan(bits=4, prune="nm", n=2, m=4, act_bits=8),
                                   "fc1": LayerPlan(bits=3, prune="unstructured", amount=0.9, symmetric=False)},
                           float_bits=16)
    c = compress(lenet, plan, data[0][:1], data[1][:1])
    export(c, tmp_path / "m.acz", SPEC)
    header, payload = read_artifact(tmp_path / "m.acz")
    walked = list(walk_payload(header["entries"], payload))
    assert {e["t"] for e, _ in walked} == {"q", "f", "act"}
    assert [bytes(ch) for _, chunks in walked for ch in chunks] == encode(c, SPEC)[1]
    assert all(len(chunks[0]) == ACT_BYTES for e, chunks in walked if e["t"] == "act")
    assert sum(len(ch) for _, chunks in walked for ch in chunks) == len(payload)
    with pytest.raises(ValueError, match="payload ends inside"):
        list(walk_payload(header["entries"], payload[:-1]))


def test_bad_files_raise_user_error(lenet, data, tmp_path):
    path = tmp_path / "m.acz"
    export(compress(lenet, CompressionPlan(layers={"fc1": LayerPlan(bits=4)}), data[0][:1]), path, SPEC)
    raw = path.read_bytes()
    cases = {"truncated": raw[: len(raw) // 2], "header cut": raw[:20], "tiny": raw[:3], "magic": b"XXXX" + raw[4:],
             "flipped": raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:], "trailing": raw + b"\0"}
    for what, blob in cases.items():
        bad = tmp_path / f"{what}.acz"
        bad.write_bytes(blob)
        with pytest.raises(UserError) as e:
            load(bad)
        assert len(str(e.value).splitlines()) == 1, what
    with pytest.raises(UserError, match="cannot read"):
        load(tmp_path / "missing.acz")


def test_failed_export_leaves_nothing(lenet, data, tmp_path):
    path = tmp_path / "m.acz"
    path.write_bytes(b"old")
    with pytest.raises(UserError):
        export(LeNet5(), path, SPEC)  # not a compressed model
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.acz"]


@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.5, 0.97, 1.0])
def test_mask_codecs_round_trip_and_pick_the_cheapest(density):
    rng = np.random.default_rng(0)
    mask = rng.random(50_000) < density
    info, streams = codec.encode_mask(mask)
    assert codec.decode_mask(info, streams, mask.size).tolist() == mask.tolist()
    assert sum(map(len, streams)) <= -(-mask.size // 8)
    if 0 < density < 0.06 or density > 0.94:
        assert info["kind"] == "rice"


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (5, 16), (16, 32)])
def test_nm_combination_index_round_trips(n, m):
    rng = np.random.default_rng(1)
    idx = np.argsort(rng.random((300, m)), axis=1)[:, :n]
    mask = np.zeros((300, m), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    info, streams = codec.encode_mask(mask.ravel(), (n, m))
    assert info["kind"] == "nm" and len(streams[0]) == -(-300 * codec.nm_width(n, m) // 8)
    assert codec.decode_mask(info, streams, mask.size).tolist() == mask.ravel().tolist()


def test_model_level_tensors_at_float16_leave_a_plain_copy_like_the_loaded_model(tmp_path):
    """ViT keeps class_token and pos_embedding on the model itself: at float_bits=16 the root
    module is parametrized. plain_copy (the deployed form) kept it as a child named "" (state-dict
    keys '.class_token', found by bench/zoo_search on vit_b_32); it now matches what load() gives."""
    from torchvision.models import VisionTransformer

    from autocompress.compression import plain_copy
    from autocompress.models import prunable_layers

    def small():
        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=10).eval()

    x = torch.randn(4, 3, 32, 32)
    net = small()
    plan = CompressionPlan(layers={n: LayerPlan(prune="unstructured", amount=0.5, bits=4)
                                   for n in prunable_layers(net)}, float_bits=16)
    c = compress(net, plan, x[:1], calibrate=False)
    spec = ModelSpec("torchvision:vit_b_32", 10, 3, 32)
    export(c, tmp_path / "v.acz", spec)
    loaded = load(tmp_path / "v.acz", small())
    plain = plain_copy(c)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(plain) == shapes(loaded) and not any(k.startswith(".") for k in shapes(plain))
    _same_outputs(plain, loaded, x)
