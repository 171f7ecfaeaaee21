import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recdistill.data.batches import CandidateLists, TrainLists
from recdistill.data.feature_store import FeatureStore, Vocabulary

HISTORY = 8


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=HISTORY)


def frame(directory, name):
    return pq.read_table(directory / f"{name}.parquet").to_pandas()


def slot_item_ids(store, batch):
    """External item ID of every list slot, ``[lists, list_size]``."""
    rows = batch.items["item_id"].values().numpy()
    return store.items.values[rows[batch.candidates.numpy()] - 1]


def rows_of(kjt, key):
    return [t.tolist() for t in kjt[key].to_dense()]


def test_vocabulary_reserves_zero_for_unknown():
    vocabulary = Vocabulary.of(np.array([30, 10, 20, 10]))
    assert len(vocabulary) == 4
    assert vocabulary.index(np.array([10, 20, 30, 15, 99])).tolist() == [1, 2, 3, 0, 0]


def test_train_batch_contents_match_the_source_rows(store, synthetic_dir):
    train = frame(synthetic_dir, "train").sort_values(["timestamp", "item_id"], ascending=False)
    history_of = train.groupby("user_id", sort=False)["item_id"].apply(list)
    users = frame(synthetic_dir, "users").set_index("user_id")
    genres_of = frame(synthetic_dir, "items").set_index("item_id")["genres"]
    train_pairs = set(zip(train["user_id"], train["item_id"]))

    batch = next(TrainLists(store, batch_size=64, negatives=4, seed=1).epoch(0))
    assert batch.labels.shape == (64, 5) and batch.labels[:, 0].eq(1).all()
    assert batch.labels[:, 1:].eq(0).all() and batch.mask.all()
    user_ids = [
        store.users.values[i - 1] for i in rows_of(batch.users, "user_id")[0:64] for i in [i[0]]
    ]
    assert user_ids == batch.user_ids.tolist()
    item_ids = slot_item_ids(store, batch)
    genre_rows = rows_of(batch.items, "genres")
    assert len(genre_rows) == len(np.unique(item_ids))
    for row, user in enumerate(user_ids):
        target = item_ids[row, 0]
        assert (user, target) in train_pairs
        expected = [i for i in history_of[user] if i != target][:HISTORY]
        history = rows_of(batch.users, "history")[row]
        assert store.items.values[np.array(history, int) - 1].tolist() == expected
        for feature in ("region", "age_bucket"):
            code = rows_of(batch.users, feature)[row][0]
            assert store.feature_vocabularies[feature].values[code - 1] == users.loc[user, feature]
        for position, item in enumerate(item_ids[row]):
            item_row = batch.candidates[row, position]
            names = store.genres.values[np.array(genre_rows[item_row], int) - 1]
            assert names.tolist() == list(genres_of[item])


def test_no_leakage_into_training_batches(store, synthetic_dir):
    held_out = set()
    for split in ("valid", "test"):
        table = frame(synthetic_dir, split)
        held_out |= set(zip(table["user_id"], table["item_id"]))
    train = frame(synthetic_dir, "train")
    seen = train.groupby("user_id")["item_id"].apply(set)
    for batch in TrainLists(store, batch_size=512, negatives=9, seed=0).epoch(0):
        users = batch.user_ids.tolist()
        items = slot_item_ids(store, batch)
        histories = rows_of(batch.users, "history")
        for user, listed, history in zip(users, items, histories):
            features = set(store.items.values[np.array(history, int) - 1].tolist())
            assert not {(user, i) for i in features} & held_out
            assert (user, listed[0]) not in held_out
            assert len(set(listed)) == 10
            # Negatives avoid what the trainer may know, the user's train items. They may hit
            # a held-out item by chance: excluding those would tell training where they are.
            assert not set(listed[1:]) & seen[user]
            assert listed[0] not in features


def test_negatives_are_resampled_each_epoch_and_reproducible(store):
    lists = TrainLists(store, batch_size=256, negatives=4, seed=5)
    assert len(lists) == -(-len(store.train_users) // 256)

    def first(epoch):
        return torch.as_tensor(slot_item_ids(store, next(lists.epoch(epoch))))

    assert first(0).equal(first(0))
    assert not first(0).equal(first(1))
    total = sum(b.labels.shape[0] for b in lists.epoch(2))
    assert total == len(store.train_users)


def test_candidate_lists_follow_the_saved_lists(store, synthetic_dir):
    candidates = frame(synthetic_dir, "candidates_valid")
    train = frame(synthetic_dir, "train")
    lists = CandidateLists(store, "valid", batch_size=100)
    batches = list(lists)
    assert len(batches) == len(lists)
    assert sum(b.labels.shape[0] for b in batches) == len(candidates)
    batch = batches[0]
    assert batch.labels.shape == (100, 100) and batch.labels.sum(1).eq(1).all()
    items = slot_item_ids(store, batch)
    assert items.tolist() == [list(c) for c in candidates["candidates"][:100]]
    assert batch.user_ids.tolist() == candidates["user_id"][:100].tolist()
    # Validation histories are the whole train history, capped: no target to exclude. The
    # train split is in time order, ties in time in their seeded random order.
    user = candidates["user_id"][0]
    expected = train[train["user_id"] == user]["item_id"].tolist()[::-1][:HISTORY]
    history = rows_of(batch.users, "history")[0]
    assert store.items.values[np.array(history, int) - 1].tolist() == expected


def test_catalogue_rows_are_item_indices(store, synthetic_dir):
    catalogue = store.catalogue()
    assert catalogue["item_id"].values().tolist() == list(range(len(store.items)))
    genres_of = frame(synthetic_dir, "items").set_index("item_id")["genres"]
    rows = rows_of(catalogue, "genres")
    assert rows[0] == []
    for index in (1, 7, len(store.items) - 1):
        names = store.genres.values[np.array(rows[index], int) - 1].tolist()
        assert names == list(genres_of[store.items.values[index - 1]])


def test_test_time_histories_add_the_validation_item_as_the_newest(synthetic_dir):
    store = FeatureStore(synthetic_dir, history_length=5)
    tested = store.known_at("test")
    assert store.known_at("valid") is store
    valid = pq.read_table(
        synthetic_dir / "valid.parquet", columns=["user_id", "item_id"]
    ).to_pandas()
    for user_id, item_id in valid.itertuples(index=False):
        user = store.users.index(np.array([user_id]))[0]
        before = store.history.values[store.history.offsets[user] : store.history.offsets[user + 1]]
        after = tested.history.values[
            tested.history.offsets[user] : tested.history.offsets[user + 1]
        ]
        assert after.tolist() == [store.items.index(np.array([item_id]))[0], *before]
    # Training and negative sampling stay train-only.
    assert tested.train_seen is store.train_seen
    assert np.array_equal(tested.item_train_counts, store.item_train_counts)
    lists = CandidateLists(store, "test", batch_size=4)
    batch = next(iter(lists))
    first = lists.users[0]
    newest = batch.users["history"].to_dense()[0][0].item()
    assert newest == store.valid_items[first]


def test_the_test_time_view_is_built_once_and_is_its_own_test_view(synthetic_dir):
    store = FeatureStore(synthetic_dir, history_length=5)
    tested = store.known_at("test")
    assert store.known_at("test") is tested
    assert tested.known_at("test") is tested
