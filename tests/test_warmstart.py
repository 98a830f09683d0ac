"""Sensitivity and the warm-start plans (uniform, channel, knapsack) mapped onto the space."""
from __future__ import annotations


import optuna
import pytest
import torch

from autocompress.compression import compress
from autocompress.cost import artifact_size
from autocompress.data import TensorData, load_data
from autocompress.models import MLP, LeNet5, ModelSpec, build_model, prunable_layers
from autocompress.orchestrate import interleave
from autocompress.sensitivity import analyse
from autocompress.space import load_space
from autocompress.train import evaluate, train_model
from autocompress.warmstart import (MOST_CHANNELS, knapsack_fit, knapsack_plan, least_that_fits, small_layers,
                                    to_params, uniform_plan, warm_start_plans)

@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


def test_sensitivity_ranks_a_deliberately_fragile_layer_first(digits):
    """fc1 of an MLP is made fragile without changing the function: input feature j is scaled by
    s_j in (1 .. 1000) and fc1's column j by 1/s_j. Its rows now span three orders of magnitude of
    equally important weights, so pruning or quantising it hurts most."""
    torch.manual_seed(0)
    model = MLP(num_classes=10, in_channels=1, image_size=8)
    train_model(model, digits.train, epochs=6, lr=0.05, progress=False)
    scale = 10 ** (torch.arange(64) % 4).float()
    with torch.no_grad():
        model.fc1.weight /= scale
    val = TensorData(digits.val.x * scale.view(1, 1, 8, 8), digits.val.y)
    assert evaluate(model, val) > 0.8
    sens = analyse(model.eval(), val, val.x[:2], amounts=(0.5, 0.8), bits=(3, 4), hessian_samples=2)
    assert set(sens.layers) == {"fc1", "fc2", "fc3"}
    assert sens.ranking()[0] == "fc1"
    assert sens.prune_drop["fc1"]["0.8"] > sens.prune_drop["fc2"]["0.8"]
    assert all(v > 0 for v in sens.hessian_trace.values()) or len(sens.hessian_trace) == 3


def test_knapsack_and_uniform_plans_fit_the_budget(digits):
    torch.manual_seed(0)
    model = LeNet5(image_size=8).eval()
    train_model(model, digits.train, epochs=2, lr=0.05, progress=False)
    model.eval()
    spec = ModelSpec("lenet5", 10, 1, 8)
    example = digits.train.x[:2]
    size_of = lambda p: artifact_size(compress(model, p, example), spec)  # noqa: E731
    layers = load_space(None).bind(model).layers
    sens = analyse(model, digits.val, example, amounts=(0.5, 0.9), bits=(2, 4), hessian_samples=1)
    limit = 524_320 // 30
    plans = dict(warm_start_plans(model, layers, size_of, limit, sens))
    assert "knapsack" in plans and any(k.startswith("uniform-4bit") for k in plans)
    channels = next(p for k, p in plans.items() if k.startswith("channels-4bit"))
    kept = compress(model, channels, example)
    assert kept.conv2.weight.shape[0] < model.conv2.weight.shape[0]  # channels really removed
    assert kept.fc2.weight.shape[0] == model.fc2.weight.shape[0]      # the output layer keeps its classes
    for name, plan in plans.items():
        assert size_of(plan) <= limit, name
        params = to_params(plan, layers)
        rebuilt = load_space(None).bind(model).suggest(optuna.trial.FixedTrial(
            {**params, "recovery.distill": 0.0, **{k: "2:4" for k in _nm_params(layers)}}))
        assert size_of(rebuilt) <= limit, name  # on the space's grid, amounts only rounded up
    assert knapsack_plan(model, sens, 10, [0.5], [8]) is None  # nothing fits 10 bytes


def test_a_short_search_tries_the_size_weighted_channel_plans_first_and_the_knapsack_last(digits):
    """The warm start's order decides what a short --time-budget tries: two channel plans (the
    size-weighted ones first) for each uniform plan, the knapsack plan (never an equal-time pick)
    last. On mnasnet0_5 at 20x the channel plan that tested best after 300 s had been seventh."""
    model = LeNet5(image_size=8).eval()
    spec, example = ModelSpec("lenet5", 10, 1, 8), digits.train.x[:2]
    size_of = lambda p: artifact_size(compress(model, p, example, calibrate=False), spec)  # noqa: E731
    layers = load_space(None).bind(model).layers
    sens = analyse(model, digits.val, example, amounts=(0.5, 0.9), bits=(2, 4), hessian_samples=1)
    names = [n for n, _ in interleave(warm_start_plans(model, layers, size_of, 524_320 // 30, sens))]
    kinds = [n.rsplit("-", 2)[0] for n in names]
    assert kinds[0].startswith("channels-by-size-p") and kinds[0] == kinds[1], names  # the same power, ...
    assert "-4bit-" in names[0] and "-3bit-" in names[1] and kinds[2] == "uniform", names  # ... at 4 then 3 bits
    assert kinds[3:6].count("uniform") == 1 and names[-1] == "knapsack", names


def test_channel_plans_shrink_big_layers_most_and_keep_more_bits_in_the_small_ones():
    """At 200x of LeNet-5 the size-weighted channel plan keeps half of conv2 and 3% of fc1 (90% test
    after 100 s of fine-tuning, where the same fraction everywhere plateaus at 88.5%); the first
    convolution and the classifier, 1.3% of the weights, keep 6 bits."""
    model = build_model(ModelSpec("lenet5", 10, 1, 28)).eval()
    example = torch.zeros(2, 1, 28, 28)
    layers = load_space(None).bind(model, example).layers
    assert small_layers(model, list(layers)) == {"conv1", "fc2"}
    size_of = lambda p: artifact_size(compress(model, p, example, calibrate=False),  # noqa: E731
                                      ModelSpec("lenet5", 10, 1, 28))
    limit = 1_724_320 // 200
    plans = dict(warm_start_plans(model, layers, size_of, limit, None, uniform_bits=()))
    by_size = next(p for k, p in plans.items() if k.startswith("channels-by-size-p0.25-3bit"))
    same = next(p for k, p in plans.items() if k.startswith("channels-3bit"))
    assert {n: lp.bits for n, lp in by_size.layers.items()} == {"conv1": 6, "conv2": 3, "fc1": 3, "fc2": 6}
    amounts = {n: lp.amount for n, lp in by_size.layers.items()}
    assert amounts["conv1"] < amounts["conv2"] < 0.6 < 0.9 < amounts["fc1"] and amounts["fc2"] == 0.0
    assert same.layers["conv2"].amount == same.layers["fc1"].amount > 0.8  # the same fraction everywhere
    for name, plan in plans.items():
        assert 0.9 * limit <= size_of(plan) <= limit, name


def test_the_higher_the_ratio_the_milder_the_size_weighted_powers_and_no_layer_loses_almost_all_channels():
    """The two largest CHANNEL_POWERS that fit become plans: at 300x of LeNet-5 (3 bits) p = 0.25
    cannot fit, and p = 0.125 (fc1 keeps 4% of its channels) tested 90.2% after 100 s where the
    same fraction everywhere tested 86.5%. No plan removes more than MOST_CHANNELS of a layer's
    channels: at 200x and 4 bits, p = 0.25 fits only by keeping 6 of fc1's 500 (89.9%, against
    90.5% for p = 0.125)."""
    model = build_model(ModelSpec("lenet5", 10, 1, 28)).eval()
    example = torch.zeros(2, 1, 28, 28)
    layers = load_space(None).bind(model, example).layers
    spec = ModelSpec("lenet5", 10, 1, 28)
    size_of = lambda p: artifact_size(compress(model, p, example, calibrate=False), spec)  # noqa: E731
    powers = {}
    for ratio in (200, 300):
        plans = dict(warm_start_plans(model, layers, size_of, 1_724_320 // ratio, None, uniform_bits=()))
        powers[ratio] = {b: [k.split("-")[3] for k in plans if k.startswith("channels-by-size") and f"-{b}bit" in k]
                         for b in (3, 4)}
        assert all(lp.amount <= MOST_CHANNELS for p in plans.values() for lp in p.layers.values()), plans
        assert any(k.startswith("channels-3bit") for k in plans)  # the same fraction everywhere, too
    assert powers[200] == {3: ["p0.25", "p0.125"], 4: ["p0.125", "p0.0625"]}, powers
    assert powers[300] == {3: ["p0.125", "p0.0625"], 4: ["p0.0625"]}, powers


def test_fitting_a_uniform_plan_takes_fewer_sizings_than_bisection_and_finds_the_least_sparsity(digits):
    """On seeded weights (5-8 sizings for seeds 0-7): with whatever weights the tests before it left
    in torch's generator, one run took 13, more than bisection's 12."""
    torch.manual_seed(0)
    model = LeNet5(image_size=8).eval()
    spec, example = ModelSpec("lenet5", 10, 1, 8), digits.train.x[:2]
    calls: list[float] = []

    def bytes_at(sparsity: float) -> int:
        calls.append(sparsity)
        return artifact_size(compress(model, uniform_plan(model, sparsity, 4), example, calibrate=False), spec)

    for ratio in (12, 30, 80):
        limit = 524_320 // ratio
        calls.clear()
        x = least_that_fits(bytes_at, limit, 0.998, 0.001)
        assert x is not None and bytes_at(x) <= limit < bytes_at(x - 0.001), ratio
        assert len(calls) - 2 <= 11, ratio  # bisection takes 12 (ends included) at this tolerance
    assert least_that_fits(bytes_at, 10, 0.998, 0.001) is None  # nothing fits 10 bytes


def test_the_knapsack_target_is_corrected_up_as_well_as_down_by_the_real_bytes(digits):
    torch.manual_seed(0)
    model = LeNet5(image_size=8).eval()
    spec, example = ModelSpec("lenet5", 10, 1, 8), digits.train.x[:2]
    size_of = lambda p: artifact_size(compress(model, p, example, calibrate=False), spec)  # noqa: E731
    sens = analyse(model, digits.val, example, amounts=(0.5, 0.9), bits=(2, 4), hessian_samples=1)
    plan_for = lambda t: knapsack_plan(model, sens, t, [0.0, 0.5, 0.9], [2, 4])  # noqa: E731
    limit = 524_320 // 10
    low = size_of(plan_for(limit * 0.3))  # a byte model far too pessimistic
    fitted = size_of(knapsack_fit(plan_for, size_of, limit, limit * 0.3))
    assert low < 0.5 * limit and 0.8 * limit <= fitted <= limit
    limit = 524_320 // 20
    assert size_of(plan_for(limit * 3.0)) > limit  # far too optimistic
    high = knapsack_fit(plan_for, size_of, limit, limit * 3.0)
    assert high is not None and size_of(high) <= limit


def _nm_params(layers):
    return [f"{n}.nm" for n, c in layers.items() if "nm" in c and not c["nm"].fixed]


def test_thinned_amount_grid_keeps_the_high_amounts_where_bytes_change_fastest():
    from autocompress.warmstart import _grid

    model = build_model(ModelSpec("lenet5", 10, 1, 28))
    grid = _grid(load_space(None).bind(model).layers["fc1"]["amount"])
    assert len(grid) <= 41 and grid[0] == 0.0 and grid[-1] == pytest.approx(0.9975)
    assert {0.985, 0.99, 0.995} <= set(grid)  # each halves or so the weights kept at 100x



def test_hessian_trace_of_mobilenet_v3():
    """MobileNetV3's Hardsigmoid has no double backward in torch (the search died in its
    sensitivity stage): the trace computes it, and Hardswish, with double-differentiable ops."""
    from autocompress.models import prunable_layers
    from autocompress.sensitivity import hutchinson_trace, twice_differentiable

    torch.manual_seed(0)
    data = TensorData(torch.randn(2, 1, 16, 16), torch.randint(0, 10, (2,)))
    model = build_model(ModelSpec("torchvision:mobilenet_v3_small", 10, 1, 16)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(data.x)
        with twice_differentiable(model):
            assert torch.allclose(model(data.x), want, atol=1e-5)
    layers = prunable_layers(model)
    trace = hutchinson_trace(model, layers, data, samples=1)
    assert list(trace) == layers and len(layers) > 50
    assert all(torch.isfinite(torch.tensor(v)) for v in trace.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(data.x), want)  # its own modules are back


def test_hessian_trace_of_googlenet_with_its_unused_auxiliary_classifiers():
    """In eval mode GoogLeNet's auxiliary classifiers are not run: their weights get no gradient
    (the trace died with "appears to not have been used in the graph"). Their trace is 0; the
    main layers' are measured."""
    from autocompress.models import prunable_layers
    from autocompress.sensitivity import hutchinson_trace

    torch.manual_seed(0)
    data = TensorData(torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    model = build_model(ModelSpec("torchvision:googlenet", 10, 1, 32)).eval()
    trace = hutchinson_trace(model, prunable_layers(model), data, samples=1)
    aux = [n for n in trace if n.startswith("aux")]
    assert aux and all(trace[n] == 0.0 for n in aux)
    assert any(v != 0.0 for n, v in trace.items() if not n.startswith("aux"))


def test_hessian_trace_of_a_vision_transformer():
    """ViT's attention (scaled_dot_product_attention) has a fused CPU kernel whose backward cannot
    be differentiated again; the trace runs it on the math kernel, and every layer gets one."""
    from torchvision.models import VisionTransformer

    from autocompress.models import prunable_layers
    from autocompress.sensitivity import hutchinson_trace

    torch.manual_seed(0)
    data = TensorData(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    small = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()  # torchvision's ViT-B/32 class, one small block
    trace = hutchinson_trace(small, prunable_layers(small), data, samples=1)
    assert any("self_attention" in n for n in trace) and all(v == v for v in trace.values())
    assert sum(v != 0.0 for v in trace.values()) >= len(trace) - 1


def test_sensitivity_of_a_deep_model_uses_the_coarse_default_grid():
    """layers x settings past MAX_EVALUATIONS: the default grid is the coarse one (DenseNet-121's
    sensitivity took 6 minutes of one CPU thread with the full grid); named settings are kept."""
    from torch import nn

    from autocompress.sensitivity import COARSE_AMOUNTS, COARSE_BITS, MAX_EVALUATIONS

    torch.manual_seed(0)
    deep = nn.Sequential(nn.Flatten(), *[m for _ in range(60) for m in (nn.Linear(16, 16), nn.ReLU())],
                         nn.Linear(16, 10)).eval()
    data = TensorData(torch.randn(16, 1, 4, 4), torch.randint(0, 10, (16,)))
    assert 61 * 9 > MAX_EVALUATIONS
    sens = analyse(deep, data, data.x[:2], samples=16, hessian_samples=1)
    assert all(list(sens.prune_drop[n]) == [str(a) for a in COARSE_AMOUNTS] for n in sens.layers)
    assert all(list(sens.bits_drop[n]) == [str(b) for b in COARSE_BITS] for n in sens.layers)
    assert 0.0 <= sens.drop(sens.layers[0], 0.8, 3) <= 1.0  # the settings between are interpolated
    named = analyse(deep, data, data.x[:2], amounts=(0.8,), bits=(3,), samples=16, hessian_samples=1)
    assert list(named.prune_drop["1"]) == ["0.8"] and list(named.bits_drop["1"]) == ["3"]
    mlp = MLP(num_classes=10, in_channels=1, image_size=4).eval()
    small = analyse(mlp, data, data.x[:2], samples=16, hessian_samples=1)
    assert len(small.prune_drop["fc1"]) == 5 and len(small.bits_drop["fc1"]) == 4


def test_sensitivity_grid_is_sized_to_its_time(tmp_path):
    """timed_grid steps full -> coarse -> minimal grid, then fewer samples (never under
    MIN_SAMPLES); analyse() with a tiny time measures the minimal grid on MIN_SAMPLES images,
    says so in describe(), and the cache keys that run by its time."""
    from autocompress.sensitivity import (AMOUNTS, BITS, CALIBRATION, COARSE_AMOUNTS, COARSE_BITS, MIN_SAMPLES,
                                          MINIMAL_AMOUNTS, MINIMAL_BITS, cached_analyse, hessian_batch,
                                          timed_grid)

    assert timed_grid(50, 1e-4, 128, 60.0) == (AMOUNTS, BITS, 128)              # 50 x 9 x 128 x 0.1 ms = 5.8 s
    assert timed_grid(50, 1.2e-3, 128, 60.0) == (COARSE_AMOUNTS, COARSE_BITS, 128)  # 69 s at 9 settings
    assert timed_grid(50, 2e-3, 128, 60.0) == (MINIMAL_AMOUNTS, MINIMAL_BITS, 128)
    assert timed_grid(50, 1e-2, 128, 60.0) == (MINIMAL_AMOUNTS, MINIMAL_BITS, 40)  # 60 / (50 x 3 x 0.01)
    assert timed_grid(50, 1.0, 128, 60.0)[2] == MIN_SAMPLES
    assert timed_grid(50, 1.0, 8, 60.0)[2] == 8                                   # a smaller split stays whole
    assert timed_grid(100, 1e-6, 128, 60.0)[:2] == (COARSE_AMOUNTS, COARSE_BITS)  # past MAX_EVALUATIONS
    assert (hessian_batch(1e-5, 120.0), hessian_batch(0.06, 120.0), hessian_batch(0.4, 120.0)) == (64, 6, 2)
    torch.manual_seed(0)
    mlp = MLP(num_classes=10, in_channels=1, image_size=4).eval()
    data = TensorData(torch.randn(64, 1, 4, 4), torch.randint(0, 10, (64,)))
    sens = analyse(mlp, data, data.x[:2], seconds=1e-9, hessian_samples=1)
    assert list(sens.prune_drop["fc1"]) == ["0.9"] and list(sens.bits_drop["fc1"]) == ["2", "4"]
    jobs = 3 * len(sens.layers)  # too slow even for that: all but CALIBRATION settings from the curvature
    assert sens.samples == MIN_SAMPLES and sens.estimated == jobs - CALIBRATION > 0
    assert sens.describe() == (f"3 settings x {len(sens.layers)} layers on 16 images, "
                               f"{jobs - CALIBRATION} of them estimated from the curvature")
    full = analyse(mlp, data, data.x[:2], seconds=None, hessian_samples=1)
    assert len(full.prune_drop["fc1"]) == 5 and full.samples == 64
    cache = str(tmp_path)
    a, path_a, _ = cached_analyse(mlp, data, data.x[:2], cache, seconds=1e-9, hessian_samples=1)
    b, path_b, hit = cached_analyse(mlp, data, data.x[:2], cache, seconds=1e-9, hessian_samples=1)
    _, path_c, _ = cached_analyse(mlp, data, data.x[:2], cache, seconds=600.0, hessian_samples=1)
    assert hit and path_a == path_b != path_c and b.samples == MIN_SAMPLES


def test_curvature_drops_measure_the_largest_estimates_and_scale_the_rest(lenet):
    """HAWQ's estimate, half the mean Hessian diagonal times the squared weight change, ranks the
    settings; the CALIBRATION largest are measured and the rest scaled by the least-squares factor:
    with drops exactly 3x the estimate, every unmeasured one comes out at 3x too."""
    from autocompress.models import layer_weight
    from autocompress.sensitivity import CALIBRATION, compressed_weight, curvature_drops

    layers = prunable_layers(lenet)
    jobs = [(n, "prune", a) for n in layers for a in (0.5, 0.9)] + [(n, "bits", b) for n in layers for b in (2, 4)]
    trace = {n: 0.1 * (i + 1) for i, n in enumerate(layers)}
    truth = {j: 1.5 * trace[j[0]] * float((layer_weight(lenet.get_submodule(j[0])).detach()
                                            - compressed_weight(layer_weight(lenet.get_submodule(j[0])), j[1], j[2])
                                            ).pow(2).sum()) for j in jobs}
    asked = []
    drops = curvature_drops(lenet, jobs, trace, lambda *j: asked.append(j) or truth[j])
    assert len(asked) == CALIBRATION < len(jobs)
    assert min(truth[j] for j in asked) >= max(truth[j] for j in jobs if j not in asked)  # the largest measured
    assert all(abs(drops[j] - truth[j]) <= 1e-6 * truth[j] for j in jobs)


def test_global_amounts_threshold_is_the_kth_smallest_magnitude():
    """global_amounts selects the threshold in place on one copy (AlexNet's search ran out of
    memory in torch.kthvalue); the amounts are those of the k-th smallest magnitude, ties and all."""
    from autocompress.models import layer_weight
    from autocompress.warmstart import global_amounts

    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        model.fc2.weight[:2] = 0.0  # ties at the bottom
    names = ["conv1", "conv2", "fc1", "fc2"]
    allw = torch.cat([layer_weight(model.get_submodule(n)).detach().abs().flatten() for n in names])
    for sparsity in (1e-9, 0.001, 0.3, 0.5, 0.9, 0.998):
        thr = allw.kthvalue(max(int(sparsity * allw.numel()), 1)).values
        want = {n: min(float((layer_weight(model.get_submodule(n)).detach().abs() <= thr).float().mean()), 0.999)
                for n in names}
        assert global_amounts(model, sparsity, names) == want


def test_fast_plans_under_a_latency_budget_are_8_bit_channel_plans_that_just_fit():
    """Int8 kernels run a 3-bit layer no faster than an 8-bit one: the fast plans keep 8 bits and
    remove channels, the least fraction whose cost fits; where the dense 8-bit plan already fits,
    it is the one plan (the three families all give it)."""
    from autocompress.warmstart import fast_plans

    model = build_model(ModelSpec("lenet5", 10, 1, 28)).eval()
    example = torch.zeros(2, 1, 28, 28)
    layers = load_space(None).bind(model, example).layers
    size_of = lambda p: artifact_size(compress(model, p, example, calibrate=False),  # noqa: E731
                                      ModelSpec("lenet5", 10, 1, 28))
    dense = size_of(uniform_plan(model, 0.0, 8))
    plans = dict(fast_plans(model, layers, size_of, dense // 3))
    assert len(plans) >= 2 and all(k.startswith("fast-channels") for k in plans)
    for name, plan in plans.items():
        assert {lp.bits for lp in plan.layers.values()} == {8}
        assert plan.layers["fc1"].prune == "channel" and 0.2 < plan.layers["fc1"].amount < 0.9
        assert 0.85 * dense // 3 <= size_of(plan) <= dense // 3, name
    (only,) = fast_plans(model, layers, size_of, dense)
    assert all(lp.prune == "none" and lp.bits == 8 for lp in only[1].layers.values())


def test_warm_start_plans_are_sized_at_the_float_width_their_trials_store(digits):
    """The default space stores biases and BatchNorm at 16 bits; a plan made by the warm start has
    CompressionPlan's 32. Sized as it was, a BatchNorm-heavy model's plans ran as trials much
    smaller than the budget they were fitted to (mnasnet0_5 at 40x: 95 KB fitted, 74 KB trained)."""
    from dataclasses import replace

    from conftest_models import TinyResNet, warm_bn

    from autocompress.objective import as_trial

    x = digits.train.x[:8]
    model = warm_bn(TinyResNet(), x)
    spec = ModelSpec("tests/conftest_models.py:TinyResNet", 10, 1, 8)
    bound = load_space(None).bind(model, x[:2])
    plan = uniform_plan(model, 0.5, 4, list(bound.layers))
    study = optuna.create_study()
    study.enqueue_trial(to_params(plan, bound.layers))
    trial_plan = bound.suggest(study.ask())  # what the trial of this warm-start plan runs
    assert plan.float_bits == 32 and trial_plan.float_bits == 16
    sized_as_trial = as_trial(bound, plan)
    assert sized_as_trial.float_bits == trial_plan.float_bits
    size = lambda p: artifact_size(compress(model, p, x[:2], calibrate=False), spec)  # noqa: E731
    assert size(sized_as_trial) == size(replace(plan, float_bits=16)) < size(plan)


@pytest.mark.slow
def test_a_searchs_uniform_warm_start_trials_fill_the_budget_on_a_batchnorm_model(tmp_path):
    from autocompress.api import search

    out = search("8x", model="tests/conftest_models.py:TinyResNet", data="digits", out=str(tmp_path), study="w",
                 trials=3, epochs=1, max_batches=2, baseline_epochs=1, final_top=0, progress=False,
                 stop_at_baseline=False)  # the 1-epoch baseline is matched at once: the uniform trials must run
    uniform = [t for t in out.study.trials if str(t.user_attrs.get("warm_start", "")).startswith("uniform")]
    assert uniform
    for t in uniform:  # fitted within 0.1% sparsity of the budget, as the trial stores it
        assert 0.95 * out.limit <= t.user_attrs["size_bytes"] <= out.limit, t.user_attrs["warm_start"]
