"""The deployed model: real int8 kernels, physically fewer channels, same predictions as evaluated."""
from __future__ import annotations

import pytest
import torch
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic import quantized as nniq

from autocompress.compression import compress
from autocompress.data import load_data
from autocompress.deploy import TOLERANCE, deployable
from autocompress.artifact import export, load
from autocompress.finetune import FinetuneConfig, finetune
from autocompress.models import ModelSpec, build_model
from autocompress.plan import CompressionPlan, LayerPlan
from autocompress.train import evaluate, train_model

from conftest_models import TinyResNet, warm_bn

PLAN = CompressionPlan(layers={
    "conv1": LayerPlan(prune="channel", amount=0.5, bits=8),
    "conv2": LayerPlan(prune="channel", amount=0.3, bits=4),
    "fc1": LayerPlan(prune="unstructured", amount=0.6, bits=4, act_bits=8),
    "fc2": LayerPlan(bits=32),
})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    bundle = load_data("digits", seed=0)
    spec = ModelSpec("lenet5", bundle.num_classes, bundle.in_channels, bundle.image_size, data="digits")
    net = build_model(spec)
    train_model(net, bundle.train, epochs=4, lr=0.05, progress=False)
    calib = list(bundle.train.batches(128, shuffle=True, seed=0, limit=4))
    model = compress(net.eval(), PLAN, bundle.train.x[:2], calib)
    finetune(model, bundle.train, bundle.val, FinetuneConfig(epochs=1, max_batches=6), progress=False)
    path = tmp_path_factory.mktemp("deploy") / "m.acz"
    export(model, path, spec)
    return path, bundle, calib, model


@pytest.fixture(scope="module")
def deployed(artifact):
    """(TorchScript-frozen, eager) deployments of the artifact."""
    path, _, calib, _ = artifact
    fast = deployable(path, calib=calib)  # engine picked by timing: build the eager twin on the same one
    return fast, deployable(path, calib=calib, script=False, backend=fast.backend)


def test_deployed_model_predicts_like_the_evaluated_model(artifact, deployed):
    path, bundle, _, _ = artifact
    evaluated, deployed = load(path), deployed[0]
    with torch.no_grad():
        a, b = evaluated(bundle.test.x), deployed(bundle.test.x)
    agreement = float((a.argmax(1) == b.argmax(1)).float().mean())
    assert agreement >= TOLERANCE["agreement"]
    assert abs(evaluate(evaluated, bundle.test) - evaluate(deployed, bundle.test)) * 100 <= TOLERANCE["accuracy_points"]
    assert float((a - b).abs().max()) <= 0.1 * float(a.abs().max())  # int8 activation rounding only


def test_channel_pruned_layers_are_physically_smaller_and_run_int8(deployed):
    eager = deployed[1]
    assert isinstance(eager.conv1, nnq.Conv2d) and isinstance(eager.conv2, nnq.Conv2d)
    assert eager.conv1.weight().shape[0] == 10 < 20  # 50% of conv1's 20 channels removed
    assert eager.conv2.weight().shape[:2] == (35, 10)  # 30% of 50 removed; inputs follow conv1
    assert isinstance(eager.fc1, nnq.Linear) and not isinstance(eager.fc2, nnq.Linear)  # fc2 keeps fp32


def test_sub_8_bit_weights_are_the_artifacts_codes_widened_to_int8(artifact, deployed):
    path, _, calib, model = artifact
    eager = deployed[1]
    evaluated = load(path)
    q = eager.conv2.weight()
    assert int(q.int_repr().min()) >= -8 and int(q.int_repr().max()) <= 7  # 4-bit codes
    assert torch.equal(q.dequantize(), evaluated.conv2.weight.detach())  # no second rounding
    # the same model straight from memory deploys to the same weights
    assert torch.equal(deployable(model, calib=calib, script=False).conv2.weight().dequantize(), q.dequantize())


def test_frozen_and_eager_deployments_agree(artifact, deployed):
    x = artifact[1].test.x[:64]
    with torch.no_grad():
        assert torch.allclose(deployed[0](x), deployed[1](x), atol=1e-5)


def test_batchnorm_residual_net_deploys_with_folded_exact_codes():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    net = warm_bn(TinyResNet(), x)
    plan = CompressionPlan(layers={"stem": LayerPlan(bits=8), "layer1.conv1": LayerPlan(prune="channel", amount=0.5, bits=4),
                                   "layer2.conv1": LayerPlan(bits=6), "fc": LayerPlan(bits=8)})
    model = compress(net, plan, x[:2])
    evaluated = load_like(model)
    deployed = deployable(model, calib=[x[:32]], script=False)
    assert deployed.layer1.conv1.weight().shape[0] == 4
    with torch.no_grad():
        a, b = evaluated(x[32:]), deployed(x[32:])
    assert float((a - b).abs().max()) <= 0.1 * float(a.abs().max())


def load_like(model):
    from autocompress.deploy import _from_compressed, _strip_act_quant

    plain = _from_compressed(model)
    _strip_act_quant(plain)
    return plain.eval()


ENGINES = [e for e in ("x86", "fbgemm") if e in torch.backends.quantized.supported_engines]


def test_auto_engine_is_one_of_the_built_engines_and_leaves_the_global_setting(artifact):
    path, _, calib, _ = artifact
    before = torch.backends.quantized.engine
    assert deployable(path, calib=calib).backend in ENGINES
    assert torch.backends.quantized.engine == before


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_meets_the_tolerance_with_relu_fused_into_the_int8_kernels(artifact, engine):
    """Whichever engine "auto" picks, predictions stay within TOLERANCE; conv + ReLU and linear +
    ReLU run as one int8 op (torch.relu in the model is rewritten so the fusion patterns see it)."""
    path, bundle, calib, _ = artifact
    eager = deployable(path, calib=calib, script=False, backend=engine)
    assert eager.backend == engine
    assert isinstance(eager.conv1, nniq.ConvReLU2d) and isinstance(eager.fc1, nniq.LinearReLU)
    assert "torch.relu" not in eager.code and eager.code.count(".dequantize()") == 1  # once: before the fp32 fc2
    evaluated = load(path)
    with torch.no_grad():
        a, b = evaluated(bundle.test.x), eager(bundle.test.x)
    assert float((a.argmax(1) == b.argmax(1)).float().mean()) >= TOLERANCE["agreement"]


def test_batchnorm_folding_for_the_gpu_keeps_outputs_and_removes_every_batchnorm():
    from autocompress.deploy import fold_batchnorm

    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    net = warm_bn(TinyResNet(), x).eval()
    folded = fold_batchnorm(net, (1, 8, 8))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is left alone
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)


def test_batchnorm_folding_keeps_a_model_fx_cannot_trace():
    from autocompress.deploy import fold_batchnorm

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)  # data-dependent: not traceable

    net = Branchy().eval()
    assert fold_batchnorm(net, (1, 8, 8)) is net


def test_shufflenet_on_small_images_deploys(tmp_path):
    """ShuffleNet-v2 on 28 x 28 images ends on a 1 x 1 map and takes x.mean([2, 3]) of it; the
    quantized mean fails there without keepdim, so the deployed graph spells it with keepdim."""
    torch.manual_seed(0)
    spec = ModelSpec("torchvision:shufflenet_v2_x0_5", 10, 1, 28)
    x = torch.randn(16, 1, 28, 28)
    net = warm_bn(build_model(spec), x)
    model = compress(net, CompressionPlan(layers={"conv1.0": LayerPlan(bits=8), "fc": LayerPlan(bits=4)}), x[:2])
    export(model, tmp_path / "s.acz", spec)
    evaluated = load(tmp_path / "s.acz")
    deployed = deployable(tmp_path / "s.acz", calib=[x], script=False, backend=ENGINES[0])
    with torch.no_grad():
        a, b = evaluated(x), deployed(x)
    assert b.shape == (16, 10) and float((a - b).abs().max()) <= 0.1 * float(a.abs().max())
    assert "keepdim = True" in deployed.code and "squeeze" in deployed.code
