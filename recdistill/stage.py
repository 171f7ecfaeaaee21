"""What a training stage is: its model preset, its weighted loss terms and its schedule.

A stage learns from labels and/or the frozen models of earlier stages (its teachers); the
config's ``[stages.*]`` tables become :class:`StageSpec` objects (``recdistill.config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from recdistill.losses import LOSSES
from recdistill.ranked_lists import ListSpec

LABELS = "labels"
# What a stage trains on: ranking lists (a train interaction and sampled negatives), or
# every position of history windows predicting the item that came next (sequence models).
OBJECTIVES = ("lists", "next_item")
# What early stopping (and every other choice made on validation) maximises: NDCG@10 on the
# sampled 1 + 99 validation lists, or on full ranking of the catalogue.
VALID_METRICS = ("ndcg@10", "full_ndcg@10")
# What each position of a next-item window is scored against: ``negatives`` items sampled
# per window, or every item of the catalogue (a full softmax, as SASRec-CE trains).
SCORED_ITEMS = ("sampled", "all")
# How the Adam learning rate moves over a stage, after a linear warm-up over its first
# ``warmup_epochs``: held at ``learning_rate``, or brought down to zero along a half cosine
# that ends with the stage's last epoch (``epochs``). Under torchrun the sharded tables'
# fused optimizer keeps its own fixed rate.
SCHEDULES = ("constant", "cosine")
# What a stage's model computes in while it trains: float32, or bfloat16 autocast (matrix
# products in bfloat16; weights, Adam and the frozen teachers' answers stay float32), which
# pays on GPUs with bfloat16 units for big models. Evaluation always runs in float32.
PRECISIONS = ("fp32", "bf16")
# Row-wise Adagrad needs a larger step than Adam to learn as fast; this ratio is the default
# when a stage sets no adagrad_learning_rate (not tuned on the shipped configs).
ADAGRAD_STEP_RATIO = 10.0


@dataclass(frozen=True)
class LossTerm:
    """``weight * LOSSES[fn](student, target, mask=..., **options)``.

    ``source`` is ``"labels"``, the name of an earlier stage whose model is the teacher, or
    an ensemble of stages and baselines (``[ensembles.*]``, recdistill/ensembles.py).
    ``feature_mse`` compares tower outputs instead of scores.
    """

    fn: str
    source: str = LABELS
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fn not in LOSSES:
            raise ValueError(f"unknown loss {self.fn!r}; known: {sorted(LOSSES)}")
        if self.fn == "feature_mse" and self.source == LABELS:
            raise ValueError("feature_mse needs a teacher stage as its source, not labels")
        if self.fn == "gbce" and self.source != LABELS:
            raise ValueError("gbce learns from labels: its source must be labels")

    @property
    def scored(self) -> bool:
        """Whether the term compares scores of lists (every loss but ``feature_mse``)."""
        return self.fn != "feature_mse"

    def describe(self) -> str:
        """``2·listnet(teacher, temperature=2)``."""
        options = "".join(f", {key}={value:g}" for key, value in self.options.items())
        return f"{self.weight:g}·{self.fn}({self.source}{options})"


@dataclass(frozen=True)
class StageSpec:
    name: str
    model: str
    losses: tuple[LossTerm, ...]
    epochs: int = 20
    patience: int = 3
    batch_size: int = 512
    negatives: int = 19
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    # Under torchrun on CPU the sharded tables learn with fbgemm's row-wise Adagrad (its CPU
    # kernel has no Adam); unset, ADAGRAD_STEP_RATIO × learning_rate. Ignored in one
    # process and on GPUs.
    adagrad_learning_rate: float | None = None
    weight_decay: float = 0.0
    # Before each Adam step the gradients Adam updates are scaled down to this global norm
    # if they exceed it (unset: never); under torchrun the sharded tables, updated in the
    # backward pass, are not clipped.
    clip_norm: float | None = None
    seed: int = 0
    objective: str = "lists"
    scored_items: str = "sampled"
    valid_metric: str = "ndcg@10"
    precision: str = "fp32"
    # Teacher-ranked distillation lists (recdistill/ranked_lists.py) for the terms that
    # learn from a teacher's scores; unset, they use the training lists too.
    lists: ListSpec | None = None

    def __post_init__(self) -> None:
        for key, least in (("epochs", 1), ("batch_size", 1), ("patience", 0), ("negatives", 0)):
            if getattr(self, key) < least:
                raise ValueError(
                    f"{self.where} {key} = {getattr(self, key)}: must be at least {least}"
                )
        for key in ("learning_rate", "adagrad_learning_rate", "clip_norm"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{self.where} {key} = {value}: must be above 0")
        if self.weight_decay < 0:
            raise ValueError(f"{self.where} weight_decay = {self.weight_decay}: must be at least 0")
        if self.lists is not None and not self.ranked_sources:
            raise ValueError(
                f"{self.where}: lists are ranked by a teacher, but no loss of this "
                "stage learns from a teacher's scores"
            )
        if self.valid_metric not in VALID_METRICS:
            raise ValueError(
                f"{self.where}: unknown valid_metric {self.valid_metric!r}; "
                f"choose one of {list(VALID_METRICS)}"
            )
        if self.lists is not None:
            for term in self.losses:
                if (
                    term.fn == "listmle"
                    and term.source != LABELS
                    and not (1 <= term.options.get("top_k", 0) <= self.lists.top)
                ):
                    raise ValueError(
                        f"{self.where}: listmle on teacher-ranked lists orders the "
                        f"sampled top items only: give it top_k ≤ lists.top ({self.lists.top})"
                    )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"{self.where}: unknown precision {self.precision!r}; "
                f"choose one of {list(PRECISIONS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"{self.where}: unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"{self.where}: warmup_epochs must be between 0 and epochs "
                f"({self.epochs}), not {self.warmup_epochs}"
            )
        if any(t.fn == "gbce" and "sampling_rate" in t.options for t in self.losses):
            raise ValueError(
                f"{self.where}: gbce's sampling_rate is the stage's own (its negatives "
                "over the catalogue): set t alone"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"{self.where}: unknown objective {self.objective!r}; "
                f"choose one of {list(OBJECTIVES)}"
            )
        if self.scored_items not in SCORED_ITEMS:
            raise ValueError(
                f"{self.where}: unknown scored_items {self.scored_items!r}; "
                f"choose one of {list(SCORED_ITEMS)}"
            )
        if self.scored_items == "all" and self.objective != "next_item":
            raise ValueError(f'{self.where}: scored_items = "all" is for the next_item objective')
        if self.objective == "next_item" and self.teachers:
            raise ValueError(
                f"{self.where}: the next_item objective learns from labels only; "
                f"it cannot distil from {list(self.teachers)}"
            )

    @property
    def where(self) -> str:
        """The config table the stage comes from (``[train]`` for the stages' defaults)."""
        return f"[stages.{self.name}]" if self.name else "[train]"

    def learning_rate_at(self, progress: float) -> float:
        """The Adam learning rate of the step that ends ``progress`` epochs into the stage
        (epoch 2's first step of 100 ends 2.01 epochs in)."""
        rate = self.learning_rate
        if progress < self.warmup_epochs:
            rate *= progress / self.warmup_epochs
        if self.schedule == "cosine":
            rate *= 0.5 * (1.0 + math.cos(math.pi * min(progress / self.epochs, 1.0)))
        return rate

    def sampling_rate(self, items: int) -> float:
        """The share of the other items a list's negatives cover, in a catalogue of
        ``items`` items: 1 when every position is scored against the whole catalogue."""
        if self.scored_items == "all":
            return 1.0
        return min(1.0, self.negatives / max(items - 1, 1))

    def losses_for(self, items: int) -> tuple[LossTerm, ...]:
        """The loss terms, gbce's given the stage's :meth:`sampling_rate` in a catalogue of
        ``items`` items."""
        rate = self.sampling_rate(items)
        return tuple(
            replace(term, options={**term.options, "sampling_rate": rate})
            if term.fn == "gbce"
            else term
            for term in self.losses
        )

    def describe_objective(self) -> str:
        """What the stage minimises: its loss terms and the items each list scores."""
        terms = " + ".join(term.describe() for term in self.losses)
        scored = "all items" if self.scored_items == "all" else f"1 + {self.negatives} items"
        return f"{terms}, {self.objective} over {scored}"

    @property
    def table_adagrad_learning_rate(self) -> float:
        if self.adagrad_learning_rate is not None:
            return self.adagrad_learning_rate
        return ADAGRAD_STEP_RATIO * self.learning_rate

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.source for t in self.losses if t.source != LABELS))

    @property
    def ranked_sources(self) -> tuple[str, ...]:
        """The teachers whose score losses read teacher-ranked lists (when ``lists`` is set)."""
        return tuple(
            dict.fromkeys(t.source for t in self.losses if t.source != LABELS and t.scored)
        )
