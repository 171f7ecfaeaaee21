import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdistill.data.prepare import SplitSpec, prepare
from recdistill.data.tables import RawDataset, read_meta, write_raw
from recdistill.files import atomic_output_dir


def write_tiny(directory, rows, n_items=300, users=None):
    """rows: (user, item, timestamp) triples; items 1..n_items, one genre each."""
    user, item, timestamp = (np.array(column, dtype=np.int64) for column in zip(*rows))
    user_ids = np.array(sorted(set(user) | set(users or [])), dtype=np.int64)
    write_raw(
        directory,
        RawDataset(
            source="tiny",
            interactions=pa.table(
                {
                    "user_id": user,
                    "item_id": item,
                    "timestamp": timestamp,
                    "rating": np.ones(len(user), np.float32),
                }
            ),
            users=pa.table(
                {"user_id": user_ids, "gender": ["F" if u % 2 else "M" for u in user_ids]}
            ),
            items=pa.table(
                {
                    "item_id": np.arange(1, n_items + 1),
                    "title": [f"t{i}" for i in range(1, n_items + 1)],
                    "genres": [[f"g{i % 3}"] for i in range(1, n_items + 1)],
                }
            ),
            user_features=("gender",),
        ),
    )
    return directory


def frame(directory, name):
    return pq.read_table(directory / f"{name}.parquet").to_pandas()


def test_leave_one_out_by_time(tmp_path):
    rows = [
        (7, 30, 100),
        (7, 10, 300),
        (7, 20, 200),
        (7, 40, 400),
        (9, 5, 50),
        (9, 6, 40),
    ]  # too short to hold out
    prepare(write_tiny(tmp_path, rows), SplitSpec(negatives=5))
    test, valid, train = frame(tmp_path, "test"), frame(tmp_path, "valid"), frame(tmp_path, "train")
    assert test[["user_id", "item_id"]].values.tolist() == [[7, 40]]
    assert valid[["user_id", "item_id"]].values.tolist() == [[7, 10]]
    assert train[["user_id", "item_id"]].values.tolist() == [[7, 30], [7, 20], [9, 6], [9, 5]]
    meta = read_meta(tmp_path)
    assert meta["users_evaluated"] == 1
    assert meta["splits"] == {"train": 4, "valid": 1, "test": 1}


def held_out_of_tied_users(directory, seed):
    """Which of two same-second items is held out, for 200 users whose last three tie."""
    rows = []
    for user in range(200):
        rows += [(user, 1, 10), (user, 2 + user, 20), (user, 299 - user, 20), (user, 300, 5)]
    directory.mkdir()
    prepare(write_tiny(directory, rows), SplitSpec(negatives=5, seed=seed))
    test = frame(directory, "test").set_index("user_id")["item_id"]
    valid = frame(directory, "valid").set_index("user_id")["item_id"]
    return test, valid


def test_ties_in_time_are_broken_by_a_seeded_random_key_not_by_item_id(tmp_path):
    test, valid = held_out_of_tied_users(tmp_path / "a", seed=0)
    # Both tied items are held out; which one is the test item is a coin flip per user.
    assert all({test[u], valid[u]} == {2 + u, 299 - u} for u in range(200))
    higher_id_held_out = np.mean([test[u] == max(2 + u, 299 - u) for u in range(200)])
    assert 0.35 < higher_id_held_out < 0.65
    same, _ = held_out_of_tied_users(tmp_path / "b", seed=0)
    other, _ = held_out_of_tied_users(tmp_path / "c", seed=1)
    assert same.equals(test)
    assert not other.equals(test)


def test_repeated_pairs_keep_only_the_latest(tmp_path):
    rows = [(1, 10, 100), (1, 11, 200), (1, 12, 300), (1, 10, 400)]
    prepare(write_tiny(tmp_path, rows), SplitSpec(negatives=5))
    assert frame(tmp_path, "test")["item_id"].tolist() == [10]
    assert 10 not in frame(tmp_path, "train")["item_id"].tolist()
    assert read_meta(tmp_path)["duplicate_pairs_dropped"] == 1


def test_candidates_are_held_out_first_then_never_seen_items(synthetic_dir):
    interactions = frame(synthetic_dir, "interactions")
    seen = interactions.groupby("user_id")["item_id"].apply(set)
    all_items = set(frame(synthetic_dir, "items")["item_id"])
    for split in ("valid", "test"):
        held_out = frame(synthetic_dir, split).set_index("user_id")["item_id"]
        candidates = frame(synthetic_dir, f"candidates_{split}")
        assert len(candidates) == len(held_out) == read_meta(synthetic_dir)["users_evaluated"]
        for user, item, items in candidates.itertuples(index=False):
            assert item == held_out[user] == items[0]
            assert len(items) == 100 and len(set(items)) == 100
            assert not set(items[1:]) & seen[user]
            assert set(items) <= all_items


def test_held_out_items_never_reach_train(synthetic_dir):
    train = frame(synthetic_dir, "train")
    train_pairs = set(zip(train["user_id"], train["item_id"]))
    for split in ("valid", "test"):
        held = frame(synthetic_dir, split)
        assert not set(zip(held["user_id"], held["item_id"])) & train_pairs
    test, valid = frame(synthetic_dir, "test"), frame(synthetic_dir, "valid")
    last_train = train.groupby("user_id")["timestamp"].max()
    merged = test.merge(valid, on="user_id", suffixes=("_test", "_valid"))
    assert (merged["timestamp_test"] >= merged["timestamp_valid"]).all()
    assert (
        merged.set_index("user_id")["timestamp_valid"]
        >= last_train.reindex(merged["user_id"]).values
    ).all()


def test_segments(tmp_path):
    # user u has u + 2 interactions (train count u); item 1 is by far the most popular
    rows = []
    for user in range(1, 21):
        rows += [(user, 1 if k == 0 else 100 + 20 * user + k, k) for k in range(user + 2)]
    meta = prepare(
        write_tiny(tmp_path, rows, n_items=600, users=[99]),
        SplitSpec(negatives=5, activity_quantiles=(0.25, 0.5, 0.75), popularity_shares=(0.05, 0.5)),
    )
    users = frame(tmp_path, "users").set_index("user_id")
    assert users.loc[1:20, "n_train"].tolist() == list(range(1, 21))
    assert users.loc[[1, 5, 6, 10, 11, 15, 16, 20], "activity_tier"].tolist() == [
        "cold",
        "cold",
        "light",
        "light",
        "medium",
        "medium",
        "heavy",
        "heavy",
    ]
    assert users.loc[99, "n_train"] == 0
    items = frame(tmp_path, "items").set_index("item_id")
    assert items.loc[1, "popularity_tier"] == "head"
    assert items.loc[599, "popularity_tier"] == "tail"  # never interacted with
    assert (items["popularity_tier"] == "torso").sum() > 0
    assert meta["user_segments"] == ["activity_tier", "gender"]


def test_failed_write_leaves_the_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out) as scratch:
        (scratch / "half.parquet").write_text("partial")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with atomic_output_dir(out) as scratch:
        (scratch / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_partitioned_prepare_writes_the_same_tables_as_one_partition(tmp_path, monkeypatch):
    import recdistill.data.prepare as module
    from recdistill.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(users=300, items=400, mean_activity=20.0, seed=5)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for directory in (whole, parts):
        directory.mkdir()
        generate(spec, directory)
    prepare(whole, SplitSpec(negatives=9))
    monkeypatch.setattr(module, "PARTITION_ROWS", 1500)
    monkeypatch.setattr(module, "SCAN_ROWS", 700)
    prepare(parts, SplitSpec(negatives=9))
    assert read_meta(whole) == read_meta(parts)
    for name in ("train", "valid", "test", "candidates_valid", "candidates_test", "users", "items"):
        assert pq.read_table(whole / f"{name}.parquet").equals(
            pq.read_table(parts / f"{name}.parquet")
        )
    assert sorted(p.name for p in parts.iterdir()) == sorted(p.name for p in whole.iterdir())
