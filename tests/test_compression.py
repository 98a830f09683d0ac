"""compress(): masks, N:M pattern, channel pruning equivalence, low rank, bad plans."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch_pruning as tp
from conftest_models import GroupedNet, TinyResNet, warm_bn
from torch import nn

from autocompress.compression import calibrate_model, compress, compressed_layers, kept_weights, sparsity_report
from autocompress.cost import artifact_size
from autocompress.artifact import artifact_bytes
from autocompress.models import ModelSpec, prunable_layers
from autocompress.plan import CompressionPlan, LayerPlan, PlanError

LENET = ["conv1", "conv2", "fc1", "fc2"]


def _plan(**kw) -> CompressionPlan:
    return CompressionPlan(layers={n: LayerPlan(**v) for n, v in kw.items()})


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_unstructured_sparsity_matches_plan(lenet, data, importance):
    amounts = {"conv1": 0.3, "conv2": 0.7, "fc1": 0.95, "fc2": 0.5}
    plan = _plan(**{n: dict(prune="unstructured", amount=a, importance=importance) for n, a in amounts.items()})
    c = compress(lenet, plan, data[0][:1], data[1])
    report = sparsity_report(c)
    for n, a in amounts.items():
        numel = lenet.get_submodule(n).weight.numel()
        assert report[n] == pytest.approx(round(a * numel) / numel, abs=1e-12)


def test_magnitude_mask_keeps_the_largest_weights(lenet, data):
    c = compress(lenet, _plan(fc1=dict(prune="unstructured", amount=0.9)), data[0][:1])
    w, kept = lenet.fc1.weight.abs(), c.fc1.weight != 0
    assert w[kept].min() >= w[~kept].max()


def test_mask_removes_exactly_the_lowest_scores_ties_in_index_order():
    """The selection (kthvalue) gives the same mask as a stable sort of the scores."""
    from autocompress.compression.prune import unstructured_mask

    score = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5, 1.0, 4.0, 1.0])
    assert unstructured_mask(score, 0.5).tolist() == [1, 0, 1, 0, 0, 0, 1, 1]  # 0.5, then the first 1.0s
    assert unstructured_mask(score, 0.0).sum() == 8 and unstructured_mask(score, 1.0).sum() == 0
    g = torch.Generator().manual_seed(0)
    for ties in (False, True):
        s = torch.randint(0, 7, (4, 37), generator=g).float() if ties else torch.rand(4, 37, generator=g)
        for amount in (0.1, 0.33, 0.9, 0.99):
            removed = int(round(amount * s.numel()))
            order = torch.argsort(s.flatten(), stable=True)[:removed]
            expected = torch.ones(s.numel())
            expected[order] = 0
            assert torch.equal(unstructured_mask(s, amount).flatten(), expected)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4)])
def test_nm_pattern_holds_in_every_group(lenet, data, n, m):
    plan = _plan(conv2=dict(prune="nm", n=n, m=m), fc1=dict(prune="nm", n=n, m=m, bits=4))
    c = compress(lenet, plan, data[0][:1])
    for name in ("conv2", "fc1"):
        groups = (c.get_submodule(name).weight != 0).reshape(-1, m).sum(1)
        assert (groups <= n).all()
    mask = c.conv2.parametrizations.weight[0].mask.reshape(-1, m).sum(1)
    assert (mask == n).all()
    assert sparsity_report(c)["conv2"] == pytest.approx(1 - n / m, abs=1e-3)


def test_block_mask_removes_whole_blocks(lenet, data):
    c = compress(lenet, _plan(fc1=dict(prune="block", amount=0.8, block_size=8)), data[0][:1])
    blocks = (c.fc1.weight != 0).reshape(500, -1, 8)
    whole = blocks.all(2) | ~blocks.any(2)
    assert whole.all()
    assert (~blocks.any(2)).float().mean().item() == pytest.approx(0.8, abs=1e-3)


def test_masks_and_quantisers_hold_during_training(lenet, data):
    plan = _plan(conv2=dict(prune="nm", bits=4), fc1=dict(prune="unstructured", amount=0.9, bits=3))
    c = compress(lenet, plan, data[0][:1], data[1])
    before = sparsity_report(c)
    masks = [m.parametrizations.weight[0].mask.clone() for _, m in compressed_layers(c)]
    opt = torch.optim.SGD(c.parameters(), lr=0.05)
    c.train()
    for x, y in data[1] * 2:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(c(x), y) + 1e-4 * sum(w.abs().sum() for w in kept_weights(c))
        loss.backward()
        opt.step()
    assert [m.parametrizations.weight[0].mask for _, m in compressed_layers(c)][0].equal(masks[0])
    after = sparsity_report(c)
    for k in before:
        assert after[k] >= before[k] - 1e-9  # pruned stay zero (quantisation may add zeros)
    assert all(len(row.unique()) <= 2 ** 3 for row in c.fc1.weight[:20])  # 3-bit codes per output row


def test_kept_weights_train_and_pruned_get_no_gradient(lenet, data):
    c = compress(lenet, _plan(fc1=dict(prune="unstructured", amount=0.5, bits=4)), data[0][:1])
    sum(w.abs().sum() for w in kept_weights(c)).backward()
    orig = c.fc1.parametrizations.weight.original
    mask = c.fc1.parametrizations.weight[0].mask
    assert (orig.grad[mask == 0] == 0).all() and (orig.grad[mask == 1] != 0).any()


def test_compress_does_not_touch_the_input(lenet, data):
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    compress(lenet, _plan(conv1=dict(prune="channel", amount=0.5), fc1=dict(prune="unstructured", amount=0.5, bits=4,
                                                                          rank_ratio=0.5)), data[0][:1], data[1])
    after = lenet.state_dict()
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    assert isinstance(lenet.fc1, nn.Linear) and lenet.conv1.out_channels == 20


def _zero_groups(model: nn.Module, x: torch.Tensor, replay) -> nn.Module:
    """The masked equivalent of channel pruning: zero each group's weights, biases and BN affine."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    outs = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels)
    with torch.no_grad():
        for name, idxs in replay:
            layer = model.get_submodule(name)
            fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
            for dep, group_idxs in dg.get_pruning_group(layer, fn, idxs):
                if dep.handler in outs:
                    mod = dep.target.module
                    mod.weight[list(group_idxs)] = 0
                    if mod.bias is not None:
                        mod.bias[list(group_idxs)] = 0
    return model


def test_channel_pruning_lenet_is_physical_and_equals_masking(lenet, data):
    plan = _plan(conv1=dict(prune="channel", amount=0.5), conv2=dict(prune="channel", amount=0.4),
                 fc1=dict(prune="channel", amount=0.75))
    c = compress(lenet, plan, data[0][:1]).eval()
    assert (c.conv1.out_channels, c.conv2.out_channels, c.fc1.out_features) == (10, 30, 125)
    assert c.conv2.in_channels == 10 and c.fc2.in_features == 125
    assert sum(p.numel() for p in c.parameters()) < sum(p.numel() for p in lenet.parameters()) / 3
    masked = _zero_groups(copy.deepcopy(lenet), data[0][:1], c.autocompress_record["channel_replay"])
    with torch.no_grad():
        assert torch.allclose(c(data[0]), masked(data[0]), atol=1e-5)
    assert sparsity_report(c)["fc1"] == pytest.approx(0.75)


def test_channel_pruning_residual_bn_equals_masking():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    net = warm_bn(TinyResNet(), x)
    # stem is coupled with layer1's output: layer1.conv2 is removed with the stem's group and skipped
    plan = _plan(stem=dict(prune="channel", amount=0.5), **{"layer1.conv2": dict(prune="channel", amount=0.25)},
                 **{"layer1.conv1": dict(prune="channel", amount=0.5, importance="taylor")},
                 **{"layer2.conv1": dict(prune="channel", amount=0.25)})
    y = torch.randint(0, 10, (16,))
    c = compress(net, plan, x[:1], [(x, y)])
    assert [n for n, _ in c.autocompress_record["channel_replay"]] == ["stem", "layer1.conv1", "layer2.conv1"]
    assert c.stem.out_channels == 4 and c.layer1.conv2.out_channels == 4 and c.bn.num_features == 4
    assert c.layer1.conv1.out_channels == 4 and c.layer2.conv1.out_channels == 12
    # no batches given -> BN statistics untouched, so it must equal the masked model exactly
    c = compress(net, plan.with_layer("layer1.conv1", importance="magnitude"), x[:1]).eval()
    masked = _zero_groups(copy.deepcopy(net), x[:1], c.autocompress_record["channel_replay"])
    with torch.no_grad():
        assert torch.allclose(c(x), masked(x), atol=1e-5)


def test_sizing_without_calibration_gives_the_same_bytes():
    """compress(calibrate=False), used by the repair and warm-start bisections, skips the BN and
    activation calibration passes but must size the artifact exactly as the calibrated model."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    net = warm_bn(TinyResNet(), x)
    batches = [(x, torch.randint(0, 10, (16,)))]
    plan = _plan(stem=dict(prune="channel", amount=0.5, bits=4, act_bits=8),
                 **{"layer2.conv1": dict(prune="unstructured", amount=0.8, importance="taylor", bits=3)},
                 **{"layer2.conv2": dict(prune="nm", n=2, m=4, bits=5, act_bits=8)}, fc=dict(rank_ratio=0.5, bits=6))
    calibrated = compress(net, plan, x[:1], batches)
    sized = compress(net, plan, x[:1], batches, calibrate=False)
    spec = ModelSpec("tinyresnet", 10, 1, 8)
    assert artifact_size(sized, spec) == artifact_size(calibrated, spec)
    assert not torch.equal(sized.bn.running_mean, calibrated.bn.running_mean)  # the pass really was skipped
    calibrate_model(sized, batches)  # calibrated later (what a search does with the plan it trains)
    assert all(torch.equal(a, b) for a, b in zip(sized.state_dict().values(), calibrated.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(sized.eval()(x), calibrated.eval()(x))


def test_lowrank_layers_have_the_planned_rank(lenet, data):
    plan = _plan(conv2=dict(rank_ratio=0.5, bits=6), fc1=dict(rank_ratio=0.25, prune="unstructured", amount=0.5))
    c = compress(lenet, plan, data[0][:1])
    assert c.fc1[0].out_features == math.ceil(0.25 * 500) and c.fc1[1].in_features == 125
    assert c.conv2[0].out_channels == 25 and c.conv2[1].kernel_size == (1, 1)
    assert c.autocompress_record["ranks"] == {"conv2": 25, "fc1": 125}
    assert {"fc1.0", "fc1.1", "conv2.0", "conv2.1"} <= set(sparsity_report(c))
    full = compress(lenet, _plan(fc1=dict(rank_ratio=1.0)), data[0][:1])
    assert isinstance(full.fc1, nn.Linear)
    # an exact-rank factorisation reproduces the layer
    exact = compress(lenet, _plan(fc2=dict(rank_ratio=1.0 - 1e-9)), data[0][:1])
    with torch.no_grad():
        assert torch.allclose(exact(data[0]), lenet(data[0]), atol=1e-4)


def test_activation_quantisation_limits_levels(lenet, data):
    c = compress(lenet, _plan(fc1=dict(act_bits=4), conv2=dict(act_bits=8)), data[0][:1], data[1]).eval()
    seen = {}
    h1 = c.fc1.register_forward_hook(lambda m, a, o: seen.update(fc1=a[0]))
    h2 = c.conv2.register_forward_hook(lambda m, a, o: seen.update(conv2=a[0]))
    with torch.no_grad():
        c(data[0])
    h1.remove(), h2.remove()
    # a forward hook sees the input after the pre-hook quantised it
    assert len(seen["fc1"].unique()) <= 16 and len(seen["conv2"].unique()) <= 256
    assert len(seen["fc1"].unique()) > 4


def test_float16_storage_rounds_biases(lenet, data):
    plan = CompressionPlan(layers={"fc1": LayerPlan(bits=4)}, float_bits=16)
    c = compress(lenet, plan, data[0][:1])
    assert c.fc1.bias.equal(c.fc1.bias.half().float()) and c.conv1.weight.equal(c.conv1.weight.half().float())


@pytest.mark.parametrize("plan,layer", [
    (_plan(fc3=dict(bits=4)), "fc3"),
    (_plan(conv2=dict(bits=9)), "conv2"),
    (_plan(conv1=dict(prune="nm", n=3, m=8)), "conv1"),          # 1*5*5 = 25 inputs
    (_plan(conv2=dict(rank_ratio=0.0)), "conv2"),
    (_plan(fc2=dict(prune="channel", amount=0.5)), "fc2"),        # output layer
    (_plan(fc1=dict(prune="unstructured", amount=0.5, importance="taylor")), "fc1"),  # no batches
    (_plan(conv2=dict(act_bits=8)), "conv2"),                    # no batches to calibrate
])
def test_bad_plans_name_the_layer(lenet, data, plan, layer):
    with pytest.raises(PlanError, match=rf"\b{layer}\b"):
        compress(lenet, plan, data[0][:1])


def test_grouped_conv_cannot_be_factorised():
    with pytest.raises(PlanError, match="conv2.*group"):
        compress(GroupedNet(), _plan(conv2=dict(rank_ratio=0.5)), torch.randn(1, 1, 8, 8))


def test_prunable_layers_after_compression_keep_names(lenet, data):
    c = compress(lenet, _plan(fc1=dict(bits=4)), data[0][:1])
    assert prunable_layers(c) == LENET


def test_nm_after_channel_pruning_keeps_n_per_group_and_a_short_tail(lenet, data):
    """conv1 loses 13 of 20 channels, so conv2's fan-in is 7*25 = 175, not a multiple of 4:
    every full group of 4 keeps 2, the tail group of 3 keeps 2; the low-rank factor (rank 50) too."""
    plan = _plan(conv1=dict(prune="channel", amount=0.65), conv2=dict(prune="nm", n=2, m=4, bits=4),
                 fc1=dict(rank_ratio=0.1, prune="nm", n=2, m=8, bits=4))
    c = compress(lenet, plan, data[0][:1])
    w = c.conv2.weight.detach().reshape(c.conv2.weight.shape[0], -1)
    assert w.shape[1] == 175
    nz = (w != 0).float()
    assert (nz[:, :172].reshape(w.shape[0], -1, 4).sum(2) <= 2).all()
    assert (nz[:, 172:].sum(1) <= 2).all()
    second = c.get_submodule("fc1.1").weight.detach()
    assert second.shape[1] == 50 and ((second != 0).float()[:, :48].reshape(second.shape[0], -1, 8).sum(2) <= 2).all()
    spec = ModelSpec("lenet5", 10, 1, 28)
    assert len(artifact_bytes(c, spec)) == artifact_size(c, spec)
