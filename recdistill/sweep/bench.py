"""What a sweep's candidates are trained with and measured against, loaded once per process."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from recdistill import distributed
from recdistill.artifact import Artifact
from recdistill.baselines import Ease
from recdistill.data.feature_store import FeatureStore
from recdistill.ensembles import EaseMember, EnsembleTeacher, Member
from recdistill.evaluate import evaluate
from recdistill.manifest import TWO_TOWER
from recdistill.models import TwoTower, TwoTowerSpec
from recdistill.online import OnlineRanker
from recdistill.quantize import QuantizationSpec
from recdistill.recipe import load_model, load_stage_model
from recdistill.roles import REFERENCE
from recdistill.segments import SliceSpec, slice_table, user_segments
from recdistill.summary import (
    BaselineModel,
    EnsembleModel,
    RunSummary,
    SegmentedValidScore,
    SegmentScore,
    read_summary,
)
from recdistill.sweep.plan import METRIC, Plan
from recdistill.teachers import FrozenTeacher, Teacher


class Bench:
    """The feature store, the base run's teachers and the teacher's validation scores."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.store = FeatureStore(plan.data, history_length=plan.history_length)

    @cached_property
    def base_models(self) -> dict[str, Any]:
        """The base run's summary entries, by model name."""
        return read_summary(self.plan.base.summary, RunSummary).models

    @cached_property
    def reference_model(self) -> TwoTower:
        return load_stage_model(self.plan.base.root, self.plan.reference, self.store)

    @cached_property
    def frozen(self) -> dict[str, Teacher]:
        """Every teacher of the candidates, frozen: a stage of the base run (a sequence
        teacher's states cached in its stage directory) or an ensemble of its stages and
        baselines at the weights the run chose (its rankings cached in its directory)."""
        names = sorted({t for c in self.plan.candidates for t in c.stage.teachers})
        return {name: self._teacher(name) for name in names}

    def _teacher(self, name: str) -> Teacher:
        cache = self.plan.base.stage(name).root
        entry = self.base_models[name]
        if isinstance(entry, EnsembleModel):
            members = {member: self._member(member) for member in entry.weights}
            weights = tuple(entry.weights.values())
            return EnsembleTeacher(name, members, weights, self.store, cache=cache)
        model = load_stage_model(self.plan.base.root, name, self.store)
        return FrozenTeacher(name, model.to(distributed.world().device), self.store, cache=cache)

    def _member(self, name: str) -> Member:
        """An ensemble's member: a stage, frozen, or an EASE baseline refitted on the train
        histories with the settings the base run chose."""
        entry = self.base_models[name]
        if not isinstance(entry, BaselineModel):
            return self._teacher(name)
        weights = Ease.fit(self.store, entry.l2).weights
        return EaseMember(weights, math.inf if entry.half_life is None else entry.half_life)

    @cached_property
    def segments(self) -> pd.DataFrame:
        return user_segments(self.plan.data, "valid")

    @cached_property
    def reference(self) -> pd.DataFrame:
        return self._per_user(self.reference_model, REFERENCE)

    def load(
        self, spec: TwoTowerSpec, weights: Path, quantization: QuantizationSpec | None = None
    ) -> TwoTower:
        """A model from its weights file, rebuilt as ``load_artifact`` does."""
        return load_model(spec, self.store, weights, quantization)

    def ranker(
        self,
        name: str,
        model: TwoTower,
        params: int,
        quantization: QuantizationSpec | None = None,
        *,
        user_cache: int = 0,
    ) -> OnlineRanker:
        """``model`` served as its artifact would be: on the features known when the test
        lists are scored (train and validation histories), as an exported artifact's."""
        artifact = Artifact(
            directory=self.plan.out / name,
            name=name,
            kind=TWO_TOWER,
            version="float" if quantization is None else "int8",
            params=params,
            store=self.store.known_at("test"),
            model=model,
            counts=None,
            quantization=quantization,
        )
        return OnlineRanker(artifact, user_cache=user_cache)

    def validate(self, model: TwoTower) -> SegmentedValidScore:
        """Validation NDCG@10 and the teacher's NDCG@10 retained in every large segment."""
        per_user = self._per_user(model, "candidate")
        spec = SliceSpec(metrics=(METRIC,), min_users=self.plan.sweep.min_segment_users)
        table = slice_table(
            pd.concat([self.reference, per_user]), self.segments, spec, {REFERENCE: REFERENCE}
        )
        teacher = table[table["model"] == REFERENCE].set_index(["segment", "value"])["mean"]
        segments = [
            SegmentScore(
                segment=row.segment,
                value=str(row.value),
                users=int(row.users),
                ndcg=float(row.mean),
                teacher_ndcg=float(teacher[row.segment, row.value]),
                retention=float(row.retention),
                retention_ci=[float(row.retention_ci_low), float(row.retention_ci_high)],
                flagged=bool(row.flagged),
            )
            for row in table[table["model"] == "candidate"].itertuples()
        ]
        return SegmentedValidScore(
            ndcg=float(per_user[METRIC].mean()),
            worst_segment=min(segments, key=lambda s: s.retention),
            segments=segments,
        )

    def _per_user(self, model: TwoTower, label: str) -> pd.DataFrame:
        per_user = evaluate(model, self.store, "valid", full_ranking=False)
        return pd.DataFrame(
            {"model": label, "user_id": per_user["user_id"], METRIC: per_user[METRIC]}
        )


@contextmanager
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
