"""Ranking losses for distillation: pure functions with one signature, in the spirit of rax.

Every loss is ``loss(student, target, *, mask, **options) -> Tensor``. ``student`` and
``target`` are ``[lists, list_size]`` scores (``target`` holds the teacher's scores, or 0/1
labels for the label losses) and ``mask`` is ``[lists, list_size]`` bool, False on padding.
A loss is computed per list and averaged over the lists that have something to contribute
(each docstring says which), so neither padded slots nor empty lists change the result.

Padded values are replaced before any arithmetic touches them, softmaxes are log-sum-exps
with a finite fill, and log-sigmoids are softplus, so scores of ±1e4 (or NaN in a padded
slot) give finite losses and gradients. A target (teacher score or label) that is NaN or
±inf in a valid entry is a ValueError: a diverged teacher must not silently drop or reorder
lists. Sorting by the teacher is stable: ties keep their original order. ``LOSSES`` maps
config names to the functions. Each docstring ends with a worked example, run as a doctest
by ``tests/test_losses_values.py``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class LossFn(Protocol):
    """``loss(student, target, *, mask, **options)``: a scalar, mean over contributing lists."""

    def __call__(
        self, student: Tensor, target: Tensor, *, mask: Tensor, **options: Any
    ) -> Tensor: ...


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_target(loss: str, target: Tensor, mask: Tensor) -> None:
    """Refuse a target that is not finite in a valid entry (``mask`` selects entries or rows)."""
    if torch.isfinite(target.sum()):  # one cheap pass settles the usual, all-finite case
        return
    valid = mask if mask.dim() == target.dim() else mask[..., None]
    bad = int(_count(valid & ~torch.isfinite(target), dim=None))
    if bad:
        raise ValueError(
            f"{loss} loss: {bad} of its target values (teacher scores or labels) are not finite"
        )


def _count(mask: Tensor, dim: int | None = -1) -> Tensor:
    """The number of true entries along ``dim`` (all of them for ``None``); counted in
    int32 because a bool tensor's default int64 sum is an order of magnitude slower on CPU,
    which matters on full-catalogue lists."""
    return mask.sum(dim, dtype=torch.int32)


def _list_mean(per_list: Tensor, contributes: Tensor) -> Tensor:
    """Mean of ``per_list`` over the lists where ``contributes``; 0 when none does."""
    return torch.where(contributes, per_list, 0.0).sum() / _count(contributes).clamp(min=1)


def _entry_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per list, the mean of ``values`` over the valid entries (0 for an empty list)."""
    return torch.where(mask, values, 0.0).sum(-1) / _count(mask).clamp(min=1)


def _log_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Per list, log softmax over the valid entries; 0 on padding."""
    logits = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.where(mask, logits.log_softmax(-1), 0.0)


def _teacher_order(teacher: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per list, the positions sorted by teacher score (descending, ties by position).

    Returns ``(order, valid, rank)``: ``valid`` is the mask in sorted order and ``rank`` the
    0-based rank of each sorted slot among the valid ones (padding sorts last).
    """
    key = teacher.masked_fill(~mask, torch.finfo(teacher.dtype).min)
    order = key.sort(dim=-1, descending=True, stable=True).indices
    valid = mask.gather(-1, order)
    return order, valid, valid.cumsum(-1) - 1


def bce_loss(student: Tensor, labels: Tensor, *, mask: Tensor) -> Tensor:
    """Pointwise binary cross-entropy with logits on 0/1 labels.

    Per list: mean over valid entries of ``-y log σ(s) - (1 - y) log(1 - σ(s))``; lists with a
    valid entry contribute.

    >>> scores = torch.tensor([[2.0, -1.0, 5.0]])
    >>> labels = torch.tensor([[1.0, 0.0, 1.0]])
    >>> mask = torch.tensor([[True, True, False]])  # the last entry is padding
    >>> bce_loss(scores, labels, mask=mask)  # (log(1 + e⁻²) + log(1 + e⁻¹)) / 2
    tensor(0.2201)
    """
    _check_target("bce", labels, mask)
    s = student.masked_fill(~mask, 0.0)
    y = labels.masked_fill(~mask, 0.0)
    bce = F.binary_cross_entropy_with_logits(s, y, reduction="none")
    return _list_mean(_entry_mean(bce, mask), mask.any(-1))


def softmax_cross_entropy_loss(student: Tensor, labels: Tensor, *, mask: Tensor) -> Tensor:
    """Listwise softmax cross-entropy against the label distribution.

    Per list: ``-Σ_i p_i log softmax(s)_i`` with ``p = y / Σ y``, both over valid entries.
    Lists with a positive label and at least two valid entries contribute.

    >>> scores = torch.tensor([[2.0, 0.0, 0.0]])
    >>> labels = torch.tensor([[1.0, 0.0, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> softmax_cross_entropy_loss(scores, labels, mask=mask)  # -log(e² / (e² + 2))
    tensor(0.2395)
    """
    _check_target("softmax_ce", labels, mask)
    y = labels.masked_fill(~mask, 0.0)
    total = y.sum(-1, keepdim=True)
    target = y / torch.where(total > 0, total, 1.0)
    per_list = -(target * _log_softmax(student, mask)).sum(-1)
    return _list_mean(per_list, (total.squeeze(-1) > 0) & (_count(mask) >= 2))


def gbce_loss(
    student: Tensor,
    labels: Tensor,
    *,
    mask: Tensor,
    t: float = 0.75,
    sampling_rate: float = 1.0,
) -> Tensor:
    """gBCE (Petrov & Macdonald, RecSys 2023): BCE whose positive probability is raised to β.

    With negatives sampled uniformly at rate ``α = sampling_rate`` (negatives per list over
    the items that could have been drawn), plain BCE learns scores that overrate the positive
    (the model never sees most of the catalogue); ``σ(s)^β`` with ``β = α (t (1 − 1/α) +
    1/α)`` calibrates them, ``t`` = 1 fully (β = α) and 0 not at all (β = 1, BCE). Per list:
    the mean over valid entries of ``-β log σ(s)`` on positives and ``-log(1 − σ(s))`` on
    negatives; lists with a valid entry contribute. A stage fills ``sampling_rate`` from its
    own negatives and catalogue.

    >>> scores = torch.tensor([[2.0, -1.0, 5.0]])
    >>> labels = torch.tensor([[1.0, 0.0, 0.0]])
    >>> mask = torch.tensor([[True, True, False]])  # the last entry is padding
    >>> # α = 0.1, t = 0.5: β = 0.1 (0.5 · (1 - 10) + 10) = 0.55
    >>> gbce_loss(scores, labels, mask=mask, t=0.5, sampling_rate=0.1)
    tensor(0.1915)
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not 0 <= t <= 1:
        raise ValueError(f"t must be in [0, 1], got {t}")
    _check_target("gbce", labels, mask)
    beta = sampling_rate * (t * (1 - 1 / sampling_rate) + 1 / sampling_rate)
    s = student.masked_fill(~mask, 0.0)
    y = labels.masked_fill(~mask, 0.0)
    per_entry = y * beta * F.softplus(-s) + (1 - y) * F.softplus(s)
    return _list_mean(_entry_mean(per_entry, mask), mask.any(-1))


def soft_bce_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Pointwise BCE against the teacher's soft labels, with Hinton's T² scaling.

    Per list: ``T² · mean_i BCE(σ(s_i / T), σ(t_i / T))`` over valid entries; its minimum, at
    ``s == t``, is ``T²`` times the mean entropy of ``σ(t / T)``. Lists with a valid entry
    contribute.

    >>> teacher = torch.tensor([[0.0, 0.0]])
    >>> mask = torch.ones(1, 2, dtype=torch.bool)
    >>> soft_bce_loss(teacher, teacher, mask=mask)  # the entropy of σ(0) = 1/2: log 2
    tensor(0.6931)
    >>> soft_bce_loss(teacher, teacher, mask=mask, temperature=2.0)  # 2² log 2
    tensor(2.7726)
    """
    _positive("temperature", temperature)
    _check_target("soft_bce", teacher, mask)
    s = student.masked_fill(~mask, 0.0) / temperature
    p = torch.sigmoid(teacher.masked_fill(~mask, 0.0) / temperature)
    bce = F.binary_cross_entropy_with_logits(s, p, reduction="none")
    return temperature**2 * _list_mean(_entry_mean(bce, mask), mask.any(-1))


def listnet_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """ListNet distillation: ``T² · KL(softmax(t / T) ‖ softmax(s / T))`` over valid entries.

    Per list: ``T² · Σ_i p_i (log p_i - log q_i)`` with ``p = softmax(t / T)``,
    ``q = softmax(s / T)``; zero when ``s == t`` up to a per-list constant. Lists with at least
    two valid entries contribute.

    >>> teacher = torch.tensor([[3.0, 1.0, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> listnet_loss(teacher, teacher, mask=mask)
    tensor(0.)
    >>> listnet_loss(torch.zeros(1, 3), teacher, mask=mask)  # Σ p log p + log 3
    tensor(0.5743)
    """
    _positive("temperature", temperature)
    _check_target("listnet", teacher, mask)
    log_p = _log_softmax(teacher / temperature, mask)
    log_q = _log_softmax(student / temperature, mask)
    kl = torch.where(mask, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    return temperature**2 * _list_mean(kl, _count(mask) >= 2)


def listmle_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor, top_k: int | None = None
) -> Tensor:
    """ListMLE: Plackett–Luce negative log-likelihood of the teacher's ranking.

    With ``π`` the valid entries sorted by teacher score (descending, ties by position) and
    ``n`` their number, per list: ``(1/m) Σ_{r<m} (log Σ_{j≥r} exp(s_{π_j}) - s_{π_r})`` with
    ``m = min(top_k, n - 1)`` (``n - 1`` without ``top_k``): the last factor is always 1, and
    each denominator keeps the whole remaining set. Lists with a term contribute.

    >>> teacher = torch.tensor([[2.0, 1.0, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> listmle_loss(torch.zeros(1, 3), teacher, mask=mask)  # (log 3 + log 2) / 2
    tensor(0.8959)
    >>> listmle_loss(torch.zeros(1, 3), teacher, mask=mask, top_k=1)  # log 3
    tensor(1.0986)
    """
    if top_k is not None:
        _positive("top_k", top_k)
    _check_target("listmle", teacher, mask)
    order, valid, rank = _teacher_order(teacher, mask)
    s = student.gather(-1, order).masked_fill(~valid, torch.finfo(student.dtype).min)
    remaining = s.flip(-1).logcumsumexp(-1).flip(-1)
    n = valid.sum(-1, keepdim=True)
    terms = valid & (rank < (n - 1 if top_k is None else (n - 1).clamp(max=top_k)))
    nll = torch.where(terms, remaining - s, 0.0).sum(-1) / _count(terms).clamp(min=1)
    return _list_mean(nll, terms.any(-1))


def rank_weighted_topk_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor, top_k: int = 10, decay: float = 5.0
) -> Tensor:
    """Ranking Distillation (Tang & Wang, KDD 2018), position-weighted form.

    The teacher's top ``k`` valid entries ``π_0..π_{k-1}`` (ties by position; all valid entries
    when fewer than ``k``) are positives with weights ``w_r ∝ exp(-r / decay)``, ``Σ w_r = 1``;
    the other valid entries ``R`` are negatives. Per list:
    ``-Σ_r w_r log σ(s_{π_r}) - (1/|R|) Σ_{i∈R} log(1 - σ(s_i))`` (no negative term when ``R``
    is empty). Only the static position weights are used, not the paper's dynamic weighting
    by the student's rank discrepancy. Lists with a valid entry contribute.

    >>> teacher = torch.tensor([[2.0, 1.0, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> rank_weighted_topk_loss(torch.zeros(1, 3), teacher, mask=mask, top_k=1)  # 2 log 2
    tensor(1.3863)
    """
    _positive("top_k", top_k)
    _positive("decay", decay)
    _check_target("rank_weighted", teacher, mask)
    order, valid, rank = _teacher_order(teacher, mask)
    s = student.gather(-1, order).masked_fill(~valid, 0.0)
    top = valid & (rank < top_k)
    weight = torch.where(top, torch.exp(-rank.to(s.dtype) / decay), 0.0)
    # a non-empty top has weight 1 at rank 0, so the clamp only guards empty lists
    weight = weight / weight.sum(-1, keepdim=True).clamp(min=1.0)
    positives = (weight * F.softplus(-s)).sum(-1)
    negatives = _entry_mean(F.softplus(s), valid & ~top)
    return _list_mean(positives + negatives, valid.any(-1))


def ranknet_loss(
    student: Tensor, teacher: Tensor, *, mask: Tensor, margin_weighted: bool = True
) -> Tensor:
    """RankNet on the teacher's pairs: logistic loss on every ordered pair, ties excluded.

    Per list, over valid pairs with ``t_i > t_j``: ``Σ w_ij log(1 + exp(-(s_i - s_j))) / Σ w_ij``
    with ``w_ij = t_i - t_j`` when ``margin_weighted``, else 1. Lists with such a pair
    contribute.

    >>> teacher = torch.tensor([[2.0, 1.0, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> ranknet_loss(teacher, teacher, mask=mask)  # (2 log(1 + e⁻¹) + 2 log(1 + e⁻²)) / 4
    tensor(0.2201)
    >>> ranknet_loss(teacher, teacher, mask=mask, margin_weighted=False)
    tensor(0.2512)
    """
    _check_target("ranknet", teacher, mask)
    s = student.masked_fill(~mask, 0.0)
    t = teacher.masked_fill(~mask, 0.0)
    margin = t[:, :, None] - t[:, None, :]
    pairs = mask[:, :, None] & mask[:, None, :] & (margin > 0)
    weight = pairs * margin if margin_weighted else pairs.to(s.dtype)
    logistic = F.softplus(s[:, None, :] - s[:, :, None])
    total = weight.sum((1, 2))
    per_list = (weight * logistic).sum((1, 2)) / torch.where(total > 0, total, 1.0)
    return _list_mean(per_list, total > 0)


def margin_mse_loss(student: Tensor, teacher: Tensor, *, mask: Tensor) -> Tensor:
    """Margin-MSE (Hofstätter et al. 2020) over all valid pairs of a list.

    Per list: ``mean_{i≠j} ((s_i - s_j) - (t_i - t_j))²``, computed in O(n) with ``d = s - t``
    as ``2n/(n-1) · Var(d) = 2/(n-1) · Σ_i (d_i - mean(d))²`` (population variance). Lists
    with at least two valid entries contribute.

    >>> teacher = torch.tensor([[2.0, 1.0, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> margin_mse_loss(torch.zeros(1, 3), teacher, mask=mask)  # the margins 1, 2, 1, squared
    tensor(2.)
    >>> margin_mse_loss(teacher + 1.0, teacher, mask=mask)  # a shift keeps every margin
    tensor(0.)
    """
    _check_target("margin_mse", teacher, mask)
    d = (student - teacher).masked_fill(~mask, 0.0)
    n = mask.sum(-1, keepdim=True)
    centred = torch.where(mask, d - d.sum(-1, keepdim=True) / n.clamp(min=1), 0.0)
    n = n.squeeze(-1)
    per_list = 2 * centred.square().sum(-1) / (n - 1).clamp(min=1)
    return _list_mean(per_list, n >= 2)


def feature_mse_loss(student: Tensor, teacher: Tensor, *, mask: Tensor) -> Tensor:
    """MSE between representations: mean over selected rows of ``‖s - t‖² / dim``.

    ``student`` and ``teacher`` are ``[rows, dim]`` (the student's projected tower outputs and
    the teacher's); ``mask`` is ``[rows]`` bool and selects the rows.

    >>> teacher = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    >>> rows = torch.tensor([True, False])
    >>> feature_mse_loss(torch.zeros(2, 2), teacher, mask=rows)  # (1² + 1²) / 2
    tensor(1.)
    """
    _check_target("feature_mse", teacher, mask)
    diff = (student - teacher).masked_fill(~mask[..., None], 0.0)
    return _list_mean(diff.square().mean(-1), mask)


LOSSES: dict[str, LossFn] = {
    "bce": bce_loss,
    "softmax_ce": softmax_cross_entropy_loss,
    "gbce": gbce_loss,
    "soft_bce": soft_bce_loss,
    "listnet": listnet_loss,
    "listmle": listmle_loss,
    "rank_weighted": rank_weighted_topk_loss,
    "ranknet": ranknet_loss,
    "margin_mse": margin_mse_loss,
    "feature_mse": feature_mse_loss,
}
