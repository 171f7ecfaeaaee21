import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from recdistill.data import movielens
from recdistill.data.movielens import age_bucket, read_movielens
from recdistill.data.tables import INTERACTIONS_SCHEMA
from recdistill.errors import DataFormatError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Licensed data: read in place, never copied into the project.
ML100K = PROJECT_ROOT.parent / "shared" / "datasets" / "ml-100k"

# --- tiny hand-written layouts ---------------------------------------------------------

GENRE = "unknown|0\nAction|1\nComedy|2\n"
DATA = "2\t10\t4\t100\n1\t10\t5\t200\n1\t20\t3\t300\n"
USER = "1|24|M|technician|85711\n2|17|F|student|12345\n3|56|M|retired|00000\n"
ITEM = (
    "10|Café (1995)|01-Jan-1995||http://x/10|0|1|1\n"
    "20|Nothing (1996)|01-Jan-1996||http://x/20|1|0|0\n"
    "30|Unrated (1997)|01-Jan-1997||http://x/30|0|0|0\n"
)
ML100K_FILES = {"u.data": DATA, "u.user": USER, "u.item": ITEM, "u.genre": GENRE}

RATINGS = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n6,2,0.5,5\n"
MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children\n"
    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
    '3,"Title ""Quoted"" (2020)",(no genres listed)\n'
    "4,Never Rated (1990),Drama\n"
)
LATEST_FILES = {"ratings.csv": RATINGS, "movies.csv": MOVIES}


def write_layout(directory: Path, files: dict[str, str], encoding: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        # newline="" so "\r\n" in a test string reaches the file as written.
        with open(directory / name, "w", encoding=encoding, newline="") as out:
            out.write(text)
    return directory


def ml100k(directory: Path, replace: dict[str, str] | None = None) -> Path:
    """The tiny ml-100k layout, with the files named in ``replace`` given other content."""
    return write_layout(directory, {**ML100K_FILES, **(replace or {})}, "latin-1")


def latest(directory: Path, replace: dict[str, str] | None = None) -> Path:
    """The tiny ml-latest layout, with the files named in ``replace`` given other content."""
    return write_layout(directory, {**LATEST_FILES, **(replace or {})}, "utf-8")


def layout_with(directory: Path, name: str, text: str) -> Path:
    """The tiny layout that has file ``name``, with ``text`` as its content."""
    layout = ml100k if name.startswith("u.") else latest
    return layout(directory, {name: text})


def read_error(directory: Path, name: str, text: str) -> tuple[Path, DataFormatError]:
    """The tiny layout with ``name`` holding ``text``, and the error reading it raises."""
    directory = layout_with(directory, name, text)
    with pytest.raises(DataFormatError) as caught:
        read_movielens(directory)
    return directory, caught.value


def interactions(rows: list[tuple[int, int, int, float]]) -> pa.Table:
    user, item, timestamp, rating = zip(*rows)
    return pa.table(
        {"user_id": user, "item_id": item, "timestamp": timestamp, "rating": rating},
        schema=INTERACTIONS_SCHEMA,
    )


def items(rows: list[tuple[int, str, list[str]]]) -> pa.Table:
    item_id, title, genres = zip(*rows)
    return pa.table(
        {
            "item_id": pa.array(item_id, pa.int64()),
            "title": pa.array(title, pa.string()),
            "genres": pa.array(genres, pa.list_(pa.string())),
        }
    )


def assert_tables_equal(actual: pa.Table, expected: pa.Table) -> None:
    assert actual.schema == expected.schema
    assert actual.to_pylist() == expected.to_pylist()


# --- the real ml-100k -----------------------------------------------------------------


@pytest.mark.skipif(not ML100K.is_dir(), reason=f"{ML100K} not present")
def test_real_ml100k() -> None:
    raw = read_movielens(ML100K)

    assert raw.source == "movielens-100k"
    assert raw.user_features == ("gender", "age_bucket", "occupation")
    assert raw.interactions.schema == INTERACTIONS_SCHEMA
    assert raw.interactions.num_rows == 100_000
    assert raw.users.num_rows == 943
    assert raw.items.num_rows == 1_682
    assert raw.interactions.slice(0, 1).to_pylist() == [
        {"user_id": 196, "item_id": 242, "timestamp": 881250949, "rating": 3.0}
    ]
    assert raw.users.slice(0, 1).to_pylist() == [
        {"user_id": 1, "gender": "M", "age_bucket": "18-24", "occupation": "technician"}
    ]
    assert raw.items.slice(0, 1).to_pylist() == [
        {"item_id": 1, "title": "Toy Story (1995)", "genres": ["Animation", "Children's", "Comedy"]}
    ]
    assert raw.users.column("user_id").to_pylist() == list(range(1, 944))
    assert raw.items.column("item_id").to_pylist() == list(range(1, 1683))


# --- tiny layouts parse to exactly the expected tables ----------------------------------


def test_ml100k_layout(tmp_path: Path) -> None:
    raw = read_movielens(ml100k(tmp_path))

    assert raw.source == "movielens-100k"
    assert raw.user_features == ("gender", "age_bucket", "occupation")
    assert_tables_equal(
        raw.interactions, interactions([(2, 10, 100, 4.0), (1, 10, 200, 5.0), (1, 20, 300, 3.0)])
    )
    expected_users = pa.table(
        {
            "user_id": pa.array([1, 2, 3], pa.int64()),
            "gender": ["M", "F", "M"],
            "age_bucket": ["18-24", "<18", "56+"],
            "occupation": ["technician", "student", "retired"],
        }
    )
    assert_tables_equal(raw.users, expected_users)
    expected_items = items(
        [
            (10, "Café (1995)", ["Action", "Comedy"]),
            (20, "Nothing (1996)", ["unknown"]),
            (30, "Unrated (1997)", []),
        ]
    )
    assert_tables_equal(raw.items, expected_items)


def test_ml100k_without_u_genre_uses_the_standard_19_genres(tmp_path: Path) -> None:
    flags = ["0"] * 19
    flags[1] = flags[18] = "1"  # Action, Western
    item = f"10|A (1995)|||url|{'|'.join(flags)}\n20|B (1995)|||url|{'|'.join(['0'] * 19)}\n"
    directory = ml100k(tmp_path, {"u.item": item})
    (directory / "u.genre").unlink()

    raw = read_movielens(directory)

    assert raw.items.column("genres").to_pylist() == [["Action", "Western"], []]


def test_ml_latest_layout(tmp_path: Path) -> None:
    raw = read_movielens(latest(tmp_path))

    assert raw.source == "movielens-latest"
    assert raw.user_features == ()
    assert_tables_equal(
        raw.interactions,
        interactions([(1, 1, 964982703, 4.0), (1, 3, 964981247, 4.5), (6, 2, 5, 0.5)]),
    )
    assert_tables_equal(raw.users, pa.table({"user_id": pa.array([1, 6], pa.int64())}))
    expected_items = items(
        [
            (1, "Toy Story (1995)", ["Adventure", "Animation", "Children"]),
            (2, "American President, The (1995)", ["Comedy", "Drama", "Romance"]),
            (3, 'Title "Quoted" (2020)', []),
            (4, "Never Rated (1990)", ["Drama"]),
        ]
    )
    assert_tables_equal(raw.items, expected_items)


def test_ratings_are_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = read_movielens(latest(tmp_path)).interactions
    monkeypatch.setattr(movielens, "_CHUNK_ROWS", 2)

    assert_tables_equal(read_movielens(tmp_path).interactions, expected)


@pytest.mark.parametrize(
    ("age", "bucket"),
    [(1, "<18"), (17, "<18"), (18, "18-24"), (24, "18-24"), (25, "25-34"), (34, "25-34")]
    + [(35, "35-44"), (44, "35-44"), (45, "45-49"), (49, "45-49"), (50, "50-55")]
    + [(55, "50-55"), (56, "56+"), (73, "56+")],
)
def test_age_bucket(age: int, bucket: str) -> None:
    assert age_bucket(age) == bucket


# --- tolerated irregularities -----------------------------------------------------------


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def test_ml100k_tolerates_trailing_fields_blank_lines_and_crlf(tmp_path: Path) -> None:
    clean = read_movielens(ml100k(tmp_path / "clean"))
    messy = ml100k(
        tmp_path / "messy",
        {
            "u.data": crlf("\n2\t10\t4\t100\t\n\n 1 \t 10\t5 \t200\n1\t20\t3\t300\t\t\n\n"),
            "u.user": (
                "1|24|M|technician|85711|\n\n2| 17 |F|student|12345||\n3|56|M|retired|00000\n"
            ),
            "u.item": crlf(ITEM.replace("\n", "|\n") + "\n  \n"),
            "u.genre": crlf(GENRE + "\n"),
        },
    )

    raw = read_movielens(messy)

    assert_tables_equal(raw.interactions, clean.interactions)
    assert_tables_equal(raw.users, clean.users)
    assert_tables_equal(raw.items, clean.items)


def test_ml_latest_tolerates_trailing_fields_blank_lines_and_crlf(tmp_path: Path) -> None:
    clean = read_movielens(latest(tmp_path / "clean"))
    messy = latest(
        tmp_path / "messy",
        {
            "ratings.csv": crlf(
                "userId,movieId,rating,timestamp,\n\n1,1,4.0,964982703,\n"
                " 1 , 3 , 4.5 , 964981247 ,,\n\n6,2,0.5,5\n\n"
            ),
            "movies.csv": crlf(MOVIES.replace("\n", ",\n") + "\n"),
        },
    )

    raw = read_movielens(messy)

    assert_tables_equal(raw.interactions, clean.interactions)
    assert_tables_equal(raw.users, clean.users)
    assert_tables_equal(raw.items, clean.items)


# --- malformed input ------------------------------------------------------------------

U_DATA_FIELDS = "expected 4 fields (user id, item id, rating, timestamp)"

MALFORMED = [
    # (file, its content, line, what the message says)
    ("u.data", "1\t10\t5\t200\n1\t20\t3\n", 2, f"{U_DATA_FIELDS}, got 3"),
    ("u.data", "1\t10\t5\t200\t7\n", 1, f"{U_DATA_FIELDS}, got 5"),
    ("u.data", "1\t10\t5\t200\n\n\nx\t10\t5\t200\n", 4, "user id 'x' is not an integer"),
    ("u.data", "1\t10.5\t5\t200\n", 1, "item id '10.5' is not an integer"),
    ("u.data", "1\t10\tabc\t200\n", 1, "rating 'abc' is not a number"),
    ("u.data", "1\t10\tnan\t200\n", 1, "rating 'nan' is not a number"),
    ("u.data", "1\t10\t5\tyesterday\n", 1, "timestamp 'yesterday' is not an integer"),
    ("u.data", "1\t10\t5\t99999999999999999999\n", 1, "does not fit in a 64-bit integer"),
    ("u.user", "1|24|M|technician|85711\n2|x|F|student|1\n", 2, "age 'x' is not an integer"),
    ("u.user", "1|24|M|technician\n", 1, "expected 5 fields"),
    ("u.user", USER + "1|30|F|writer|1\n", 4, "duplicate user id 1 (first on line 1)"),
    ("u.item", ITEM.replace("|0|0|0\n", "|0|2|0\n"), 3, "Action flag '2' is not 0 or 1"),
    ("u.item", ITEM.replace("|0|0|0\n", "|0|0\n"), 3, "expected 8 fields"),
    (
        "u.item",
        ITEM + "20|Again (1999)|||url|0|0|0\n",
        4,
        "duplicate movie id 20 (first on line 2)",
    ),
    ("u.genre", "unknown|0\nAction|2\n", 2, "genre index 2, expected 1"),
    ("u.genre", "unknown|0\nAction\n", 2, "expected 2 fields (genre, index), got 1"),
    ("ratings.csv", "1,1,4.0,964982703\n", 1, "expected header userId,movieId,rating,timestamp"),
    ("ratings.csv", RATINGS + "\n1,1,abc,5\n", 6, "rating 'abc' is not a number"),
    ("ratings.csv", RATINGS + "1,1,4.0,5,extra\n", 5, "expected 4 fields"),
    ("ratings.csv", RATINGS + "1,x,4.0,5\n", 5, "movieId 'x' is not an integer"),
    ("movies.csv", "1,Toy Story (1995),Comedy\n", 1, "expected header movieId,title,genres"),
    ("movies.csv", MOVIES + "5,Unquoted, The (1999),Drama\n", 6, "expected 3 fields"),
    ("movies.csv", MOVIES + "2,Again (1999),Drama\n", 6, "duplicate movieId 2 (first on line 3)"),
]


@pytest.mark.parametrize(("name", "text", "line", "problem"), MALFORMED)
def test_malformed_input_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, problem: str
) -> None:
    directory, error = read_error(tmp_path, name, text)
    message = str(error)
    assert message.startswith(f"{directory / name} line {line}: "), message
    assert problem in message
    assert (error.path, error.line) == (directory / name, line)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("u.data", "", "file has no records"),
        ("u.data", "\n \n\r\n", "file has no records"),
        ("u.user", "", "file has no records"),
        ("u.item", "", "file has no records"),
        ("u.genre", "", "file has no records"),
        ("ratings.csv", "", "file is empty, expected header userId,movieId,rating,timestamp"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n\n", "file has no records"),
        ("movies.csv", "\n", "file is empty, expected header movieId,title,genres"),
    ],
)
def test_empty_file(tmp_path: Path, name: str, text: str, problem: str) -> None:
    directory, error = read_error(tmp_path, name, text)
    assert str(error) == f"{directory / name}: {problem}"


@pytest.mark.parametrize(
    ("name", "text", "missing", "listed_in"),
    [
        ("u.data", DATA + "9\t10\t1\t1\n", "user id 9", "u.user"),
        ("u.data", DATA + "1\t99\t1\t1\n", "item id 99", "u.item"),
        ("ratings.csv", RATINGS + "1,99,1.0,1\n", "movieId 99", "movies.csv"),
    ],
)
def test_rating_of_unlisted_user_or_item(
    tmp_path: Path, name: str, text: str, missing: str, listed_in: str
) -> None:
    directory, error = read_error(tmp_path, name, text)
    assert str(error) == (
        f"{directory / listed_in}: {missing} used in {directory / name} but not listed here"
    )


def test_error_is_a_picklable_value_error(tmp_path: Path) -> None:
    error = DataFormatError(tmp_path / "u.data", 3, "broken")

    assert isinstance(error, ValueError)
    assert str(pickle.loads(pickle.dumps(error))) == f"{tmp_path / 'u.data'} line 3: broken"


# --- layout detection -----------------------------------------------------------------


def test_empty_directory_is_not_a_movielens_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        read_movielens(tmp_path)

    message = str(caught.value)
    assert str(tmp_path) in message
    assert "u.data" in message and "ratings.csv" in message


def test_incomplete_ml100k_layout_names_the_missing_file(tmp_path: Path) -> None:
    directory = ml100k(tmp_path)
    (directory / "u.item").unlink()

    with pytest.raises(FileNotFoundError, match=r"ml-100k layout but lacks u\.item$"):
        read_movielens(directory)
