"""Sharded training under a real ``torchrun --nproc_per_node=2`` (gloo, CPU), and runs that
are killed with SIGKILL and resumed from their checkpoints."""

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import recdistill.data.prepare
from recdistill import distributed
from recdistill.data.batches import CandidateLists, TrainLists, TrainSequences
from recdistill.data.feature_store import ITEM_KEYS, FeatureStore
from recdistill.models import FeatureSpace, TwoTower
from tests.conftest import ONE_STAGE, PROJECT, build_synthetic
from tests.distributed_worker import (
    SCORED_BATCHES,
    SEQUENCE,
    SEQUENCE_STAGE,
    STAGE,
    STEPS,
    sequence_batch,
    spec,
)

BIN = Path(sys.executable).parent
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
# ONE_STAGE with a sequence teacher: its history table is an EmbeddingCollection, sharded
# beside the bags, and it learns to predict each next item of history windows.
SEQUENCE_TEACHER = ONE_STAGE.replace(
    "feature_dim = 4\n",
    'feature_dim = 4\nuser_encoder = "sequence"\nmax_length = 5\nlayers = 1\nheads = 2\n',
).replace('model = "big"\n', 'model = "big"\nobjective = "next_item"\n')

# The sequence teacher, then a student distilled on RRD lists drawn from the teacher's
# per-row states (rank 0 writes them).
RANKED_LISTS_STUDENT = (
    SEQUENCE_TEACHER.replace(
        "[train]",
        "[models.small]\nembedding_dim = 4\ntower = [8]\nfeature_dim = 2\nrecent_length = 3\n\n[train]",
    )
    + """
[stages.student]
model = "small"
lists = { depth = 50, top = 10, uniform = 10 }
losses = [{ fn = "softmax_ce" }, { fn = "listnet", source = "teacher", temperature = 2.0 }]
"""
)


def train_command(config, data, out, *, launcher=(), resume=False):
    command = [*launcher, str(BIN / "recdistill"), "train", "--config", str(config)]
    command += ["--data", str(data), "--out", str(out)]
    return command + (["--resume"] if resume else [])


def run(command, timeout=900):
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=timeout, cwd=PROJECT
    )
    assert done.returncode == 0, "\n".join(done.stderr.splitlines()[-80:])
    return done


def epochs_logged(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def run_and_kill(command, stage: Path, epochs: int) -> None:
    """Start ``command`` and SIGKILL it with all its descendants (torchrun starts its workers
    in sessions of their own) as soon as ``stage`` has logged and checkpointed ``epochs``
    epochs, so the kill lands in the next one."""
    log, checkpoint = stage / "log.jsonl", stage / "checkpoint.pt"
    process = subprocess.Popen(
        command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 900
        while not (
            epochs_logged(log) >= epochs
            and checkpoint.exists()
            and checkpoint.stat().st_mtime_ns >= log.stat().st_mtime_ns
        ):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no progress in the log"
            time.sleep(0.01)
    finally:
        family = process_and_descendants(process.pid)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        while any(alive(pid) for pid in family):
            time.sleep(0.01)
    assert process.returncode == -signal.SIGKILL
    assert epochs_logged(log) == epochs


def process_and_descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):  # the thread or process just ended
            children += [int(child) for child in (task / "children").read_text().split()]
    return [pid] + [p for child in children for p in process_and_descendants(child)]


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def metrics_of(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {name: entry["metrics"] for name, entry in summary["models"].items()}


def without_timing(log: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "examples_per_second")}
        for line in log.read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory):
    """A small world whose train split is written in many small row groups."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recdistill.data.prepare, "ROW_GROUP_ROWS", 500)
        directory = build_synthetic(tmp_path_factory.mktemp("chunked"))
    return FeatureStore(directory, history_length=10)


def rows_of(batches, store):
    """(user ID, positive item ID, negative item IDs) of every list in ``batches``."""
    rows = []
    for batch in batches:
        items = batch.items["item_id"].values().numpy()[batch.candidates.numpy()]
        for user, slots in zip(batch.user_ids.tolist(), store.items.values[items - 1].tolist()):
            rows.append((user, slots[0], tuple(slots[1:])))
    return rows


def test_streamed_epochs_visit_every_train_row_once_in_a_new_order(chunked_store):
    lists = TrainLists(
        chunked_store, batch_size=300, negatives=4, seed=2, shuffle_rows=1200, block_rows=500
    )
    assert lists.blocks > 10
    epochs = [rows_of(lists.epoch(epoch), chunked_store) for epoch in (0, 1)]
    train = pq.read_table(chunked_store.directory / "train.parquet")
    expected = sorted(zip(train["user_id"].to_pylist(), train["item_id"].to_pylist()))
    for rows in epochs:
        assert sorted((user, item) for user, item, _ in rows) == expected
    assert [r[:2] for r in epochs[0]] != [r[:2] for r in epochs[1]]
    assert rows_of(lists.epoch(0), chunked_store) == epochs[0]


def test_ranks_take_equal_disjoint_shares_of_the_same_batches(chunked_store):
    def lists(rank=0, world_size=1):
        return TrainLists(
            chunked_store,
            batch_size=256,
            negatives=4,
            seed=1,
            rank=rank,
            world_size=world_size,
            shuffle_rows=1500,
            block_rows=500,
        )

    whole = list(lists().epoch(3))
    for rank in range(3):
        share = lists(rank, 3)
        assert len(share) == len(whole) // 3
        mine = list(share.epoch(3))
        assert len(mine) == len(share)
        assert rows_of(mine, chunked_store) == rows_of(whole[rank::3][: len(share)], chunked_store)


def test_a_single_process_replica_trains_the_module_itself_and_needs_no_collective():
    replica = distributed.replica(distributed.World())
    module = torch.nn.Linear(2, 1)
    rates = {"learning_rate": 0.1, "adagrad_learning_rate": 0.1, "weight_decay": 0.0}
    assert replica.wrap(module, **rates) is module
    assert replica.gather_fused_state(module) == {}
    assert replica.all_sum([3, 0.5]) == [3, 0.5]
    assert replica.from_main(lambda: {"ndcg@10": 0.25}) == {"ndcg@10": 0.25}
    assert replica.is_main and [replica.global_batch(k) for k in range(3)] == [0, 1, 2]


def test_the_ranks_of_a_sharded_replica_take_turns_at_an_epochs_batches():
    ranks = [distributed.replica(distributed.World(rank=r, size=2)) for r in range(2)]
    assert all(isinstance(replica, distributed.ShardedReplica) for replica in ranks)
    assert [[replica.global_batch(k) for k in range(3)] for replica in ranks] == [
        [0, 2, 4],
        [1, 3, 5],
    ]


# 2: feature tables replicated, the others sharded; 8: every table sharded, so that the
# sharded collections return their features in another order than their tables. A
# sequence model trains on next-item windows, its history table sharded as a sequence, or,
# 6 wide (too narrow for the fused kernel), left whole and replicated.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("feature_dim", "encoder", "embedding_dim"),
    [(2, "bag", 8), (8, "bag", 8), (2, SEQUENCE, 8), (2, SEQUENCE, 6)],
    ids=["2", "8", SEQUENCE, f"{SEQUENCE}-replicated"],
)
def test_sharded_scores_equal_a_single_process_model_with_the_same_weights(
    synthetic_dir, tmp_path, feature_dim, encoder, embedding_dim
):
    run(
        [
            *TORCHRUN,
            str(PROJECT / "tests" / "distributed_worker.py"),
            str(synthetic_dir),
            str(tmp_path),
            str(feature_dim),
            encoder,
            str(embedding_dim),
        ]
    )
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["world_size"] == 2
    store = FeatureStore(synthetic_dir, history_length=10)
    # Each rank ran its own batches.
    if encoder == SEQUENCE:
        shares = [
            TrainSequences(
                store,
                max_length=spec(feature_dim, encoder, embedding_dim).max_length,
                batch_size=SEQUENCE_STAGE.batch_size,
                negatives=SEQUENCE_STAGE.negatives,
                seed=SEQUENCE_STAGE.seed,
                rank=rank,
                world_size=2,
            )
            for rank in range(2)
        ]
        firsts = [batch for share in shares for batch in itertools.islice(share.epoch(0), STEPS)]
        assert stats["examples"] == sum(batch.examples for batch in firsts)
        sequence_plan = stats["plan"].get("model.user_tower.sequence.embeddings")
        if embedding_dim % 4 == 0:
            assert sequence_plan == {"table_history_sequence": "table_wise"}
        else:
            assert sequence_plan is None
    else:
        assert stats["examples"] == 2 * STEPS * STAGE.batch_size
    torch.manual_seed(0)
    model = TwoTower(
        spec(feature_dim, encoder, embedding_dim),
        FeatureSpace.of(store),
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    weights = load_file(str(tmp_path / "weights.safetensors"))
    trained_tables = [k for k in weights if "embedding_bags." in k or "embeddings.embeddings." in k]
    # user_id, history, the user features and the item keys: bags, or the history a sequence.
    assert len(trained_tables) == 2 + len(store.user_features) + len(ITEM_KEYS)
    assert all(not torch.equal(weights[k], initial[k]) for k in trained_tables)
    model.load_state_dict(weights)
    model.eval()
    sharded = load_file(str(tmp_path / "scores.safetensors"))
    batches = list(CandidateLists(store, "valid", batch_size=64))[:SCORED_BATCHES]
    with torch.no_grad():
        for index, batch in enumerate(batches):
            # Equal up to float32 rounding: fbgemm's kernels pool in their own order.
            torch.testing.assert_close(sharded[f"batch_{index}"], model(batch), rtol=0, atol=1e-5)
        if encoder == SEQUENCE:
            next_item, _ = model.next_item_scores(sequence_batch(store))
            torch.testing.assert_close(sharded["next_item"], next_item, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", [ONE_STAGE, SEQUENCE_TEACHER], ids=["bag", SEQUENCE])
def test_killed_sharded_run_resumes_to_the_same_result(synthetic_dir, tmp_path, teacher):
    config = tmp_path / "teacher.toml"
    config.write_text(teacher)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run(train_command(config, synthetic_dir, straight, launcher=TORCHRUN))

    run_and_kill(
        train_command(config, synthetic_dir, cut, launcher=TORCHRUN),
        cut / "teacher",
        1,
    )
    assert not (cut / "summary.json").exists()
    run(train_command(config, synthetic_dir, cut, launcher=TORCHRUN, resume=True))

    assert metrics_of(cut) == metrics_of(straight)
    assert without_timing(cut / "teacher" / "log.jsonl") == without_timing(
        straight / "teacher" / "log.jsonl"
    )
    best = load_file(str(straight / "teacher" / "model.safetensors"))
    resumed = load_file(str(cut / "teacher" / "model.safetensors"))
    assert all(torch.equal(best[k], resumed[k]) for k in best)


@pytest.mark.slow
def test_killed_sharded_distillation_on_ranked_lists_resumes_to_the_same_result(
    synthetic_dir, tmp_path
):
    config = tmp_path / "student.toml"
    config.write_text(RANKED_LISTS_STUDENT)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run(train_command(config, synthetic_dir, straight, launcher=TORCHRUN))
    assert len(list((straight / "teacher").glob("train_states_teacher_*.npy"))) == 1

    run_and_kill(train_command(config, synthetic_dir, cut, launcher=TORCHRUN), cut / "student", 1)
    run(train_command(config, synthetic_dir, cut, launcher=TORCHRUN, resume=True))
    assert metrics_of(cut) == metrics_of(straight)
    assert without_timing(cut / "student" / "log.jsonl") == without_timing(
        straight / "student" / "log.jsonl"
    )


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_in_a_single_process(synthetic_dir, tmp_path):
    config = tmp_path / "teacher.toml"
    config.write_text(ONE_STAGE)
    out = tmp_path / "run"
    log = out / "teacher" / "log.jsonl"
    run_and_kill(train_command(config, synthetic_dir, out, launcher=TORCHRUN), out / "teacher", 2)
    sharded_epochs = without_timing(log)[:2]

    run(train_command(config, synthetic_dir, out, resume=True))
    epochs = without_timing(log)
    assert epochs[: len(sharded_epochs)] == sharded_epochs
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert set(metrics_of(out)) == {"teacher", "popularity", "ease", "ease_recency"}


@pytest.mark.slow
def test_killed_single_process_run_resumes_to_the_same_result(tiny_run, synthetic_dir, tmp_path):
    config, straight = tiny_run
    out = tmp_path / "cut"
    run_and_kill(train_command(config, synthetic_dir, out), out / "teacher", 1)
    run(train_command(config, synthetic_dir, out, resume=True))
    assert metrics_of(out) == metrics_of(straight)


@pytest.mark.slow
def test_a_loss_that_turns_nan_on_one_rank_stops_every_rank_at_the_same_batch(
    synthetic_dir, tmp_path
):
    run(
        [
            *TORCHRUN,
            str(PROJECT / "tests" / "diverging_worker.py"),
            str(synthetic_dir),
            str(tmp_path),
        ],
        timeout=600,
    )
    advice = "; the last good checkpoint (epoch 0) is kept: lower the learning rate and rerun "
    where = "stage 'sharded' diverged at epoch 1, batch 2: "
    assert (tmp_path / "rank1.txt").read_text() == f"{where}loss is nan{advice}with --resume"
    assert (tmp_path / "rank0.txt").read_text() == (
        f"{where}the loss or gradients of another rank are not finite{advice}with --resume"
    )
    checkpoint = torch.load(tmp_path / "stage" / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["epoch"] == 0
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
