"""Run under ``torchrun`` by tests/test_distributed.py: a sharded stage whose loss turns NaN on
rank 1 alone, at epoch 1, batch 2, with gradients that stay finite, so that only rank 1 can
see it. Each rank writes the error that stopped it to ``rank<R>.txt`` and returns normally.

    torchrun --nproc_per_node=2 tests/diverging_worker.py DATA_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from distributed_worker import STAGE, spec  # this script's directory comes first on sys.path

from recdistill import distributed
from recdistill.data.batches import FeatureStore
from recdistill.errors import TrainingDiverged
from recdistill.losses import LOSSES
from recdistill.models import FeatureSpace, TwoTower
from recdistill.trainer import Trainer

BAD_BATCH = 2


def main(data: Path, out: Path) -> None:
    world = distributed.world()
    store = FeatureStore(data, history_length=10)
    torch.manual_seed(0)
    model = TwoTower(spec(feature_dim=2), FeatureSpace.of(store))
    trainer = Trainer(replace(STAGE, epochs=2), model, {}, store, out / "stage")
    poisoned_call = len(trainer.lists) + BAD_BATCH
    softmax_ce, calls = LOSSES["softmax_ce"], 0

    def nan_on_rank_1(student, target, *, mask):
        nonlocal calls
        value = softmax_ce(student, target, mask=mask)
        calls += 1
        if world.rank == 1 and calls - 1 == poisoned_call:
            return value + torch.tensor(float("nan"))  # no gradient: the others cannot tell
        return value

    LOSSES["softmax_ce"] = nan_on_rank_1
    try:
        trainer.fit()
    except TrainingDiverged as error:
        (out / f"rank{world.rank}.txt").write_text(str(error))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
