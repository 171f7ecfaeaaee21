"""A stage's loss on a batch, as one module (what DistributedModelParallel wraps)."""

from __future__ import annotations

import torch
from torch import nn

from recdistill.data.feature_store import RankingBatch, SequenceBatch
from recdistill.losses import LOSSES
from recdistill.models import TwoTower
from recdistill.stage import LABELS, LossTerm
from recdistill.teachers import DistillationLists, TeacherOutputs


class StageObjective(nn.Module):
    """The stage's weighted loss on a batch, as one module holding the student and the
    feature-distillation adapters: under ``torchrun`` DistributedModelParallel wraps it whole,
    so its forward is where the data-parallel gradients are synchronised."""

    def __init__(
        self, model: TwoTower, adapters: nn.ModuleDict, losses: tuple[LossTerm, ...]
    ) -> None:
        super().__init__()
        self.model = model
        self.adapters = adapters
        self.losses = losses

    def forward(
        self,
        batch: RankingBatch | SequenceBatch,
        teacher_outputs: dict[str, TeacherOutputs],
        lists: dict[str, DistillationLists],
    ) -> torch.Tensor:
        """The weighted loss of ``batch``; a score term whose teacher has lists of its own in
        ``lists`` (teacher-ranked lists of the batch's users, or the requests a log of scores
        holds) is computed on those lists against the teacher's scores on them."""
        if isinstance(batch, SequenceBatch):
            scores, labels = self.model.next_item_scores(batch)
            mask = torch.ones_like(labels, dtype=torch.bool)
            return sum(
                term.weight * LOSSES[term.fn](scores, labels, mask=mask, **term.options)
                for term in self.losses
            )
        users, items = self.model.towers(batch)
        scores = self.model.score(users, items, batch)
        list_scores = {
            name: self.model.score(
                users if own.shares_users else self.model.user_tower(own.batch.users),
                self.model.item_tower(own.batch.items),
                own.batch,
            )
            for name, own in lists.items()
        }
        total = scores.new_zeros(())
        for term in self.losses:
            fn = LOSSES[term.fn]
            if term.fn == "feature_mse":
                teacher = teacher_outputs[term.source]
                adapter = self.adapters[term.source]
                value = 0.5 * (
                    fn(
                        adapter(users),
                        teacher.users,
                        mask=_rows(users, teacher.valid),
                        **term.options,
                    )
                    + fn(adapter(items), teacher.items, mask=_rows(items), **term.options)
                )
            elif term.source in lists:
                own = lists[term.source]
                value = fn(
                    list_scores[term.source], own.targets, mask=own.batch.mask, **term.options
                )
            elif term.source == LABELS:
                value = fn(scores, batch.labels, mask=batch.mask, **term.options)
            else:
                teacher = teacher_outputs[term.source]
                mask = batch.mask if teacher.valid is None else batch.mask & teacher.valid[:, None]
                value = fn(scores, teacher.scores, mask=mask, **term.options)
            total = total + term.weight * value
        return total


def _rows(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Which rows of ``values`` a feature loss compares: ``valid`` ones, or all."""
    if valid is not None:
        return valid
    return torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
