"""Read a MovieLens download into the canonical tables (a :class:`RawDataset`).

Two layouts are recognised by the files in the directory:

- **ml-100k**: ``u.data`` (tab-separated ratings), ``u.user``, ``u.item`` and optionally
  ``u.genre`` (``|``-separated, latin-1). Users get ``gender``, ``age_bucket`` and
  ``occupation`` features.
- **ml-latest** (ml-latest, ml-latest-small, ml-25m, ml-32m, ...): ``ratings.csv`` and
  ``movies.csv`` (UTF-8 CSV with a header). There is no user file, so users have no features.

Every line is validated and malformed input raises :class:`DataFormatError`, whose message
names the file, the 1-based line number and what is wrong, e.g.
``.../u.data line 17: expected 4 fields (user id, item id, rating, timestamp), got 3``.
Blank lines, Windows line endings, trailing empty fields and whitespace around values are
tolerated. All ratings are kept, unfiltered, as explicit ``rating`` values; the users and
items tables keep every entry of their files, including ones nobody rated.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recdistill.data.tables import INTERACTIONS_SCHEMA, RawDataset
from recdistill.errors import DataFormatError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
"""Genre names in ``u.item`` flag order, used when ``u.genre`` is absent."""

NO_GENRES = "(no genres listed)"
"""What ml-latest's ``movies.csv`` writes for a movie without genres."""

ML100K_USER_FEATURES = ("gender", "age_bucket", "occupation")

_CHUNK_ROWS = 1_000_000
"""Ratings are converted to numpy this many rows at a time, so a 30M-row file never holds
30M rows of Python objects at once."""

_AGE_BUCKETS = (
    (18, "<18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
)
"""MovieLens-1M age groups below "56+", each with its (exclusive) upper age."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_Row = tuple[int, list[str]]
"""A non-blank line of a file: its 1-based line number and its raw fields."""


def read_movielens(path: Path) -> RawDataset:
    """Read the MovieLens download in directory ``path`` (ml-100k or ml-latest layout)."""
    path = Path(path)
    if (path / "u.data").is_file():
        return _read_ml100k(path)
    if (path / "ratings.csv").is_file():
        return _read_ml_latest(path)
    raise FileNotFoundError(
        f"{path} is not a MovieLens directory: looked for u.data, u.user, u.item "
        "(ml-100k layout) and ratings.csv, movies.csv (ml-latest layout)"
    )


def age_bucket(age: int) -> str:
    """The MovieLens-1M age group of ``age``: "<18", "18-24", ..., "50-55", "56+"."""
    for upper, bucket in _AGE_BUCKETS:
        if age < upper:
            return bucket
    return "56+"


# --- reading and validating lines ----------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """One column of a file: its name (for messages) and how to parse its text.

    ``parse`` raises ``ValueError`` whose message completes "<name> '<text>' ...".
    """

    name: str
    parse: Callable[[str], Any] = str.strip


def _parse_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not an integer") from None
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError("does not fit in a 64-bit integer")
    return value


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number") from None
    if not math.isfinite(value):
        raise ValueError("is not a number")
    return value


def _parse_flag(text: str) -> bool:
    text = text.strip()
    if text not in ("0", "1"):
        raise ValueError("is not 0 or 1")
    return text == "1"


def _delimited_rows(path: Path, separator: str) -> Iterator[_Row]:
    """The non-blank lines of an ml-100k file, split on ``separator``."""
    # Universal newlines turn "\r\n" into "\n"; latin-1 decodes any byte.
    with path.open(encoding="latin-1") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, line.rstrip("\n").split(separator)


def _csv_rows(path: Path, fields: Sequence[_Field]) -> Iterator[_Row]:
    """The non-blank data rows of a CSV file whose header must name ``fields``."""
    expected = [field.name for field in fields]
    # newline="" lets the csv module handle "\r\n" and quoted fields; utf-8-sig drops a BOM.
    with path.open(encoding="utf-8-sig", newline="") as lines:
        reader = csv.reader(lines)
        rows = ((reader.line_num, row) for row in reader if any(text.strip() for text in row))
        header = next(rows, None)
        if header is None:
            raise DataFormatError(
                path, None, f"file is empty, expected header {','.join(expected)}"
            )
        line, names = header
        if [name.strip() for name in _drop_trailing_empty(names, len(expected))] != expected:
            raise DataFormatError(
                path, line, f"expected header {','.join(expected)}, got {','.join(names)!r}"
            )
        yield from rows


def _drop_trailing_empty(texts: list[str], count: int) -> list[str]:
    """``texts`` without empty fields past the first ``count`` (e.g. from a trailing comma)."""
    end = len(texts)
    while end > count and not texts[end - 1].strip():
        end -= 1
    return texts[:end]


def _records(
    path: Path, rows: Iterable[_Row], fields: Sequence[_Field]
) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """Check each row has ``fields`` and parse it: yields ``(line number, values)``.

    Raises :class:`DataFormatError` naming ``path`` and the line for a wrong field count
    or a value that does not parse, and for a file without any row.
    """
    empty = True
    for line, texts in rows:
        empty = False
        texts = _drop_trailing_empty(texts, len(fields))
        if len(texts) != len(fields):
            names = ", ".join(field.name for field in fields)
            raise DataFormatError(
                path, line, f"expected {len(fields)} fields ({names}), got {len(texts)}"
            )
        values = []
        for field, text in zip(fields, texts):
            try:
                values.append(field.parse(text))
            except ValueError as error:
                raise DataFormatError(
                    path, line, f"{field.name} {text.strip()!r} {error}"
                ) from None
        yield line, tuple(values)
    if empty:
        raise DataFormatError(path, None, "file has no records")


def _index_by_id(
    path: Path, records: Iterable[tuple[int, tuple[Any, ...]]], name: str
) -> dict[int, tuple[Any, ...]]:
    """Map each record's first value (its id) to the rest, failing on a repeated id."""
    by_id: dict[int, tuple[Any, ...]] = {}
    first_line: dict[int, int] = {}
    for line, (record_id, *rest) in records:
        if record_id in by_id:
            raise DataFormatError(
                path, line, f"duplicate {name} {record_id} (first on line {first_line[record_id]})"
            )
        by_id[record_id] = tuple(rest)
        first_line[record_id] = line
    return by_id


def _to_columns(rows: Iterable[tuple[Any, ...]], dtypes: Sequence[type]) -> list[np.ndarray]:
    """Transpose ``rows`` into one numpy array per column, ``_CHUNK_ROWS`` rows at a time."""
    chunks: list[list[np.ndarray]] = [[] for _ in dtypes]
    rows = iter(rows)
    while batch := list(itertools.islice(rows, _CHUNK_ROWS)):
        for column, values, dtype in zip(chunks, zip(*batch), dtypes):
            column.append(np.array(values, dtype=dtype))
    return [np.concatenate(column) for column in chunks]


# --- the files' columns -------------------------------------------------------------

_U_DATA_FIELDS = (
    _Field("user id", _parse_int),
    _Field("item id", _parse_int),
    _Field("rating", _parse_float),
    _Field("timestamp", _parse_int),
)
_U_USER_FIELDS = (
    _Field("user id", _parse_int),
    _Field("age", _parse_int),
    _Field("gender"),
    _Field("occupation"),
    _Field("zip code"),
)
_U_GENRE_FIELDS = (_Field("genre"), _Field("index", _parse_int))
# ml-latest fields are named as in the CSV header, which _csv_rows checks against them.
_RATINGS_CSV_FIELDS = (
    _Field("userId", _parse_int),
    _Field("movieId", _parse_int),
    _Field("rating", _parse_float),
    _Field("timestamp", _parse_int),
)
_MOVIES_CSV_FIELDS = (_Field("movieId", _parse_int), _Field("title"), _Field("genres"))


def _u_item_fields(genres: Sequence[str]) -> tuple[_Field, ...]:
    return (
        _Field("movie id", _parse_int),
        _Field("title"),
        _Field("release date"),
        _Field("video release date"),
        _Field("IMDb URL"),
        *(_Field(f"{genre} flag", _parse_flag) for genre in genres),
    )


# --- the two layouts ------------------------------------------------------------------


def _read_ml100k(directory: Path) -> RawDataset:
    ratings_path, users_path, items_path, genres_path = (
        directory / name for name in ("u.data", "u.user", "u.item", "u.genre")
    )
    _require_files(directory, "ml-100k", [users_path, items_path])

    ratings = _records(ratings_path, _delimited_rows(ratings_path, "\t"), _U_DATA_FIELDS)
    user, item, rating, timestamp = _to_columns(
        (values for _, values in ratings), (np.int64, np.int64, np.float32, np.int64)
    )

    users = _index_by_id(
        users_path,
        _records(users_path, _delimited_rows(users_path, "|"), _U_USER_FIELDS),
        "user id",
    )
    user_features = {
        user_id: (gender, age_bucket(age), occupation)
        for user_id, (age, gender, occupation, _zip_code) in users.items()
    }

    genres = _read_genre_names(genres_path) if genres_path.is_file() else ML100K_GENRES
    items = _index_by_id(
        items_path,
        _records(items_path, _delimited_rows(items_path, "|"), _u_item_fields(genres)),
        "movie id",
    )
    titles_and_genres = {
        item_id: (title, [genre for genre, flag in zip(genres, flags) if flag])
        for item_id, (title, _released, _video_released, _url, *flags) in items.items()
    }

    _require_known(user, users.keys(), "user id", used_in=ratings_path, listed_in=users_path)
    _require_known(item, items.keys(), "item id", used_in=ratings_path, listed_in=items_path)
    return RawDataset(
        source="movielens-100k",
        interactions=_interactions_table(user, item, timestamp, rating),
        users=_users_table(user_features, ML100K_USER_FEATURES),
        items=_items_table(titles_and_genres),
        user_features=ML100K_USER_FEATURES,
    )


def _read_genre_names(path: Path) -> tuple[str, ...]:
    """Genre names from ``u.genre`` (``name|index``), whose indices must run 0, 1, 2, ..."""
    names: list[str] = []
    for line, (name, index) in _records(path, _delimited_rows(path, "|"), _U_GENRE_FIELDS):
        if index != len(names):
            raise DataFormatError(path, line, f"genre index {index}, expected {len(names)}")
        names.append(name)
    return tuple(names)


def _read_ml_latest(directory: Path) -> RawDataset:
    ratings_path, movies_path = directory / "ratings.csv", directory / "movies.csv"
    _require_files(directory, "ml-latest", [movies_path])

    ratings = _records(
        ratings_path, _csv_rows(ratings_path, _RATINGS_CSV_FIELDS), _RATINGS_CSV_FIELDS
    )
    user, item, rating, timestamp = _to_columns(
        (values for _, values in ratings), (np.int64, np.int64, np.float32, np.int64)
    )

    movies = _index_by_id(
        movies_path,
        _records(movies_path, _csv_rows(movies_path, _MOVIES_CSV_FIELDS), _MOVIES_CSV_FIELDS),
        "movieId",
    )
    titles_and_genres = {
        item_id: (title, _split_genres(genres)) for item_id, (title, genres) in movies.items()
    }

    _require_known(item, movies.keys(), "movieId", used_in=ratings_path, listed_in=movies_path)
    return RawDataset(
        source="movielens-latest",
        interactions=_interactions_table(user, item, timestamp, rating),
        users=_users_table({int(user_id): () for user_id in np.unique(user)}, ()),
        items=_items_table(titles_and_genres),
        user_features=(),
    )


def _split_genres(genres: str) -> list[str]:
    if genres == NO_GENRES:
        return []
    return [genre.strip() for genre in genres.split("|") if genre.strip()]


def _require_files(directory: Path, layout: str, paths: Sequence[Path]) -> None:
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} looks like the {layout} layout but lacks {', '.join(missing)}"
        )


def _require_known(
    ids: np.ndarray, known: Iterable[int], name: str, *, used_in: Path, listed_in: Path
) -> None:
    """Fail if ``ids`` (from ``used_in``) holds an id that ``listed_in`` does not list."""
    missing = np.setdiff1d(ids, np.fromiter(known, dtype=np.int64))
    if missing.size:
        shown = ", ".join(str(value) for value in missing[:10])
        more = f" and {missing.size - 10} more" if missing.size > 10 else ""
        raise DataFormatError(
            listed_in, None, f"{name} {shown}{more} used in {used_in} but not listed here"
        )


# --- output tables -------------------------------------------------------------------


def _interactions_table(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, rating: np.ndarray
) -> pa.Table:
    return pa.table(
        {"user_id": user, "item_id": item, "timestamp": timestamp, "rating": rating},
        schema=INTERACTIONS_SCHEMA,
    )


def _users_table(features: dict[int, tuple[str, ...]], names: Sequence[str]) -> pa.Table:
    """``user_id`` plus one string column per feature name, sorted by ``user_id``."""
    ids = sorted(features)
    columns = {"user_id": pa.array(ids, pa.int64())}
    for position, name in enumerate(names):
        columns[name] = pa.array([features[user_id][position] for user_id in ids], pa.string())
    return pa.table(columns)


def _items_table(titles_and_genres: dict[int, tuple[str, list[str]]]) -> pa.Table:
    """``item_id``, ``title`` and ``genres`` (list of strings), sorted by ``item_id``."""
    ids = sorted(titles_and_genres)
    return pa.table(
        {
            "item_id": pa.array(ids, pa.int64()),
            "title": pa.array([titles_and_genres[i][0] for i in ids], pa.string()),
            "genres": pa.array([titles_and_genres[i][1] for i in ids], pa.list_(pa.string())),
        }
    )
