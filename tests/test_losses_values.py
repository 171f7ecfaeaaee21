"""What each loss computes: hand-computed values, the docstring examples and the minima."""

import math

import numpy as np
import pytest
import torch

from recdistill.losses import LOSSES
from tests.conftest import run_docstring_example
from tests.loss_inputs import loss_of, pad_wild, tensor, variant_id


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lse(values):
    values = np.asarray(values, dtype=np.float64)
    return values.max() + np.log(np.exp(values - values.max()).sum())


# --- hand-computed values ----------------------------------------------------------------


@pytest.mark.parametrize("name", [*LOSSES])
def test_the_docstring_example_holds(name):
    run_docstring_example(LOSSES[name])


def test_bce_hand_computed():
    student = tensor([[2.0, -1.0, 0.5], [0.3, 7.0, 7.0]])
    labels = tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    first = (-math.log(sigmoid(2.0)) - math.log(1 - sigmoid(-1.0))) / 2
    second = -math.log(sigmoid(0.3))
    loss = LOSSES["bce"](student, labels, mask=mask)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


@pytest.mark.parametrize(("t", "rate"), [(0.75, 0.05), (0.0, 0.2), (1.0, 0.2)])
def test_gbce_hand_computed(t, rate):
    student = tensor([[2.0, -1.0, 0.5], [0.3, 7.0, 7.0]])
    labels = tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    beta = rate * (t * (1 - 1 / rate) + 1 / rate)
    first = (
        -beta * math.log(sigmoid(2.0)) - math.log(1 - sigmoid(-1.0)) - math.log(1 - sigmoid(0.5))
    ) / 3
    second = (-beta * math.log(sigmoid(0.3)) - math.log(1 - sigmoid(7.0))) / 2
    loss = LOSSES["gbce"](student, labels, mask=mask, t=t, sampling_rate=rate)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_gbce_is_bce_when_not_calibrated_or_nothing_is_sampled():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, generator=generator)
    labels = (torch.rand(4, 6, generator=generator) < 0.3).float()
    mask = torch.rand(4, 6, generator=generator) < 0.8
    bce = LOSSES["bce"](student, labels, mask=mask)
    for options in ({"t": 0.0, "sampling_rate": 0.01}, {"t": 0.3, "sampling_rate": 1.0}):
        torch.testing.assert_close(LOSSES["gbce"](student, labels, mask=mask, **options), bce)


def test_softmax_ce_hand_computed_and_lists_without_positives_contribute_nothing():
    student = tensor([[1.0, 2.0, 0.0, 5.0], [1.0, 2.0, 3.0, 4.0], [9.0, 1.0, 1.0, 1.0]])
    labels = tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True] * 4, [True, False, False, False]])
    # p = [1/2, 1/2, 0]: -(1/2)(1 - lse) - (1/2)(2 - lse)
    expected = lse([1.0, 2.0, 0.0]) - 1.5
    loss = LOSSES["softmax_ce"](student, labels, mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_bce_hand_computed(temperature):
    student = tensor([[1.0, -2.0, 4.0]])
    teacher = tensor([[0.5, 3.0, -4.0]])
    mask = torch.tensor([[True, True, False]])
    terms = []
    for s, t in [(1.0, 0.5), (-2.0, 3.0)]:
        p, q = sigmoid(t / temperature), sigmoid(s / temperature)
        terms.append(-(p * math.log(q) + (1 - p) * math.log(1 - q)))
    expected = temperature**2 * np.mean(terms)
    loss = LOSSES["soft_bce"](student, teacher, mask=mask, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_listnet_hand_computed(temperature):
    student = tensor([[1.0, 0.0, 2.0, -3.0]])
    teacher = tensor([[2.0, 1.0, 0.0, 8.0]])
    mask = torch.tensor([[True, True, True, False]])
    s, t = np.array([1.0, 0.0, 2.0]) / temperature, np.array([2.0, 1.0, 0.0]) / temperature
    p, q = np.exp(t) / np.exp(t).sum(), np.exp(s) / np.exp(s).sum()
    expected = temperature**2 * (p * np.log(p / q)).sum()
    loss = LOSSES["listnet"](student, teacher, mask=mask, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_listmle_hand_computed_with_ties_broken_by_position():
    s0, s1, s2, s3 = 0.3, 1.0, -0.5, 2.0
    student = tensor([[s0, s1, s2, s3, 6.0]])
    teacher = tensor([[0.5, 2.0, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    # teacher order: 1 (2.0), 3 (1.0), 0 (0.5), 2 (0.5; tied with 0, which comes first)
    terms = [
        lse([s1, s3, s0, s2]) - s1,
        lse([s3, s0, s2]) - s3,
        lse([s0, s2]) - s0,
    ]
    assert LOSSES["listmle"](student, teacher, mask=mask).item() == pytest.approx(
        np.mean(terms), rel=1e-6
    )
    top_two = LOSSES["listmle"](student, teacher, mask=mask, top_k=2)
    assert top_two.item() == pytest.approx(np.mean(terms[:2]), rel=1e-6)


def test_rank_weighted_hand_computed_with_ties_and_a_short_list():
    s = [0.4, 1.5, -0.2, 0.8, 2.0]
    student = tensor([s, [0.7, -1.1, 3.0, 3.0, 3.0]])
    teacher = tensor([[0.1, 0.9, 0.5, 0.2, 0.5], [1.0, 2.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    w = np.exp(-np.arange(2) / 5.0)
    w = w / w.sum()
    # first list: top two are 1 (0.9) and 2 (0.5; tied with 4, which comes later)
    first = -w[0] * math.log(sigmoid(s[1])) - w[1] * math.log(sigmoid(s[2]))
    first -= np.mean([math.log(1 - sigmoid(s[i])) for i in (4, 3, 0)])
    # second list is shorter than k: both valid items are the top, in teacher order
    second = -w[0] * math.log(sigmoid(-1.1)) - w[1] * math.log(sigmoid(0.7))
    loss = LOSSES["rank_weighted"](student, teacher, mask=mask, top_k=2, decay=5.0)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


@pytest.mark.parametrize("margin_weighted", [True, False])
def test_ranknet_hand_computed_excludes_ties(margin_weighted):
    s = [0.5, 1.0, -1.0, 0.2]
    t = [3.0, 1.0, 1.0, 0.0]
    student = tensor([s + [4.0], [1.0, 2.0, 0.0, 0.0, 0.0]])
    teacher = tensor([t + [2.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4 + [False], [True, True, False, False, False]])
    pairs = [(i, j) for i in range(4) for j in range(4) if t[i] > t[j]]
    assert len(pairs) == 5  # (1, 2) is a tie; the second list has only a tie
    weights = [t[i] - t[j] if margin_weighted else 1.0 for i, j in pairs]
    losses = [math.log(1 + math.exp(-(s[i] - s[j]))) for i, j in pairs]
    expected = np.dot(weights, losses) / np.sum(weights)
    loss = LOSSES["ranknet"](student, teacher, mask=mask, margin_weighted=margin_weighted)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_margin_mse_hand_computed():
    student = tensor([[1.0, 2.0, 4.0, 100.0]])
    teacher = tensor([[0.0, 0.0, 0.0, -100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # ordered pairs: (1-2)² = 1, (1-4)² = 9, (2-4)² = 4, each twice, over 6 pairs
    expected = 2 * (1 + 9 + 4) / 6
    assert LOSSES["margin_mse"](student, teacher, mask=mask).item() == pytest.approx(expected)


def test_margin_mse_matches_the_explicit_pairwise_form():
    generator = torch.Generator().manual_seed(0)
    lengths = [6, 2, 5, 1]
    rows = [torch.randn(2, n, generator=generator, dtype=torch.float64) for n in lengths]
    student, mask = pad_wild([r[0] for r in rows], 7)
    teacher, _ = pad_wild([r[1] for r in rows], 7)
    per_list = []
    for row in rows:
        s, t = row.numpy()
        n = len(s)
        if n >= 2:
            pairs = [
                ((s[i] - s[j]) - (t[i] - t[j])) ** 2 for i in range(n) for j in range(n) if i != j
            ]
            per_list.append(np.mean(pairs))
    loss = LOSSES["margin_mse"](student.double(), teacher.double(), mask=mask)
    assert loss.item() == pytest.approx(np.mean(per_list), rel=1e-12)


def test_feature_mse_hand_computed():
    student = tensor([[1.0, 2.0], [3.0, 4.0], [9.0, math.nan]])
    teacher = tensor([[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]])
    mask = torch.tensor([True, True, False])
    expected = ((1 + 4) / 2 + (0 + 1) / 2) / 2
    assert LOSSES["feature_mse"](student, teacher, mask=mask).item() == pytest.approx(expected)


# --- minima ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("listnet", {}), ("listnet", {"temperature": 2.0}), ("margin_mse", {})],
    ids=variant_id,
)
def test_zero_with_zero_gradient_when_student_equals_teacher(name, options):
    teacher, mask = pad_wild([torch.tensor([0.3, -1.2, 2.5, 0.0]), torch.tensor([4.0, 1.0])], 6)
    student = teacher.clone().requires_grad_()
    loss = loss_of(name, options, student, teacher, mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6


def test_feature_mse_zero_when_equal():
    teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([True, True, False, True])
    assert LOSSES["feature_mse"](teacher.clone(), teacher, mask=mask).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_bce_minimum_is_the_teacher_entropy(temperature):
    t = np.array([0.5, -2.0, 3.0])
    teacher, mask = pad_wild([torch.tensor(t, dtype=torch.float32)], 5)
    student = teacher.clone().requires_grad_()
    loss = LOSSES["soft_bce"](student, teacher, mask=mask, temperature=temperature)
    loss.backward()
    p = sigmoid(t / temperature)
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert loss.item() == pytest.approx(temperature**2 * entropy.mean(), rel=1e-6)
    assert student.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize(
    ("name", "confident", "minimum"),
    [
        ("bce", lambda y: 50 * (2 * y - 1), lambda npos: 0.0),
        # the entropy of the label distribution: log of the number of positives
        ("softmax_ce", lambda y: 50 * y, lambda npos: np.mean(np.log(npos))),
    ],
    ids=["bce", "softmax_ce"],
)
def test_label_losses_reach_their_minimum_for_a_confident_student(name, confident, minimum):
    labels = tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    loss = LOSSES[name](confident(labels), labels, mask=torch.ones(2, 4, dtype=torch.bool))
    assert loss.item() == pytest.approx(minimum(np.array([3, 1])), abs=1e-6)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("listmle", {}),
        ("listmle", {"top_k": 3}),
        ("ranknet", {}),
        ("ranknet", {"margin_weighted": False}),
        ("rank_weighted", {"top_k": 3}),
    ],
    ids=variant_id,
)
def test_a_confident_student_that_agrees_with_the_teacher_reaches_zero(name, options):
    generator = torch.Generator().manual_seed(1)
    teacher = torch.stack([torch.randperm(8, generator=generator) for _ in range(3)]).float()
    # ±25 around the threshold between the teacher's top 3 and the rest; a scaled copy otherwise
    student = 50 * (teacher - 4.5) if name == "rank_weighted" else 50 * teacher
    loss = loss_of(name, options, student, teacher, torch.ones(3, 8, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("top_k", [None, 3])
def test_listmle_prefers_the_teachers_order_to_a_shuffle(top_k):
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(4, 10, generator=generator)
    mask = torch.ones(4, 10, dtype=torch.bool)
    shuffled = teacher[:, torch.randperm(10, generator=generator)]
    for scale in [1.0, 20.0]:
        agreeing = LOSSES["listmle"](scale * teacher, teacher, mask=mask, top_k=top_k)
        other = LOSSES["listmle"](scale * shuffled, teacher, mask=mask, top_k=top_k)
        assert agreeing < other
