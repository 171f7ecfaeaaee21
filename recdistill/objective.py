"""A stage's loss on a batch, as one module (what DistributedModelParallel wraps)."""

from __future__ import annotations

import torch
from torch import nn

from recdistill.data.feature_store import RankingBatch, SequenceBatch
from recdistill.losses import LOSSES
from recdistill.models import TwoTower
from recdistill.stage import LABELS, LossTerm
from recdistill.teachers import TeacherOutputs


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
        ranked: dict[str, tuple[RankingBatch, torch.Tensor]],
    ) -> torch.Tensor:
        """The weighted loss of ``batch``; a score term whose teacher has teacher-ranked lists
        in ``ranked`` (with that teacher's scores on them) is computed on those lists."""
        if isinstance(batch, SequenceBatch):
            scores, labels = self.model.next_item_scores(batch)
            mask = torch.ones_like(labels, dtype=torch.bool)
            return sum(
                term.weight * LOSSES[term.fn](scores, labels, mask=mask, **term.options)
                for term in self.losses
            )
        users, items = self.model.towers(batch)
        scores = self.model.score(users, items, batch)
        # The ranked lists belong to the batch's own users: their tower output is shared.
        ranked_scores = {
            name: self.model.score(users, self.model.item_tower(lists.items), lists)
            for name, (lists, _) in ranked.items()
        }
        total = scores.new_zeros(())
        for term in self.losses:
            fn = LOSSES[term.fn]
            if term.fn == "feature_mse":
                t_users, t_items, _ = teacher_outputs[term.source]
                adapter = self.adapters[term.source]
                value = 0.5 * (
                    fn(adapter(users), t_users, mask=_all_rows(users), **term.options)
                    + fn(adapter(items), t_items, mask=_all_rows(items), **term.options)
                )
            elif term.source in ranked:
                lists, target = ranked[term.source]
                value = fn(ranked_scores[term.source], target, mask=lists.mask, **term.options)
            else:
                target = batch.labels if term.source == LABELS else teacher_outputs[term.source][2]
                value = fn(scores, target, mask=batch.mask, **term.options)
            total = total + term.weight * value
        return total


def _all_rows(values: torch.Tensor) -> torch.Tensor:
    return torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
