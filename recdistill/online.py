"""Rank one request's candidates with a loaded artifact, as the server and simulator do.

The two-tower path runs the user tower on the user's snapshot features (with any
``recent_items`` of the request put in front of the history) and the item tower on the
candidates, then sorts by score. By default (``precompute_items``) the item tower runs once
over the catalogue at load; without, it runs on each request's candidates (for catalogues too
large to hold their vectors); both give the same scores.

One request's user tower runs on :class:`~recdistill.inference.PlainUserTower`: the trained
tower's own weights read without jagged tensors, several times faster at batch size one.
``inference="torchrec"`` runs the torchrec modules instead, as training and evaluation do;
the scores agree to 1e-5. A known user's vector for a request without ``recent_items`` is
kept in a :class:`~recdistill.inference.UserVectorCache` of ``user_cache`` users, filled at
load with the vectors the mean user is computed from (up to 10,000 known users).

The history is the request's ``recent_items`` (most recent first) followed by the user's
snapshot history (train and validation items, newest first: what the test lists were scored
from), cut to the artifact's history length, exactly the order the offline batches use. A bag encoder pools it; a sequence encoder reads its first
``max_length`` items, so the request's most recent item is position 0, the one its user
vector reads out.

An ``ease`` artifact scores the whole catalogue from the same history (EASE on the history
bag, ``recdistill.ensembles.EaseMember``), an ``ensemble`` mixes its members' catalogue scores,
each standardised over the catalogue, with its weights, as the ensemble teacher does offline.
An ``external`` artifact asks its teacher from outside the run about the same history
(:class:`~recdistill.external.served.ServedTeacher`).

Fallbacks, decided once at load:

- **Unknown user** (cold start): with ``recent_items``, the user tower runs on that history,
  the unknown user-ID and demographic rows replaced by the mean of the known rows; without,
  the user vector is the mean user vector over (up to 10,000) known users.
- **Unknown candidate**: scored as the average known item, the mean item-tower output and
  mean item bias. Popularity scores an unknown item as never seen (0 interactions).
- Unknown ``recent_items`` are ignored: they have no embedding. A known user left with an
  empty history is scored as offline (a sequence encoder attends over no empty row, so no
  NaN); an unknown one gets the mean user vector.

Row 0 of every user-tower bag table (index "unknown") is never seen in training, so
overwriting it with the mean changes no known user's or item's score. A sequence encoder's
history table is left as it is: a history never holds an unknown item.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from recdistill.artifact import Artifact
from recdistill.data.feature_store import UNKNOWN
from recdistill.ensembles import standardised
from recdistill.inference import PlainUserTower, UserVectorCache
from recdistill.quantize import set_unknown_row_to_mean
from recdistill.server import INFERENCE_PATHS, USER_CACHE

MEAN_USER_SAMPLE = 10_000
LOAD_BATCH = 4096


@dataclass(frozen=True)
class Ranking:
    """Candidates sorted by score, descending; ``unknown`` lists candidate IDs not in the
    model's vocabulary, ``cold_start`` says the user was not."""

    items: np.ndarray
    scores: np.ndarray
    unknown: np.ndarray
    cold_start: bool


class OnlineRanker:
    """Ranks one request at a time with an exported artifact, as ``POST /rank`` does.

    Example (``recdistill export`` wrote the artifact)::

        ranker = OnlineRanker(load_artifact(Path("artifacts/student")))
        ranking = ranker.rank(42, np.array([10, 7, 3]), recent_items=np.array([5]))
        ranking.items, ranking.scores  # candidates best first, with their scores
        ranking.cold_start, ranking.unknown  # is user 42 new to the model; which candidates are

    ``device`` is where :meth:`score_lists` runs a float two-tower model's user tower and
    scores (the A/B simulation's batches); single requests, int8 models and the other kinds
    score on the CPU, as served.
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        precompute_items: bool = True,
        inference: str = "plain",
        user_cache: int = USER_CACHE,
        device: torch.device | str = "cpu",
    ) -> None:
        if inference not in INFERENCE_PATHS:
            raise ValueError(f"inference must be one of {INFERENCE_PATHS}, not {inference!r}")
        self.artifact = artifact
        float_model = artifact.model is not None and artifact.quantization is None
        self.batch_device = torch.device(device if float_model else "cpu")
        self.store = artifact.store
        self.precompute_items = precompute_items
        self.user_cache = UserVectorCache(user_cache)
        self.plain_tower = None
        if artifact.model is not None:
            artifact.model.requires_grad_(False)
            self._prepare_fallbacks()
            if inference == "plain":
                self.plain_tower = PlainUserTower(artifact.model.user_tower)
        self.served = None
        if artifact.teacher is not None:
            from recdistill.external.served import ServedTeacher

            self.served = ServedTeacher(artifact.teacher, artifact.store)
        # An ensemble's members score the whole catalogue for every request.
        self.members = {
            name: (OnlineRanker(member, precompute_items=True), weight)
            for name, (member, weight) in (artifact.members or {}).items()
        }

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    @torch.inference_mode()
    def rank(
        self, user_id: int | str, candidates: np.ndarray, recent_items: np.ndarray | None = None
    ) -> Ranking:
        """Sort ``candidates`` (distinct external item IDs, integers or strings as the data
        has them) for ``user_id``."""
        store = self.store
        candidates = np.asarray(candidates)
        items = store.items.index(store.item_ids.lookup(candidates))
        user = int(store.users.index(store.user_ids.lookup(np.array([user_id])))[0])
        if recent_items is not None and len(recent_items):
            recent_items = store.item_ids.lookup(np.asarray(recent_items))
        scores = self.scores(user, items, recent_items).numpy()
        order = np.argsort(-scores, kind="stable")
        return Ranking(
            items=candidates[order],
            scores=scores[order],
            unknown=candidates[items == UNKNOWN],
            cold_start=user == UNKNOWN,
        )

    def scores(
        self, user: int, items: np.ndarray, recent_items: np.ndarray | None = None
    ) -> torch.Tensor:
        """Scores of item indices ``items`` for user index ``user`` (0: unknown)."""
        if self.artifact.counts is not None:
            return self.artifact.counts[torch.as_tensor(items)]
        if self.members:
            catalogue = np.arange(len(self.store.items))
            mixed = sum(
                weight * standardised(member.scores(user, catalogue, recent_items)[None])[0]
                for member, weight in self.members.values()
            )
            return mixed[torch.as_tensor(items)]
        recent = np.empty(0, dtype=np.int64)
        if recent_items is not None and len(recent_items):
            recent = self.store.items.index(np.asarray(recent_items, dtype=np.int64))
            recent = recent[recent != UNKNOWN]
        if self.served is not None:
            history = self._history(user, recent)
            _, snapshot_times = self.served.snapshot(np.array([user]))
            now = np.full(len(recent), int(time.time()), dtype=np.int64)
            times = np.concatenate([now, snapshot_times[0]])[: len(history)]
            scores = self.served.scores(np.array([user]), items[None], [history], [times])
            return torch.as_tensor(scores[0])
        if self.artifact.ease is not None:
            return self.artifact.ease.history_scores(self._user_features(user, recent))[0, items]
        model, item_rows = self.artifact.model, torch.from_numpy(items)
        if len(recent):
            user_vector = self._user_vector(user, recent)
        elif user == UNKNOWN:
            user_vector = self.mean_user
        else:
            user_vector = self.user_cache.get(user, lambda: self._user_vector(user, recent))
        if self.precompute_items:
            vectors = self.item_vectors.index_select(0, item_rows)
            bias = self.item_bias.index_select(0, item_rows)
        else:
            vectors = model.item_tower(self.store.item_kjt(items))
            bias = model.item_bias(item_rows).squeeze(-1)
            unknown = (item_rows == UNKNOWN)[:, None]
            vectors = torch.where(unknown, self.item_vectors[UNKNOWN], vectors)
            bias = torch.where(unknown[:, 0], self.item_bias[UNKNOWN], bias)
        return torch.addmv(bias, vectors, user_vector)

    def score_lists(self, user_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Scores ``[lists, C]`` of candidate lists ``[lists, C]`` for ``user_ids`` ``[lists]``
        (external IDs), as :meth:`rank` scores each list without ``recent_items``; batched
        for simulations: the user tower runs once per distinct user, items come from the
        catalogue's precomputed vectors."""
        store = self.store
        items = torch.as_tensor(store.items.index(candidates))
        if self.artifact.counts is not None:
            return self.artifact.counts[items].numpy()
        users, row_of_list = np.unique(store.users.index(user_ids), return_inverse=True)
        if self.served is not None:
            histories, times = self.served.snapshot(users)
            scores = np.empty(items.shape, dtype=np.float32)
            for start in range(0, len(items), LOAD_BATCH):
                rows = row_of_list[start : start + LOAD_BATCH]
                scores[start : start + LOAD_BATCH] = self.served.scores(
                    users[rows],
                    items[start : start + LOAD_BATCH].numpy(),
                    [histories[r] for r in rows],
                    [times[r] for r in rows],
                )
            return scores
        if self.artifact.ease is not None or self.members:
            scores = torch.empty(items.shape)
            for start in range(0, len(users), LOAD_BATCH):
                chunk = users[start : start + LOAD_BATCH]
                lists = np.flatnonzero((row_of_list >= start) & (row_of_list < start + len(chunk)))
                catalogue = self._catalogue_scores(chunk)
                rows = torch.as_tensor(row_of_list[lists] - start)
                scores[lists] = catalogue[rows[:, None], items[lists]]
            return scores.numpy()
        device = self.batch_device
        user_vectors = self._batch_user_tower(store.history_kjt(users).to(device))
        user_vectors[torch.as_tensor(users == UNKNOWN, device=device)] = self.mean_user.to(device)
        items, item_vectors = items.to(device), self.item_vectors.to(device)
        scores = torch.empty(items.shape, device=device)
        for start in range(0, len(items), LOAD_BATCH):
            rows = slice(start, start + LOAD_BATCH)
            vectors = user_vectors[torch.as_tensor(row_of_list[rows], device=device)]
            scores[rows] = torch.einsum("lcd,ld->lc", item_vectors[items[rows]], vectors)
        return (scores + self.item_bias.to(device)[items]).cpu().numpy()

    @cached_property
    def _batch_user_tower(self) -> torch.nn.Module:
        """The user tower :meth:`score_lists` runs: the model's own, or a copy on
        ``batch_device`` (made after the fallbacks set the unknown rows)."""
        tower = self.artifact.model.user_tower
        return (
            tower if self.batch_device.type == "cpu" else copy.deepcopy(tower).to(self.batch_device)
        )

    def _catalogue_scores(self, users: np.ndarray) -> torch.Tensor:
        """``[users, items]``: user indices ``users`` scoring the whole catalogue, from
        their snapshot histories, as :meth:`score_lists` scores them."""
        if self.artifact.ease is not None:
            return self.artifact.ease.history_scores(self.store.history_kjt(users))
        if self.members:
            return sum(
                weight * standardised(member._catalogue_scores(users))
                for member, weight in self.members.values()
            )
        user_vectors = self.artifact.model.user_tower(self.store.history_kjt(users))
        user_vectors[torch.as_tensor(users == UNKNOWN)] = self.mean_user
        return user_vectors @ self.item_vectors.T + self.item_bias

    def _history(self, user: int, recent: np.ndarray) -> np.ndarray:
        """The items a request's user reads, newest first: its recent items, then the
        snapshot's history, capped at the history length."""
        store = self.store
        history = store.history.values[
            store.history.offsets[user] : store.history.offsets[user + 1]
        ]
        return np.concatenate([recent, history])[: store.history_length]

    def _user_features(self, user: int, recent: np.ndarray):
        history = self._history(user, recent)
        return self.store.user_kjt(np.array([user]), history, np.array([len(history)]))

    def _user_vector(self, user: int, recent: np.ndarray) -> torch.Tensor:
        if self.plain_tower is None:
            return self.artifact.model.user_tower(self._user_features(user, recent))[0]
        codes = {name: int(self.store.user_codes[name][user]) for name in self.store.user_features}
        history = torch.from_numpy(self._history(user, recent).astype(np.int64, copy=False))
        return self.plain_tower(user, history, codes)

    def _prepare_fallbacks(self) -> None:
        model, store = self.artifact.model, self.store
        # The bags a cold user reads row 0 of: user_id and the demographics (and, for a bag
        # encoder, the history, never read at row 0). A sequence encoder's history table is
        # not among them (model.user_tower.sequence).
        for table in model.user_tower.embeddings.embedding_bags.values():
            set_unknown_row_to_mean(table)

        catalogue = np.arange(len(store.items))
        vectors = torch.cat(
            [
                model.item_tower(store.item_kjt(catalogue[start : start + LOAD_BATCH]))
                for start in range(0, len(catalogue), LOAD_BATCH)
            ]
        )
        bias = model.item_bias.weight[:, 0].clone()
        vectors[UNKNOWN], bias[UNKNOWN] = vectors[1:].mean(0), bias[1:].mean()
        self.item_vectors, self.item_bias = vectors, bias

        known = np.arange(1, len(store.users))
        sample = known[
            np.linspace(0, len(known) - 1, min(len(known), MEAN_USER_SAMPLE)).astype(int)
        ]
        user_vectors = torch.cat(
            [
                model.user_tower(store.history_kjt(sample[start : start + LOAD_BATCH]))
                for start in range(0, len(sample), LOAD_BATCH)
            ]
        )
        self.mean_user = user_vectors.mean(0)
        # The same vectors answer these users' requests without recent_items: a new model
        # version starts with them cached rather than computing each on its first request.
        self.user_cache.fill(sample, user_vectors)
