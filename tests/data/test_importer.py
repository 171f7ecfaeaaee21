import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from recdistill.api import prepare_data
from recdistill.cli import main
from recdistill.data.importer import ItemTable, UserTable
from recdistill.data.prepare import SplitSpec
from recdistill.data.tables import EXTERNAL_ID
from recdistill.layout import DataLayout
from recdistill.server import ServerSettings
from serving.app import create_app
from tests.conftest import ML100K, ONE_STAGE, SMALL_WORLD

SPLIT = SplitSpec(seed=SMALL_WORLD.seed)
TABLES = ("train", "valid", "test")


def world_tables(synthetic_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The synthetic world's interactions, users and items as a source hands them over."""
    layout = DataLayout(synthetic_dir)
    interactions = pq.read_table(layout.interactions).to_pandas()
    users = pq.read_table(layout.users, columns=["user_id", "region", "age_bucket"]).to_pandas()
    items = pq.read_table(layout.items, columns=["item_id", "title", "genres"]).to_pandas()
    return interactions, users, items


def split_rows(directory: Path, name: str, users=None, items=None) -> set[tuple]:
    """(user, item, timestamp) rows of a split, the codes read back through ``external_id``."""
    table = pq.read_table(DataLayout(directory).split(name)).to_pandas()
    for column, ids in (("user_id", users), ("item_id", items)):
        if ids is not None:
            table[column] = table[column].map(ids)
    return set(table[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None))


def external(directory: Path, table: str, column: str) -> dict[int, str]:
    frame = pq.read_table(DataLayout(directory).root / f"{table}.parquet").to_pandas()
    return dict(zip(frame[column], frame[EXTERNAL_ID]))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_csv_with_string_ids_and_iso_times_gives_the_same_split(synthetic_dir, tmp_path, capsys):
    interactions, users, items = world_tables(synthetic_dir)
    log = pd.DataFrame(
        {
            "visitor": "u" + interactions["user_id"].astype(str),
            "sku": "sku-" + interactions["item_id"].astype(str),
            "at": pd.to_datetime(interactions["timestamp"], unit="s", utc=True)
            .dt.tz_convert("Europe/Berlin")
            .map(pd.Timestamp.isoformat),
        }
    )
    log.to_csv(tmp_path / "events.csv", index=False)
    users.assign(user_id="u" + users["user_id"].astype(str)).to_csv(
        tmp_path / "users.csv", index=False
    )
    items.assign(
        item_id="sku-" + items["item_id"].astype(str), genres=items["genres"].map("|".join)
    ).to_csv(tmp_path / "items.csv", index=False)

    out = tmp_path / "data"
    status, printed, _ = run_cli(
        ["data", "import", "--interactions", tmp_path / "events.csv", "--user", "visitor"]
        + ["--item", "sku", "--time", "at", "--users", tmp_path / "users.csv"]
        + ["--user-key", "user_id", "--items", tmp_path / "items.csv", "--item-key", "item_id"]
        + ["--item-categories", "genres", "--item-title", "title", "--seed", 3, "--out", out],
        capsys,
    )
    assert status == 0 and "users 400" in printed

    user_names, item_names = external(out, "users", "user_id"), external(out, "items", "item_id")
    assert sorted(user_names.values()) == sorted("u" + users["user_id"].astype(str))
    back_users = {code: int(name[1:]) for code, name in user_names.items()}
    back_items = {code: int(name[4:]) for code, name in item_names.items()}
    for name in TABLES:
        assert split_rows(out, name, back_users, back_items) == split_rows(synthetic_dir, name)

    imported = pq.read_table(DataLayout(out).users).to_pandas()
    imported["user_id"] = imported["user_id"].map(back_users)
    original = pq.read_table(DataLayout(synthetic_dir).users).to_pandas()
    merged = imported.merge(original, on="user_id", suffixes=("", "_original"))
    assert (merged["region"] == merged["region_original"]).all()
    assert (merged["activity_tier"] == merged["activity_tier_original"]).all()
    genres = pq.read_table(DataLayout(out).items).to_pandas()
    drama = genres["genres"].map(list)[genres[EXTERNAL_ID] == "sku-1"].item()
    assert drama == list(items.loc[items["item_id"] == 1, "genres"].item())


def test_a_parquet_file_with_epoch_milliseconds_gives_the_same_data(synthetic_dir, tmp_path):
    interactions, users, items = world_tables(synthetic_dir)
    log = pa.table(
        {
            "user": interactions["user_id"],
            "item": interactions["item_id"],
            "ms": interactions["timestamp"] * 1000 + 999,  # floored to the same second
        }
    )
    pq.write_table(log, tmp_path / "events.parquet")
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), tmp_path / "items.parquet")
    out = prepare_data(
        tmp_path / "events.parquet",
        tmp_path / "data",
        user="user",
        item="item",
        time="ms",
        items=ItemTable(tmp_path / "items.parquet", "item_id", categories="genres"),
        users=UserTable(users, "user_id"),
        split=SPLIT,
        log=lambda line: None,
    )
    for name in (*TABLES, "candidates_valid", "candidates_test"):
        path = DataLayout(out).root / f"{name}.parquet"
        assert pq.read_table(path).equals(pq.read_table(DataLayout(synthetic_dir).root / path.name))
    generated = pq.read_table(DataLayout(synthetic_dir).users).drop_columns(["cold_start"])
    assert pq.read_table(DataLayout(out).users).equals(generated)
    imported_items = pq.read_table(DataLayout(out).items).to_pandas()
    assert imported_items["genres"].map(list).tolist() == items["genres"].map(list).tolist()


def test_json_lines_with_ratings_keep_the_well_rated(tmp_path):
    rows = [
        {"u": "ann", "i": "x", "t": "2024-01-01T10:00:00Z", "stars": 5},
        {"u": "ann", "i": "y", "t": "2024-01-01T11:00:00Z", "stars": 2},
        {"u": "ann", "i": "z", "t": "2024-01-01T12:00:00Z", "stars": 4},
        {"u": "ann", "i": "w", "t": "2024-01-02T12:00:00Z", "stars": 4.5},
        {"u": "bob", "i": "x", "t": "2024-01-01T10:00:00+02:00", "stars": 3},
        {"u": "cy", "i": "v", "t": "2024-01-01T10:00:00", "stars": 4},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    notes = []
    out = prepare_data(
        path, tmp_path / "data", user="u", item="i", time="t", rating="stars", min_rating=3,
        split=SplitSpec(negatives=1), log=notes.append,
    )  # fmt: skip
    interactions = pq.read_table(DataLayout(out).interactions).to_pandas()
    assert len(interactions) == 5 and interactions["rating"].min() == 3
    bob = external(out, "users", "user_id")
    bob_code = next(code for code, name in bob.items() if name == "bob")
    bob_time = interactions.loc[interactions["user_id"] == bob_code, "timestamp"].item()
    assert bob_time == pd.Timestamp("2024-01-01T08:00:00Z").timestamp()
    assert notes == [
        f"{path}: 6 rows read",
        "min rating 3: dropped 1 of 6 rows rated lower",
        "kept 5 distinct (user, item) pairs of 3 users and 4 items",
    ]


def test_ml100k_written_as_plain_csv_imports_to_the_movielens_split(ml100k_dir, tmp_path, capsys):
    ratings = pd.read_csv(
        ML100K / "u.data", sep="\t", names=["user", "movie", "stars", "when"], header=None
    )
    ratings.to_csv(tmp_path / "ratings.csv", index=False)
    users = pq.read_table(DataLayout(ml100k_dir).users).to_pandas()
    users[["user_id", "gender", "age_bucket", "occupation"]].to_csv(
        tmp_path / "users.csv", index=False
    )
    items = pq.read_table(DataLayout(ml100k_dir).items).to_pandas()
    items.assign(genres=items["genres"].map("|".join))[["item_id", "title", "genres"]].to_csv(
        tmp_path / "items.csv", index=False
    )
    out = tmp_path / "data"
    status, _, _ = run_cli(
        ["data", "import", "--interactions", tmp_path / "ratings.csv", "--user", "user"]
        + ["--item", "movie", "--time", "when", "--rating", "stars", "--out", out]
        + ["--users", tmp_path / "users.csv", "--user-key", "user_id"]
        + ["--items", tmp_path / "items.csv", "--item-key", "item_id"]
        + ["--item-categories", "genres", "--item-title", "title"],
        capsys,
    )
    assert status == 0
    for name in (*TABLES, "candidates_valid", "candidates_test", "users", "items"):
        path = DataLayout(out).root / f"{name}.parquet"
        assert pq.read_table(path).equals(pq.read_table(DataLayout(ml100k_dir).root / path.name))
    imported, original = (json.loads(DataLayout(d).meta.read_text()) for d in (out, ml100k_dir))
    assert imported["user_segments"] == original["user_segments"]


def test_k_core_drops_thin_users_and_items_before_the_split(tmp_path, capsys):
    rows = ["user,item,time"]
    rows += [f"a,{item},{t}" for t, item in enumerate("pqrsz")]  # only a chose z
    rows += ["a,p,10"]  # a repeated event
    for user, items in (("b", "pqrt"), ("e", "qrst"), ("f", "stp")):
        rows += [f"{user},{item},{t}" for t, item in enumerate(items)]
    rows += ["c,p,9"]  # c chose one item
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "split.toml").write_text("[data.split]\nnegatives = 1\n")
    status, printed, _ = run_cli(
        ["data", "import", "--interactions", tmp_path / "log.csv", "--user", "user"]
        + ["--item", "item", "--time", "time", "--k-core", 2, "--out", tmp_path / "data"]
        + ["--config", tmp_path / "split.toml"],
        capsys,
    )
    assert status == 0
    assert "repeated events: 1 rows repeat an earlier (user, item) pair" in printed
    log = tmp_path / "log.csv"
    assert f"{log} line 19, column 'user': user 'c' and 0 other users have fewer than 2" in printed
    assert f"{log} line 6, column 'item': item 'z' and 0 other items have fewer than 2" in printed
    names = external(tmp_path / "data", "users", "user_id")
    assert sorted(names.values()) == ["a", "b", "e", "f"]
    assert len(pq.read_table(DataLayout(tmp_path / "data").interactions)) == 16


HEADER = "user,item,time\n"


@pytest.mark.parametrize(
    ("files", "flags", "message"),
    [
        ({"log.csv": "user,item\nu,i\n"}, [], "log.csv line 1: no column 'time'; the columns are"),
        (
            {"log.csv": HEADER + "u,i,2024-01-01\n\nu,j,yesterday\n"},
            [],
            "log.csv line 4: column 'time': timestamp 'yesterday' is not an ISO-8601 time",
        ),
        ({"log.csv": ""}, [], "log.csv: file is empty, expected a header row"),
        ({"log.csv": HEADER}, [], "log.csv: file has no rows"),
        (
            {"log.csv": HEADER + "u,i,1\n,j,2\n"},
            [],
            "log.csv line 3: column 'user': no value",
        ),
        (
            {"log.csv": HEADER + "u,i,1\n", "users.csv": "uid,gender\nx1,F\nx2,M\n"},
            ["--users", "users.csv", "--user-key", "uid"],
            (
                "users.csv line 2: column 'uid': no user ID of this table has an interaction "
                "(first: 'x1')"
            ),
        ),
        (
            {"log.csv": HEADER + "u,i,1\n", "users.csv": "user,gender\nu,F\nu,M\n"},
            ["--users", "users.csv"],
            "users.csv line 3: column 'user': user 'u' again (line 2)",
        ),
        (
            {"log.csv": HEADER + "u,i,1\nv,i,2\n"},
            ["--k-core", 2],
            "log.csv: no interactions remain to import",
        ),
        ({"log.txt": HEADER}, [], "log.txt: unknown format '.txt'"),
        (
            {"log.csv": "user,item,time,time\nu,i,1,2\n"},
            [],
            "log.csv line 1: the header names column 'time' twice",
        ),
        (
            {"log.csv": "user,user,item,time\nu,v,i,1\n"},
            [],
            "log.csv line 1: the header names column 'user' twice",
        ),
        (
            {"log.csv": HEADER + "u,i,1\nu,j,2,extra\n"},
            [],
            "log.csv line 3: 4 fields where the header (line 1) has 3",
        ),
        (
            {"log.csv": HEADER + "u,i,1\n\nu,j\n"},
            [],
            "log.csv line 4: 2 fields where the header (line 1) has 3",
        ),
        (
            {"log.csv": "user;item;time\nu;i;1\n"},
            [],
            (
                "log.csv line 1: no column 'user'; the columns are user;item;time; is the "
                "file separated by ';'? say so with --delimiter"
            ),
        ),
        (
            {"log.jsonl": '{"user": "u", "item": "i", "time": 1}\n{"user": "u", "user": "v"}\n'},
            [],
            "log.jsonl line 2: the object names 'user' twice",
        ),
    ],
)
def test_a_bad_import_is_one_line_naming_file_line_and_column(
    files, flags, message, tmp_path, capsys
):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    log = next(name for name in files if name.startswith("log"))
    out = tmp_path / "data"
    argv = ["data", "import", "--interactions", tmp_path / log, "--user", "user"]
    argv += ["--item", "item", "--time", "time", "--out", out]
    argv += [tmp_path / flag if str(flag).endswith(".csv") else flag for flag in flags]
    status, _, error = run_cli(argv, capsys)
    assert status == 2
    assert error.startswith("recdistill: error: ") and error.count("\n") == 1
    assert message in error.replace(f"{tmp_path}/", "")
    assert not out.exists() and not list(tmp_path.glob(".data*"))


def test_a_byte_the_encoding_cannot_read_is_named_and_encoding_reads_it(tmp_path, capsys):
    log = tmp_path / "log.csv"
    rows = "u,caf\u00e9,1\nv,th\u00e9,2\nu,tea,3\nv,tea,4\nu,milk,5\nv,milk,6\n"
    log.write_bytes(("user,item,time\n" + rows).encode("cp1252"))
    (tmp_path / "s.toml").write_text("[data.split]\nnegatives = 1\n")
    argv = ["data", "import", "--interactions", log, "--user", "user", "--item", "item"]
    argv += ["--time", "time", "--out", tmp_path / "data", "--config", tmp_path / "s.toml"]
    status, _, error = run_cli(argv, capsys)
    assert status == 2 and error.count("\n") == 1
    assert (
        f"{log} line 2: byte 0xe9 (byte 6 of the line, offset 20 in the file) is not utf-8: "
        "give the file's encoding, such as --encoding cp1252"
    ) in error
    assert run_cli([*argv, "--encoding", "cp1252"], capsys)[0] == 0
    items = sorted(external(tmp_path / "data", "items", "item_id").values())
    assert items == ["café", "milk", "tea", "thé"]


def test_delimiter_reads_a_semicolon_or_tab_file(tmp_path):
    rows = [("u", "i", 1), ("u", "j", 2), ("u", "k", 3), ("v", "i", 4), ("v", "m", 5)]
    for delimiter, flag in ((";", ";"), ("\t", "tab")):
        log = tmp_path / f"log{len(flag)}.csv"
        log.write_text("\n".join(delimiter.join(map(str, r)) for r in [("a", "b", "t"), *rows]))
        out = prepare_data(
            log, tmp_path / f"data{len(flag)}", user="a", item="b", time="t", delimiter=flag,
            split=SplitSpec(negatives=1), log=lambda line: None,
        )  # fmt: skip
        assert len(pq.read_table(DataLayout(out).interactions)) == 5


def test_the_counts_say_rows_read_pairs_kept_and_what_each_rule_dropped(tmp_path, capsys):
    rows = ["user,item,time"] + [
        f"u{u},i{(u + k) % 5},{t}" for t in range(3) for u in range(4) for k in range(3)
    ]
    rows += ["u9,i0,1", "u0,i9,1"]  # a user and an item seen once: the 2-core drops them
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    argv = ["data", "import", "--interactions", tmp_path / "log.csv", "--user", "user"]
    argv += ["--item", "item", "--time", "time", "--k-core", 2, "--out", tmp_path / "data"]
    argv += ["--config", tmp_path / "split.toml"]
    (tmp_path / "split.toml").write_text("[data.split]\nnegatives = 1\n")
    status, printed, _ = run_cli(argv, capsys)
    assert status == 0
    lines = printed.splitlines()
    assert lines[0] == f"{tmp_path / 'log.csv'}: 38 rows read"
    assert "repeated events: 24 rows repeat an earlier (user, item) pair" in lines[1]
    assert "k-core 2: 36 of 38 rows remain" in printed
    assert "kept 12 distinct (user, item) pairs of 4 users and 5 items" in printed
    assert "interactions 12 (36 rows, 24 repeats dropped)" in printed


def test_an_existing_out_is_refused_unless_forced(tmp_path, capsys):
    (tmp_path / "log.csv").write_text(HEADER + "u,i,1\nu,j,2\nu,k,3\nv,i,4\nv,m,5\n")
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = ["data", "import", "--interactions", tmp_path / "log.csv", "--user", "user"]
    argv += ["--item", "item", "--time", "time", "--out", out, "--config", tmp_path / "s.toml"]
    (tmp_path / "s.toml").write_text("[data.split]\nnegatives = 1\n")
    status, _, error = run_cli(argv, capsys)
    assert status == 2 and f"{out} already exists: pass --force" in error
    assert (out / "mine.txt").read_text() == "keep me"
    assert run_cli([*argv, "--force"], capsys)[0] == 0
    assert not (out / "mine.txt").exists() and DataLayout(out).interactions.exists()


def test_a_bad_parquet_row_is_named_by_row(tmp_path):
    table = pa.table({"u": [1, 2, 3], "i": [1, 1, 2], "t": [1.0, np.nan, 3.0]})
    pq.write_table(table, tmp_path / "log.parquet")
    with pytest.raises(ValueError, match=r"log.parquet row 2: column 't': no value"):
        prepare_data(tmp_path / "log.parquet", tmp_path / "data", user="u", item="i", time="t")


def test_an_imported_run_trains_and_ranks_with_the_user_s_own_ids(tmp_path):
    rng = np.random.default_rng(0)
    users = rng.integers(0, 60, size=3000)
    events = pd.DataFrame(
        {
            "visitor": [f"v{u}" for u in users],
            "sku": [f"sku-{(u * 7 + rng.integers(0, 25)) % 300}" for u in users],
            "ts": 1_700_000_000 + np.arange(3000) * 60,
        }
    )
    config = tmp_path / "config.toml"
    config.write_text(ONE_STAGE.replace("epochs = 3", "epochs = 1"))
    data = prepare_data(events, tmp_path / "data", user="visitor", item="sku", time="ts")
    assert (
        main(
            ["train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run")]
        )
        == 0
    )
    assert (
        main(
            [
                "export",
                "--run",
                str(tmp_path / "run"),
                "--model",
                "teacher",
                "--out",
                str(tmp_path / "art"),
            ]
        )
        == 0
    )
    from recdistill.api import load_ranker

    ranker = load_ranker(tmp_path / "art")
    ranking = ranker.rank("v3", ["sku-21", "sku-1", "nope"], k=3)
    # An ID of the wrong kind is refused, as POST /rank refuses it, not ranked as unknown.
    with pytest.raises(ValueError, match="user_id: the model 'teacher' has strings as IDs"):
        ranker.rank(3, ["sku-21", "sku-1"])
    with pytest.raises(ValueError, match="item IDs: the model 'teacher' has strings as IDs"):
        ranker.rank("v3", ["sku-21", 1])
    assert sorted(item for item, _ in ranking) == ["nope", "sku-1", "sku-21"]
    assert [score for _, score in ranking] == sorted((s for _, s in ranking), reverse=True)

    settings = ServerSettings(
        artifacts=(str(tmp_path / "art"),), impressions=str(tmp_path / "impressions.jsonl")
    )
    with TestClient(create_app(settings)) as client:
        body = {"user_id": "v3", "candidates": ["sku-21", "sku-1", "nope"], "k": 3}
        served = client.post("/rank", json=body).json()
        assert [i["item_id"] for i in served["items"]] == [item for item, _ in ranking]
        assert [i["score"] for i in served["items"]] == pytest.approx([s for _, s in ranking])
        assert served["unknown_items"] == ["nope"] and not served["cold_start"]
        wrong = client.post("/rank", json={"user_id": 3, "candidates": ["sku-1"]})
        assert wrong.status_code == 422
        assert "user_id: the model 'teacher' has strings as IDs" in wrong.text
