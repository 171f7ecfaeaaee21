"""What a sweep's candidates are trained with and measured against, loaded once per process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch

from recdistill import distributed
from recdistill.data.feature_store import FeatureStore
from recdistill.evaluate import evaluate
from recdistill.models import TwoTower, TwoTowerSpec
from recdistill.quantize import QuantizationSpec
from recdistill.recipe import load_model, load_stage_model
from recdistill.roles import REFERENCE
from recdistill.segments import SliceSpec, slice_table, user_segments
from recdistill.summary import SegmentedValidScore, SegmentScore
from recdistill.sweep.plan import METRIC, Plan
from recdistill.teachers import FrozenTeacher


class Bench:
    """The feature store, the base run's teachers and the teacher's validation scores."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.store = FeatureStore(plan.data, history_length=plan.history_length)

    @cached_property
    def teachers(self) -> dict[str, TwoTower]:
        plan = self.plan
        names = {plan.reference, *(t for c in plan.candidates for t in c.stage.teachers)}
        device = distributed.world().device
        return {
            name: load_stage_model(plan.base.root, name, self.store).to(device)
            for name in sorted(names)
        }

    @cached_property
    def frozen(self) -> dict[str, FrozenTeacher]:
        """The teachers, frozen; a sequence teacher's states are cached in its base run."""
        return {
            name: FrozenTeacher(name, model, self.store, cache=self.plan.base.stage(name).root)
            for name, model in self.teachers.items()
        }

    @cached_property
    def segments(self) -> pd.DataFrame:
        return user_segments(self.plan.data, "valid")

    @cached_property
    def reference(self) -> pd.DataFrame:
        return self._per_user(self.teachers[self.plan.reference], REFERENCE)

    def load(
        self, spec: TwoTowerSpec, weights: Path, quantization: QuantizationSpec | None = None
    ) -> TwoTower:
        """A model from its weights file, rebuilt as ``load_artifact`` does."""
        return load_model(spec, self.store, weights, quantization)

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
