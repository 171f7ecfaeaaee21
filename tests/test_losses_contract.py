"""What every loss honours: padding and empty lists, extreme scores, shifts, gradients, the
registry's common signature and the refusal of non-finite targets."""

import inspect
import math

import pytest
import torch

from recdistill.losses import LOSSES
from tests.loss_inputs import loss_of, pad_wild, tensor, variant_id

LABEL_LOSSES = ("bce", "gbce", "softmax_ce")
# a list of one item still gives these a term that depends on the student
POINTWISE = ("bce", "gbce", "soft_bce", "rank_weighted")
# Each list loss with its default options, plus non-default variants.
VARIANTS = [
    ("bce", {}),
    ("gbce", {}),
    ("gbce", {"t": 0.5, "sampling_rate": 0.1}),
    ("softmax_ce", {}),
    ("soft_bce", {}),
    ("soft_bce", {"temperature": 3.0}),
    ("listnet", {}),
    ("listnet", {"temperature": 2.0}),
    ("listmle", {}),
    ("listmle", {"top_k": 2}),
    ("rank_weighted", {}),
    ("rank_weighted", {"top_k": 2, "decay": 1.0}),
    ("ranknet", {}),
    ("ranknet", {"margin_weighted": False}),
    ("margin_mse", {}),
]
SHIFT_INVARIANT = [
    ("listnet", {}),
    ("listnet", {"temperature": 2.0}),
    ("listmle", {}),
    ("listmle", {"top_k": 2}),
    ("ranknet", {}),
    ("ranknet", {"margin_weighted": False}),
    ("margin_mse", {}),
]


def random_list(name, n, generator):
    """(student, target) for one list of ``n`` valid entries, a positive label among them."""
    student = torch.randn(n, generator=generator) * 2
    if name in LABEL_LOSSES:
        target = (torch.rand(n, generator=generator) < 0.4).float()
        target[torch.randint(n, (1,), generator=generator)] = 1.0
    else:
        target = torch.randn(n, generator=generator) * 2
    return student, target


# --- padding -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=variant_id)
def test_padding_is_ignored_and_ragged_lists_match_each_list_alone(name, options):
    generator = torch.Generator().manual_seed(3)
    lists = [random_list(name, n, generator) for n in (5, 3, 7, 2)]
    student, mask = pad_wild([s for s, _ in lists], 9)
    target, _ = pad_wild([t for _, t in lists], 9)
    student.requires_grad_()
    loss = loss_of(name, options, student, target, mask)
    loss.backward()

    alone = [
        loss_of(name, options, s[None], t[None], torch.ones(1, len(s), dtype=torch.bool))
        for s, t in lists
    ]
    torch.testing.assert_close(loss, torch.stack(alone).mean())
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert student.grad[~mask].eq(0).all()

    # the same lists at one length, with and without padding
    same = [
        (s[:2], t[:2]) if name not in LABEL_LOSSES else (s[:2], tensor([1.0, 0.0]))
        for s, t in lists
    ]
    padded_student, padded_mask = pad_wild([s for s, _ in same], 6)
    padded_target, _ = pad_wild([t for _, t in same], 6)
    unpadded = loss_of(
        name,
        options,
        torch.stack([s for s, _ in same]),
        torch.stack([t for _, t in same]),
        torch.ones(4, 2, dtype=torch.bool),
    )
    torch.testing.assert_close(
        loss_of(name, options, padded_student, padded_target, padded_mask), unpadded
    )


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=variant_id)
def test_lists_with_nothing_to_contribute_are_left_out(name, options):
    generator = torch.Generator().manual_seed(4)
    lists = [random_list(name, n, generator) for n in (4, 6)]
    student, mask = pad_wild([s for s, _ in lists] + [torch.empty(0)], 6)
    target, _ = pad_wild([t for _, t in lists] + [torch.empty(0)], 6)
    torch.testing.assert_close(
        loss_of(name, options, student, target, mask),
        loss_of(name, options, student[:2], target[:2], mask[:2]),
    )

    empty = student[2:].clone().requires_grad_()
    loss = loss_of(name, options, empty, target[2:], mask[2:])
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.eq(0).all()


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, options) for name, options in VARIANTS if name not in POINTWISE],
    ids=variant_id,
)
def test_single_item_lists_are_left_out_of_list_and_pair_losses(name, options):
    generator = torch.Generator().manual_seed(9)
    lists = [random_list(name, n, generator) for n in (4, 6, 1)]
    student, mask = pad_wild([s for s, _ in lists], 6)
    target, _ = pad_wild([t for _, t in lists], 6)
    torch.testing.assert_close(
        loss_of(name, options, student, target, mask),
        loss_of(name, options, student[:2], target[:2], mask[:2]),
    )


def test_feature_mse_ignores_padded_rows():
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 4, 3, generator=generator)
    mask = torch.tensor([True, False, True, True])
    wild_student, wild_teacher = student.clone(), teacher.clone()
    wild_student[1], wild_teacher[1] = tensor([1e4, math.nan, math.inf]), tensor([-1e4, 1e30, 0.0])
    wild_student.requires_grad_()
    loss = LOSSES["feature_mse"](wild_student, wild_teacher, mask=mask)
    loss.backward()
    rows = [
        LOSSES["feature_mse"](student[i : i + 1], teacher[i : i + 1], mask=mask[i : i + 1])
        for i in (0, 2, 3)
    ]
    torch.testing.assert_close(loss, torch.stack(rows).mean())
    torch.testing.assert_close(
        loss, LOSSES["feature_mse"](student[mask], teacher[mask], mask=mask[mask])
    )
    assert torch.isfinite(wild_student.grad).all() and wild_student.grad[1].eq(0).all()


# --- extremes, shifts, gradients ---------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=variant_id)
def test_finite_loss_and_gradients_at_extreme_scores(name, options):
    extremes = tensor([[1e4, -1e4, 1e4, 0.0, -1e4, 9999.0], [-1e4, -1e4, -9999.0, 1e4, 1e4, 1e4]])
    mask = torch.tensor([[True] * 6, [True, True, True, True, False, True]])
    if name in LABEL_LOSSES:
        target = tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    else:
        target = extremes.flip(-1).clone()
    student = extremes.clone().requires_grad_()
    target.requires_grad_()
    loss = loss_of(name, options, student, target, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    # listmle, rank_weighted and unweighted ranknet use only the teacher's order: no gradient
    assert target.grad is None or torch.isfinite(target.grad).all()


def test_feature_mse_finite_at_extreme_values():
    student = tensor([[1e4, -1e4], [-1e4, 1e4]]).requires_grad_()
    loss = LOSSES["feature_mse"](student, -student.detach(), mask=torch.tensor([True, True]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("name", "options"), SHIFT_INVARIANT, ids=variant_id)
def test_shift_invariance(name, options):
    generator = torch.Generator().manual_seed(6)
    lists = [random_list(name, n, generator) for n in (6, 4, 3)]
    student, mask = pad_wild([s for s, _ in lists], 6)
    teacher, _ = pad_wild([t for _, t in lists], 6)
    shift = tensor([[5.0], [-3.0], [12.0]])
    loss = loss_of(name, options, student, teacher, mask)
    torch.testing.assert_close(
        loss_of(name, options, student + shift, teacher, mask), loss, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        loss_of(name, options, student, teacher - shift, mask), loss, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", ["bce", "soft_bce", "rank_weighted"])
def test_pointwise_losses_are_not_shift_invariant(name):
    generator = torch.Generator().manual_seed(7)
    student, target = random_list(name, 5, generator)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss = loss_of(name, {}, student[None], target[None], mask)
    assert not torch.isclose(loss_of(name, {}, student[None] + 3.0, target[None], mask), loss)


@pytest.mark.parametrize(("name", "options"), [*VARIANTS, ("feature_mse", {})], ids=variant_id)
def test_gradcheck(name, options):
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, True], [True, True, False, False, False]])
    if name in LABEL_LOSSES:
        target = tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]], torch.float64)
    else:
        # distinct teacher scores, so the teacher's order is stable under perturbation
        target = torch.randperm(10, generator=generator).reshape(2, 5).double() / 3
    if name == "feature_mse":
        mask = mask[:, 0] & torch.tensor([True, False])
    student.requires_grad_()
    target.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: loss_of(name, options, s, t, mask), (student, target)
    )


# --- registry ----------------------------------------------------------------------------


def test_registry_names_and_common_signature():
    assert set(LOSSES) == {
        "bce",
        "gbce",
        "softmax_ce",
        "soft_bce",
        "listnet",
        "listmle",
        "rank_weighted",
        "ranknet",
        "margin_mse",
        "feature_mse",
    }
    for name, loss in LOSSES.items():
        parameters = list(inspect.signature(loss).parameters.values())
        first, second, mask, *options = parameters
        assert first.kind == second.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert mask.name == "mask" and mask.kind == inspect.Parameter.KEYWORD_ONLY, name
        assert mask.default is inspect.Parameter.empty, name
        for option in options:
            assert option.kind == inspect.Parameter.KEYWORD_ONLY, (name, option.name)
            assert option.default is not inspect.Parameter.empty, (name, option.name)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("gbce", {"t": 1.5}),
        ("gbce", {"sampling_rate": 0.0}),
        ("soft_bce", {"temperature": 0.0}),
        ("listnet", {"temperature": -1.0}),
        ("listmle", {"top_k": 0}),
        ("rank_weighted", {"top_k": 0}),
        ("rank_weighted", {"decay": 0.0}),
    ],
    ids=lambda v: variant_id(v),
)
def test_invalid_options_are_rejected(name, options):
    scores = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=next(iter(options))):
        loss_of(name, options, scores, scores, torch.ones(1, 3, dtype=torch.bool))


# --- non-finite targets ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [*VARIANTS, ("feature_mse", {})], ids=variant_id)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_target_in_a_valid_entry_is_refused(name, options, bad):
    generator = torch.Generator().manual_seed(10)
    lists = [random_list(name, n, generator) for n in (5, 3)]
    student, mask = pad_wild([s for s, _ in lists], 6)  # padding holds NaN and ±inf
    target, _ = pad_wild([t for _, t in lists], 6)
    if name == "feature_mse":  # rows of representations: a whole one and a masked-out one
        student, target, mask = student[:, :5], target[:, :5], torch.tensor([True, False])
    loss_of(name, options, student, target, mask)  # non-finite padding is fine
    target[0, 1] = target[0, 4] = bad
    with pytest.raises(ValueError, match=rf"^{name} loss: 2 of its target values \(teacher"):
        loss_of(name, options, student, target, mask)
