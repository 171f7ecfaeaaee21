"""Run under ``torchrun`` by tests/test_distributed.py: a few sharded training steps, then
the sharded student's scores on fixed candidate lists.

    torchrun --nproc_per_node=2 tests/distributed_worker.py DATA_DIR OUT_DIR FEATURE_DIM \
        [ENCODER [EMBEDDING_DIM]]

``ENCODER`` is the user encoder, ``bag`` (the default: trained on ranking lists) or
``sequence`` (trained on next-item windows, its history table an ``EmbeddingCollection``);
``EMBEDDING_DIM`` (default 8) the width of the wide tables.
Every rank scores the same lists (the sharded embedding look-ups are collectives); rank 0
writes the whole weights after training (``weights.safetensors``), the scores of the
sharded model (``scores.safetensors``; for a sequence model also its next-item scores of
:func:`sequence_batch`), and the training loss and sharding plan (``stats.json``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from recdistill import distributed
from recdistill.data.batches import CandidateLists, TrainSequences
from recdistill.data.feature_store import FeatureStore, SequenceBatch
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.stage import LossTerm, StageSpec
from recdistill.trainer import Trainer

SEQUENCE = "sequence"


def spec(feature_dim: int, encoder: str = "bag", embedding_dim: int = 8) -> TwoTowerSpec:
    """Tables 8 wide are sharded table-wise; feature tables 2 wide stay replicated."""
    if encoder == SEQUENCE:
        return TwoTowerSpec(
            embedding_dim=embedding_dim,
            tower=(16, 8),
            feature_dim=feature_dim,
            user_encoder=SEQUENCE,
            max_length=5,
            layers=1,
            heads=2,
        )
    return TwoTowerSpec(embedding_dim=embedding_dim, tower=(16, 8), feature_dim=feature_dim)


STAGE = StageSpec(
    name="sharded",
    model="small",
    losses=(LossTerm("softmax_ce"),),
    batch_size=128,
    negatives=4,
    learning_rate=0.05,
)
SEQUENCE_STAGE = replace(STAGE, model="sequence", batch_size=64, objective="next_item")
STEPS = 4
SCORED_BATCHES = 2


def stage(encoder: str = "bag") -> StageSpec:
    return SEQUENCE_STAGE if encoder == SEQUENCE else STAGE


def sequence_batch(store: FeatureStore) -> SequenceBatch:
    """A fixed batch of next-item windows, the same on every rank."""
    windows = TrainSequences(
        store,
        max_length=spec(2, SEQUENCE).max_length,
        batch_size=SEQUENCE_STAGE.batch_size,
        negatives=SEQUENCE_STAGE.negatives,
        seed=7,
    )
    return next(iter(windows.epoch(0)))


def main(data: Path, out: Path, feature_dim: int, encoder: str, embedding_dim: int) -> None:
    world = distributed.world()
    store = FeatureStore(data, history_length=10)
    torch.manual_seed(0)
    model = TwoTower(
        spec(feature_dim, encoder, embedding_dim),
        FeatureSpace.of(store),
    )
    trainer = Trainer(stage(encoder), model, {}, store, out / "stage")
    stats = trainer.train_epoch(0, max_batches=STEPS)
    trainer.gather_weights()

    sharded_student = trainer.trained.module.model
    sharded_student.eval()
    batches = list(CandidateLists(store, "valid", batch_size=64))[:SCORED_BATCHES]
    with torch.no_grad():
        scores = {f"batch_{i}": sharded_student(batch) for i, batch in enumerate(batches)}
        if encoder == SEQUENCE:
            scores["next_item"], _ = sharded_student.next_item_scores(sequence_batch(store))
    if world.is_main:
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(out / "weights.safetensors"))
        save_file(scores, str(out / "scores.safetensors"))
        plan = {
            module: {table: sharding.sharding_type for table, sharding in tables.items()}
            for module, tables in trainer.trained.plan.plan.items()
        }
        summary = {
            "world_size": world.size,
            "examples": stats.examples,
            "loss": stats.loss_sum,
            "plan": plan,
        }
        (out / "stats.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4] if len(sys.argv) > 4 else "bag",
        int(sys.argv[5]) if len(sys.argv) > 5 else 8,
    )
