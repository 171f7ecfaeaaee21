"""Run under ``torchrun`` by tests/test_distributed.py: a few sharded training steps, then
the sharded student's scores on fixed candidate lists.

    torchrun --nproc_per_node=2 tests/distributed_worker.py DATA_DIR OUT_DIR FEATURE_DIM

Every rank scores the same lists (the sharded embedding look-ups are collectives); rank 0
writes the whole weights after training (``weights.safetensors``), the scores of the
sharded model (``scores.safetensors``) and the training loss (``stats.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from recdistill import distributed
from recdistill.data.batches import CandidateLists, FeatureStore
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.train import LossTerm, StageSpec, Trainer


def spec(feature_dim: int) -> TwoTowerSpec:
    """Tables 8 wide are sharded table-wise; feature tables 2 wide stay replicated."""
    return TwoTowerSpec(embedding_dim=8, tower=(16, 8), feature_dim=feature_dim)


STAGE = StageSpec(
    name="sharded",
    model="small",
    losses=(LossTerm("softmax_ce"),),
    batch_size=128,
    negatives=4,
    learning_rate=0.05,
)
STEPS = 4
SCORED_BATCHES = 2


def main(data: Path, out: Path, feature_dim: int) -> None:
    world = distributed.world()
    store = FeatureStore(data, history_length=10)
    torch.manual_seed(0)
    model = TwoTower(spec(feature_dim), FeatureSpace(store.user_features, store.cardinalities()))
    trainer = Trainer(STAGE, model, {}, store, out / "stage")
    stats = trainer.train_epoch(0, max_batches=STEPS)
    trainer.gather_weights()

    sharded_student = trainer.trained.module.model
    sharded_student.eval()
    batches = list(CandidateLists(store, "valid", batch_size=64))[:SCORED_BATCHES]
    with torch.no_grad():
        scores = {f"batch_{i}": sharded_student(batch) for i, batch in enumerate(batches)}
    if world.is_main:
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(out / "weights.safetensors"))
        save_file(scores, str(out / "scores.safetensors"))
        summary = {"world_size": world.size, "examples": stats.examples, "loss": stats.loss_sum}
        (out / "stats.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
