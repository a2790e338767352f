"""lathe.model.train: the distillation losses (kd_loss, soft_loss), the frozen teacher and the ensemble teacher."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from lathe.model.params import FitParams
from lathe.model.train import (
    ensemble_teacher,
    frozen_teacher,
    kd_loss,
    memoized_teacher,
    mixup_draw,
    sharpness_aware_gradient,
    soft_loss,
)

# kd_loss maths


def test_alpha_zero_is_exactly_the_weighted_smoothed_ce():
    s, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    w = torch.tensor([0.5, 1.0, 1.5, 1.0])
    loss = kd_loss(lambda x: torch.randn(5, 4), temperature=3.0, alpha=0.0, weights=w, smoothing=0.1)
    assert torch.equal(loss(s, y, torch.zeros(5, 1)), F.cross_entropy(s, y, weight=w, label_smoothing=0.1))


def test_soft_loss_is_t_squared_times_kl_and_matches_hintons_high_t_limit():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    p_t = F.softmax(t / 2, 1)
    hand = (p_t * (p_t.log() - F.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(soft_loss(s, t, 2.0), hand, atol=1e-6)
    # Hinton et al. 2015 eq. 3: for zero-mean logits and large T, T^2 * KL -> sum (s - t)^2 / (2K).
    s0, t0 = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    limit = ((s0 - t0) ** 2).sum(1).mean() / (2 * 4)
    assert torch.allclose(soft_loss(s0, t0, 100.0), limit, rtol=1e-2)
    assert soft_loss(t, t, 4.0).abs() < 1e-6


def test_mixture_weights_soft_and_hard_terms_by_alpha():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    w = torch.ones(4)
    got = kd_loss(lambda x: t, 4.0, 0.7, w, 0.0)(s, y, torch.zeros(5, 1))
    assert torch.allclose(got, 0.7 * soft_loss(s, t, 4.0) + 0.3 * F.cross_entropy(s, y), atol=1e-6)


def test_gradient_reaches_only_the_student_and_the_teacher_sees_the_same_batch_in_eval_mode():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3)).train()
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    seen = []
    teacher_fn = frozen_teacher(teacher)

    def spy(x):
        seen.append(x)
        return teacher_fn(x)

    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    loss = kd_loss(spy, 2.0, 0.5, torch.ones(3), 0.0)(student(x), y, x)
    loss.backward()
    assert seen[0] is x and not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert torch.equal(teacher_fn(x), teacher_fn(x))  # dropout off


def test_ensemble_teacher_averages_the_members_log_probabilities_in_eval_mode():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 3)).train() for _ in range(3)]
    x = torch.rand(5, 1, 2, 2)
    got = ensemble_teacher(members)(x)
    assert not any(m.training for m in members)  # dropout off, like a single frozen teacher
    with torch.no_grad():
        hand = sum(F.log_softmax(m(x), 1) for m in members) / 3
    assert torch.allclose(got, hand, atol=1e-6) and not got.requires_grad
    # one member: its log-probabilities are its logits shifted per row, so at any temperature the
    # soft loss is exactly that of the member as a plain teacher
    s = torch.randn(5, 3)
    one, plain = ensemble_teacher(members[:1])(x), frozen_teacher(members[0])(x)
    assert torch.allclose(soft_loss(s, one, 3.0), soft_loss(s, plain, 3.0), atol=1e-6)


def test_memoized_teacher_pays_the_forward_pass_once_and_recomputes_unseen_rows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    calls = []

    def teacher(x):
        calls.append(len(x))
        return frozen_teacher(net)(x)

    inputs = torch.rand(10, 1, 2, 2)
    memo = memoized_teacher(teacher, inputs, batch_size=4)
    assert calls == [4, 4, 2]  # the whole set once, in batches
    batch = inputs[[7, 2, 2, 9]]
    # the up-front logits of those rows (batch size may change the last bits, so not torch.equal)
    assert torch.allclose(memo(batch), torch.cat([frozen_teacher(net)(inputs[i : i + 1]) for i in (7, 2, 2, 9)]), atol=1e-6)
    assert calls == [4, 4, 2]  # a batch of seen rows costs no forward pass
    flipped = batch.flip(3)  # an augmented batch: computed afresh
    assert torch.equal(memo(flipped), frozen_teacher(net)(flipped)) and calls[-1] == 4


def test_selection_on_accuracy_ignores_the_recall_terms():
    from lathe.model.train import selection_score

    accurate = {"accuracy": 0.75, "balanced_accuracy": 0.50, "defective_recall": 0.60}
    recalling = {"accuracy": 0.72, "balanced_accuracy": 0.60, "defective_recall": 0.80}
    assert selection_score(recalling) > selection_score(accurate)  # the default score favours recall
    assert selection_score(accurate, "accuracy") > selection_score(recalling, "accuracy")


def test_sam_takes_the_gradient_at_the_perturbed_weights_and_puts_the_weights_back():
    """L = (w . x)^2 / 2 with x = (1, 0): dL/dw1 = w1, so the gradient at w + rho * g / |g| is w1 + rho."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -2.0]]))
    x, y = torch.tensor([[1.0, 0.0]]), torch.zeros(1)

    def loss_fn(out: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out ** 2).sum()

    loss_fn(model(x), y, x).backward()
    assert model.weight.grad.tolist() == [[0.5, 0.0]]
    sharpness_aware_gradient(model, loss_fn, x, y, rho=0.1)
    assert model.weight.tolist() == [[0.5, -2.0]]  # restored exactly (the step is added and subtracted)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.6, 0.0]]))


def test_sam_second_pass_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(8, 1, 6, 6), torch.tensor([0, 1] * 4)
    model.train()

    def loss_fn(out: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target)

    loss_fn(model(x), y, x).backward()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    sharpness_aware_gradient(model, loss_fn, x, y, rho=0.05)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert bn.momentum == 0.1  # restored
    assert all(p.grad is not None for p in model.parameters())


def test_sam_off_leaves_the_training_records_as_they_were():
    assert "sam_rho" not in FitParams().model_dump()  # prune.json / lowrank.json of existing models unchanged
    assert FitParams(sam_rho=0.05).model_dump()["sam_rho"] == 0.05


# mixup


def test_mixup_draw_is_a_function_of_the_generator_and_lies_between_zero_and_one():
    draws = [mixup_draw(16, 0.2, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0][0] == draws[1][0] and torch.equal(draws[0][1], draws[1][1])
    assert sorted(draws[0][1].tolist()) == list(range(16))  # a permutation of the batch
    lams = [mixup_draw(4, 0.2, g)[0] for g in [torch.Generator().manual_seed(0)] for _ in range(200)]
    assert all(0.0 <= lam <= 1.0 for lam in lams)
    # Beta(0.2, 0.2) puts most of its mass near the ends: most batches stay close to one of the two cells
    assert sum(lam < 0.1 or lam > 0.9 for lam in lams) > 100


def test_kd_loss_asks_the_teacher_once_for_the_two_label_terms_of_a_mixed_batch():
    calls = []
    t = torch.randn(5, 4)

    def teacher(x):
        calls.append(x)
        return t

    s, x = torch.randn(5, 4), torch.rand(5, 1, 2, 2)
    y_a, y_b = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([3, 2, 1, 0, 0])
    loss = kd_loss(teacher, 2.0, 0.5, torch.ones(4), 0.0)
    mixed = 0.3 * loss(s, y_a, x) + 0.7 * loss(s, y_b, x)
    assert len(calls) == 1
    hand = 0.5 * soft_loss(s, t, 2.0) + 0.5 * (0.3 * F.cross_entropy(s, y_a) + 0.7 * F.cross_entropy(s, y_b))
    assert torch.allclose(mixed, hand, atol=1e-6)
    loss(s, y_a, x.clone())  # another batch: asked again
    assert len(calls) == 2


def test_kd_loss_with_alpha_one_ignores_the_labels():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    loss = kd_loss(lambda x: t, 2.0, 1.0, torch.ones(4), 0.1)
    x = torch.rand(5, 1, 2, 2)
    assert torch.equal(loss(s, torch.zeros(5, dtype=torch.long), x), loss(s, torch.full((5,), 3), x))
    assert torch.equal(loss(s, torch.zeros(5, dtype=torch.long), x), soft_loss(s, t, 2.0))


def test_mixup_off_leaves_the_training_records_as_they_were_and_refuses_sam_beside_it():
    assert "mixup" not in FitParams().model_dump()
    assert FitParams(mixup=0.2).model_dump()["mixup"] == 0.2
    with pytest.raises(ValidationError, match="mixup .* sam_rho"):
        FitParams(mixup=0.2, sam_rho=0.05)
