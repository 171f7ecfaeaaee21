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
    # The split's rows are in time order per user (ties in the split's seeded order).
    train = frame(synthetic_dir, "train")
    items_of = train.groupby("user_id", sort=False)["item_id"].apply(list)
    users = frame(synthetic_dir, "users").set_index("user_id")
    genres_of = frame(synthetic_dir, "items").set_index("item_id")["genres"]

    batch = next(TrainLists(store, batch_size=64, negatives=4, seed=1).epoch(0))
    assert batch.labels.shape == (64, 5) and batch.labels[:, 0].eq(1).all()
    assert batch.labels[:, 1:].eq(0).all() and batch.mask.all()
    user_ids = [store.users.values[i[0] - 1] for i in rows_of(batch.users, "user_id")]
    assert user_ids == batch.user_ids.tolist()
    item_ids = slot_item_ids(store, batch)
    genre_rows = rows_of(batch.items, "genres")
    assert len(genre_rows) == len(np.unique(item_ids))
    for row, (user, train_row) in enumerate(zip(user_ids, batch.train_rows.tolist())):
        target = item_ids[row, 0]
        assert (train["user_id"][train_row], train["item_id"][train_row]) == (user, target)
        before = items_of[user][: items_of[user].index(target)]
        expected = before[::-1][:HISTORY]  # the newest first
        history = rows_of(batch.users, "history")[row]
        assert store.items.values[np.array(history, int) - 1].tolist() == expected
        for feature in ("region", "age_bucket"):
            code = rows_of(batch.users, feature)[row][0]
            assert store.feature_vocabularies[feature].values[code - 1] == users.loc[user, feature]
        for position, item in enumerate(item_ids[row]):
            item_row = batch.candidates[row, position]
            names = store.genres.values[np.array(genre_rows[item_row], int) - 1]
            assert names.tolist() == list(genres_of[item])


@pytest.mark.parametrize("world", ["synthetic", "ml-100k"])
def test_no_training_list_reads_an_item_later_than_its_positive(world, request):
    directory = request.getfixturevalue("synthetic_dir" if world == "synthetic" else "ml100k_dir")
    store = FeatureStore(directory, history_length=50)
    train = frame(directory, "train")
    # Each (user, item) is one train row; its place in the user's order and its time.
    order = train.groupby("user_id").cumcount().to_numpy()
    place = dict(zip(zip(train["user_id"], train["item_id"]), zip(order, train["timestamp"])))
    lists, read = 0, 0
    for batch in TrainLists(store, batch_size=4096, negatives=1, seed=0).epoch(0):
        items = slot_item_ids(store, batch)[:, 0]
        for user, positive, history in zip(
            batch.user_ids.tolist(), items, rows_of(batch.users, "history")
        ):
            when, time = place[user, positive]
            for item in store.items.values[np.array(history, int) - 1]:
                earlier, earlier_time = place[user, item]
                assert earlier < when and earlier_time <= time
            lists += 1
            read += len(history)
    assert lists == store.train_rows and read > 0


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
    assert len(lists) == -(-store.train_rows // 256)

    def first(epoch):
        return torch.as_tensor(slot_item_ids(store, next(lists.epoch(epoch))))

    assert first(0).equal(first(0))
    assert not first(0).equal(first(1))
    total = sum(b.labels.shape[0] for b in lists.epoch(2))
    assert total == store.train_rows


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
