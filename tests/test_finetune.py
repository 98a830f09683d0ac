from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.data import load_data
from autocompress.errors import UserError
from autocompress.finetune import FinetuneConfig, NonFiniteLoss, finetune, finetune_loss
from autocompress.models import build_model
from autocompress.train import evaluate, train_model


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


@pytest.fixture(scope="module")
def teacher(digits):
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, 8)
    train_model(model, digits.train, epochs=3, lr=0.05, progress=False)
    return model.eval()


def student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", 10, 1, 8)


def test_report_once_per_epoch(digits):
    calls = []
    result = finetune(student(), digits.train, digits.val, FinetuneConfig(epochs=3, lr=0.05),
                      report=lambda acc, step: calls.append((acc, step)))
    assert [s for _, s in calls] == [1, 2, 3]
    assert [a for a, _ in calls] == result.val_acc
    assert len(result.train_loss) == 3 and result.val_acc[-1] > 0.6
    assert result.seconds > 0 and result.eval_seconds > 0


def test_zero_epochs_only_evaluates(digits):
    model = student()
    calls = []
    result = finetune(model, digits.train, digits.val, FinetuneConfig(epochs=0),
                      report=lambda acc, step: calls.append((acc, step)))
    assert calls == [(evaluate(model, digits.val), 0)] and result.train_loss == []


def test_report_may_stop_early(digits):
    class Stop(Exception):
        pass

    def report(acc: float, step: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        finetune(student(), digits.train, digits.val, FinetuneConfig(epochs=5), report=report)


def test_deterministic_with_seed(digits):
    cfg = FinetuneConfig(epochs=1, max_batches=5, seed=7)
    a, b = student(), student()
    finetune(a, digits.train, digits.val, cfg)
    finetune(b, digits.train, digits.val, cfg)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_max_batches_caps_steps(digits):
    model = student()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]) if m.training else None)
    finetune(model, digits.train, digits.val, FinetuneConfig(epochs=2, max_batches=3, batch_size=32))
    assert seen == [32] * 6


def _loss_and_grad(model, x, y, cfg, teacher_logits=None, l1=None):
    model.zero_grad()
    loss = finetune_loss(model(x), y, cfg, teacher_logits, l1)
    loss.backward()
    return loss.item(), model.fc1.weight.grad.clone()


def test_distillation_changes_loss_and_gradients(digits, teacher):
    x, y = next(digits.train.batches(64, shuffle=False))
    model = student()
    with torch.no_grad():
        t_logits = teacher(x)
    plain = _loss_and_grad(model, x, y, FinetuneConfig(), t_logits)
    distilled = _loss_and_grad(model, x, y, FinetuneConfig(distill=0.7), t_logits)
    assert plain[0] != pytest.approx(distilled[0])
    assert not torch.allclose(plain[1], distilled[1])
    # distill=1 with a teacher equal to the student: pure KL to itself is zero
    with torch.no_grad():
        own = model(x)
    assert _loss_and_grad(model, x, y, FinetuneConfig(distill=1.0), own)[0] == pytest.approx(0, abs=1e-5)


def test_l1_changes_loss_and_gradients(digits):
    x, y = next(digits.train.batches(64, shuffle=False))
    model = student()
    weights = lambda: [model.fc1.weight, model.fc2.weight]  # noqa: E731
    plain = _loss_and_grad(model, x, y, FinetuneConfig(), None, weights)
    with_l1 = _loss_and_grad(model, x, y, FinetuneConfig(l1=1e-3), None, weights)
    expected = 1e-3 * sum(w.detach().abs().sum().item() for w in weights())
    assert with_l1[0] - plain[0] == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(with_l1[1] - plain[1], 1e-3 * model.fc1.weight.sign(), atol=1e-6)


def test_finetune_with_teacher_and_l1_runs(digits, teacher):
    model = student()
    cfg = FinetuneConfig(epochs=3, lr=0.05, distill=0.5, l1=1e-5)
    result = finetune(model, digits.train, digits.val, cfg, teacher=teacher,
                      l1_weights=lambda: [model.fc1.weight])
    assert result.val_acc[-1] > 0.6


def test_huge_lr_raises_non_finite(digits):
    with pytest.raises(NonFiniteLoss, match="epoch 1"):
        finetune(student(), digits.train, digits.val, FinetuneConfig(epochs=2, lr=1e30))


def test_nan_model_raises_non_finite(digits):
    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * float("nan")

    with pytest.raises(NonFiniteLoss, match="step 1"):
        finetune(NaNModel(), digits.train, digits.val, FinetuneConfig())


def test_unknown_optimizer(digits):
    with pytest.raises(UserError, match="optimizer"):
        finetune(student(), digits.train, digits.val, FinetuneConfig(optimizer="lion"))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_other_optimizers(digits, name):
    result = finetune(student(), digits.train, digits.val, FinetuneConfig(epochs=1, lr=1e-3, optimizer=name))
    assert result.val_acc[-1] > 0.5


def test_time_budget_trains_for_that_long(digits):
    """`seconds` replaces epochs: the fine-tune uses its time (several epochs of digits, each
    evaluated) and stops at the deadline, give or take one evaluation."""
    import time

    model = student()
    steps = []
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # its first creation imports torch._dynamo (once)
    t0 = time.perf_counter()
    result = finetune(model, digits.train, digits.val, FinetuneConfig(epochs=0, lr=0.05, batch_size=32, seconds=1.5),
                      report=lambda acc, step: steps.append(step))
    wall = time.perf_counter() - t0
    assert result.steps > 0 and steps == list(range(1, len(steps) + 1)) and len(result.val_acc) == len(steps)
    # it stops short by at most what the plan leaves for the last evaluation and a step's rounding
    one_eval, one_step = result.eval_seconds / len(steps), result.seconds / result.steps
    assert 1.5 - one_eval - 2 * one_step - 0.05 < wall < 1.5 + 1.0
    assert result.seconds + result.eval_seconds == pytest.approx(wall, abs=0.2)


def test_planned_steps_leaves_time_for_evaluations():
    from autocompress.finetune import planned_steps

    # 10 steps done, 0.1 s a step, 100 s left, an evaluation costs 2 s, 50 steps per epoch
    total = planned_steps(10, 0.1, 100.0, 2.0, 50)
    more, evals = total - 10, -(-total // 50)
    assert more * 0.1 + evals * 2.0 <= 100.0 < (more + 50) * 0.1 + (evals + 1) * 2.0


def test_teacher_logits_are_computed_once_per_sample_and_shared(digits, teacher):
    """Distilling twice from the same teacher on the same data runs the teacher once per sample;
    the kept logits are the teacher's; a changed teacher gets new ones."""
    from autocompress.finetune import TeacherLogits

    TeacherLogits._current = None  # earlier tests distilled from this teacher on these data
    seen = []
    hook = teacher.register_forward_hook(lambda m, a, out: seen.append(len(a[0])))
    try:
        cfg = FinetuneConfig(epochs=2, lr=0.05, distill=0.5)
        finetune(student(), digits.train, digits.val, cfg, teacher=teacher)
        first = sum(seen)
        finetune(student(2), digits.train, digits.val, cfg, teacher=teacher)
        cache = TeacherLogits.of(teacher, digits.train)
        assert first == len(digits.train) and sum(seen) == first  # the second run reused every logit
        idx = torch.arange(10)
        with torch.no_grad():
            assert torch.allclose(cache.get(idx, digits.train.x[:10]), teacher(digits.train.x[:10]), atol=1e-5)
            teacher.fc3.bias.add_(0.0)  # an in-place update: the teacher may have changed
        assert TeacherLogits.of(teacher, digits.train) is not cache
    finally:
        hook.remove()


def test_batchnorm_statistics_are_those_of_the_eval_network_dropout_held_off(digits):
    """recalibrate_bn: the statistics a BatchNorm gathers are those it sees in eval mode (a Dropout
    before it at p=0.75 would otherwise quadruple its running variance)."""
    from autocompress.compression import recalibrate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.75), nn.BatchNorm1d(16))
    batches = [(digits.train.x[i:i + 100], digits.train.y[i:i + 100]) for i in (0, 100)]
    recalibrate_bn(model.train(), batches)
    features = model[1](torch.cat([x for x, _ in batches]).flatten(1)).detach()
    assert model.training  # its mode is given back
    assert torch.allclose(model[3].running_mean, features.mean(0), atol=1e-5)
    assert torch.allclose(model[3].running_var, features.var(0), rtol=0.05)


def test_a_finetune_evaluates_with_statistics_re_estimated_after_its_steps(digits):
    """At a high learning rate the running averages of a few steps lag behind the weights; with
    `recalibrate` every evaluation follows a re-estimate, and the model is left with it."""
    from autocompress.compression import recalibrate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    calib = [(digits.train.x[:128], digits.train.y[:128])]
    seen = []
    finetune(model, digits.train, digits.val, FinetuneConfig(epochs=2, lr=0.5, max_batches=3),
             recalibrate=lambda: seen.append(recalibrate_bn(model, calib)))
    assert len(seen) == 2  # before each epoch's evaluation
    features = model[1](calib[0][0].flatten(1)).detach()
    assert torch.allclose(model[2].running_mean, features.mean(0), atol=1e-5)
