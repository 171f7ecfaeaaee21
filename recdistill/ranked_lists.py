"""Teacher-ranked distillation lists, as Relaxed Ranking Distillation builds them.

On the training lists (one positive, uniformly sampled negatives) a teacher's ranking says
little more than the label. What a student should learn is how the teacher orders the items
it puts on top of the whole catalogue (Ranking Distillation, Tang & Wang 2018; RRD, Kang et
al. 2020). For each training list, from the teacher's state at that list's moment
(:meth:`~recdistill.teachers.Teacher.users`), the teacher ranks every item the user
had not interacted with before the list's positive (the positive excluded too); that ranking
is computed once per run and train row (:meth:`~recdistill.teachers.Teacher.ranked`),
and each batch's list is:

- ``top`` items sampled without replacement from the teacher's ``depth`` best, with
  probability ∝ ``exp(-rank / temperature)`` (rank 0 the best), in the teacher's order;
- ``uniform`` items the user never interacted with in train, drawn as the training lists'
  negatives are; a draw among the ``depth`` best is masked out.

Both parts are redrawn for every batch from a generator seeded by (seed, epoch, batch), so a
resumed or sharded run draws the same lists, and no list is the same every epoch. Sorted by
the teacher's scores, the sampled top items come first and the uniform ones after them, so
``listmle`` with ``top_k`` ≤ ``top`` is RRD's loss: the top items ordered among themselves,
the uniform ones in every denominator with no order forced among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recdistill.data.feature_store import UNKNOWN, FeatureStore, RankingBatch
from recdistill.data.sampling import sample_unseen
from recdistill.teachers import DistillationLists, Teacher


@dataclass(frozen=True)
class ListSpec:
    """A stage's distillation lists: ``top`` of the teacher's ``depth`` best items, sampled
    with weight ``exp(-rank / temperature)``, and ``uniform`` other items."""

    # At temperature 10 a rank past 100 is drawn with weight below e^-10: a deeper ranking
    # would only be stored, not sampled (RRD ranks 500 of a larger catalogue).
    depth: int = 100
    top: int = 40
    temperature: float = 10.0
    uniform: int = 40

    def __post_init__(self) -> None:
        if self.depth < 1 or not 1 <= self.top <= self.depth:
            raise ValueError(
                f"lists need 1 ≤ top ≤ depth, not top {self.top} and depth {self.depth}"
            )
        if self.uniform < 0:
            raise ValueError(f"lists need uniform ≥ 0, not {self.uniform}")
        if self.temperature <= 0:
            raise ValueError(f"lists need a positive temperature, not {self.temperature}")


@torch.no_grad()
def rrd_lists(
    batch: RankingBatch,
    users: torch.Tensor,
    teacher: Teacher,
    store: FeatureStore,
    spec: ListSpec,
    rng: np.random.Generator,
) -> DistillationLists:
    """The distillation lists of ``batch``'s training lists, whose teacher user vectors are
    ``users``, and the teacher's scores on them (``[lists, top + uniform]`` both); a list
    the teacher does not teach is masked out whole."""
    rows = batch.train_rows.cpu().numpy()
    if (rows < 0).any():
        raise ValueError("teacher-ranked lists are drawn for training lists only")
    ranked = torch.as_tensor(np.asarray(teacher.ranked(spec.depth)[rows], dtype=np.int64))
    lists, depth = ranked.shape
    # Gumbel top-k: sampling without replacement with P ∝ exp(-rank / temperature).
    gumbel = torch.as_tensor(rng.gumbel(size=(lists, depth)), dtype=torch.float32)
    keys = (gumbel - torch.arange(depth) / spec.temperature).masked_fill(ranked < 0, -torch.inf)
    picked = keys.topk(spec.top, dim=1).indices.sort(dim=1).values
    top_items = ranked.gather(1, picked)
    top_valid = top_items >= 0

    uniform = torch.empty((lists, 0), dtype=torch.int64)
    if spec.uniform:
        owners = store.row_users(rows)
        uniform = torch.as_tensor(
            sample_unseen(
                owners, spec.uniform, store.train_seen, len(store.items), rng, first_item=1
            )
        )
    uniform_valid = ~(uniform[:, :, None] == ranked[:, None, :]).any(-1)

    items = torch.cat([top_items.clamp(min=UNKNOWN), uniform], dim=1)
    distinct, slots = torch.unique(items, return_inverse=True)
    ranked_batch = RankingBatch(
        users=batch.users,
        items=store.item_kjt(distinct.numpy()),
        candidates=slots,
        labels=torch.zeros(items.shape),
        mask=torch.cat([top_valid, uniform_valid], dim=1),
        user_ids=batch.user_ids,
        train_rows=batch.train_rows,
        moments=batch.moments,
        history_times=batch.history_times,
    ).to(users.device)
    answer = teacher.outputs(ranked_batch, users)
    if answer.valid is not None:
        ranked_batch.mask &= answer.valid[:, None]
    return DistillationLists(ranked_batch, answer.scores, shares_users=True)
