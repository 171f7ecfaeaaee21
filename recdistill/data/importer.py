"""Read a user's own interaction log, and optional user and item tables, into the canonical
tables (a :class:`RawDataset`), for ``recdistill data import`` and ``recdistill.prepare_data``.

Sources are CSV (with a header), Parquet or JSON Lines files, told apart by their suffix, or
pandas DataFrames. The rules, stated once:

- **IDs** are integers or strings. When every user (item) ID of the interactions is an integer,
  the IDs are kept as they are; otherwise each distinct ID is given an integer code (1, 2, ...
  in sorted order) and the users (items) table keeps the user's own ID in ``external_id``,
  which every place a person reads an ID (the Python ranker, the HTTP API) translates back.
- **Timestamps** are epoch seconds, epoch milliseconds or ISO-8601 strings (a time zone or UTC
  when none is given). ``auto`` reads numbers as milliseconds when the largest is at least
  1e11 (in seconds that is the year 5138), else as seconds, and anything else as ISO-8601. The
  canonical unit is the second: events of one user within one second have no order, and the
  split breaks such ties by a seeded random key.
- **Ratings** (explicit feedback) are optional; ``min_rating`` keeps only rows rated at least
  that much. Without a rating column every row is a positive with rating 1.
- **Repeated events** of one (user, item) pair count once: the split keeps the latest (and its
  rating), so an item is never both in a user's history and held out.
- **k-core**: with ``k_core = k`` users and items with fewer than ``k`` distinct partners are
  dropped, repeatedly, until every one left has ``k``; this happens before the split.
- **Feature tables**: user features are categorical (read as strings); an item's categories are
  one column holding a list (Parquet or JSON) or a ``separator``-joined string (``a|b|c``).
  Rows whose ID has no interaction are dropped; a user or item missing from its table gets the
  feature value ``unknown`` or no categories.

- **Text files** (CSV, JSON Lines) are read in ``encoding`` (UTF-8, with or without a byte
  order mark, unless told), a CSV's fields split on ``delimiter``. Every CSV row must have
  as many fields as the header, and no header (or JSON object) may name a column twice.

A malformed input raises :class:`DataFormatError` naming the file, the line (CSV, JSON Lines)
or row (Parquet, DataFrame) and the column; a byte the encoding cannot read is named by its
line and offset.
"""

from __future__ import annotations

import codecs
import csv
import json
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recdistill.data.ids import INTEGER_ID, IdCodes
from recdistill.data.tables import INTERACTIONS_SCHEMA, RawDataset
from recdistill.errors import DataFormatError

TIME_UNITS = ("auto", "s", "ms", "iso")
MISSING_FEATURE = "unknown"
# Epoch values from this size up are read as milliseconds by ``time_unit = "auto"``.
MILLISECONDS_FROM = 1e11

Source = Path | str | pd.DataFrame


@dataclass(frozen=True)
class InteractionColumns:
    """Which columns of the interaction log hold what, and how to read them."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: str | None = None
    min_rating: float | None = None
    time_unit: str = "auto"

    def __post_init__(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise ValueError(f"time unit {self.time_unit!r}: expected one of {TIME_UNITS}")
        if self.min_rating is not None and self.rating is None:
            raise ValueError("a minimum rating needs the rating column")


@dataclass(frozen=True)
class UserTable:
    """A table of user features: ``key`` holds the user ID, ``features`` the categorical
    columns to keep (every other column when empty)."""

    source: Source
    key: str
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class ItemTable:
    """A table of item features: ``key`` holds the item ID, ``categories`` the item's
    categories (a list, or a string joined by ``separator``), ``title`` a display name."""

    source: Source
    key: str
    categories: str | None = None
    title: str | None = None
    separator: str = "|"


@dataclass(frozen=True)
class TextFormat:
    """How text files (CSV, JSON Lines) are read: their ``encoding`` and a CSV's one-character
    ``delimiter`` (``"\\t"`` or ``"tab"`` for a tab)."""

    encoding: str = "utf-8"
    delimiter: str = ","

    def __post_init__(self) -> None:
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r}") from None
        delimiter = {"\\t": "\t", "tab": "\t"}.get(self.delimiter, self.delimiter)
        if len(delimiter) != 1 or delimiter in '"\r\n':
            raise ValueError(
                f"delimiter {self.delimiter!r}: expected one character, such as ; or tab"
            )
        object.__setattr__(self, "delimiter", delimiter)

    @property
    def codec(self) -> str:
        """The codec to read with: UTF-8 drops a leading byte order mark."""
        return "utf-8-sig" if codecs.lookup(self.encoding).name == "utf-8" else self.encoding


@dataclass(frozen=True)
class ImportSpec:
    columns: InteractionColumns = field(default_factory=InteractionColumns)
    users: UserTable | None = None
    items: ItemTable | None = None
    k_core: int = 1
    text: TextFormat = field(default_factory=TextFormat)

    def __post_init__(self) -> None:
        if self.k_core < 1:
            raise ValueError(f"k-core {self.k_core}: must be at least 1")


@dataclass(frozen=True)
class Imported:
    """The canonical tables and one line per rule that dropped or changed something."""

    raw: RawDataset
    notes: list[str]


def import_interactions(interactions: Source, spec: ImportSpec) -> Imported:
    """Read ``interactions`` (and ``spec``'s feature tables) into canonical tables."""
    columns = spec.columns
    wanted = [columns.user, columns.item, columns.time]
    if columns.rating is not None:
        wanted.append(columns.rating)
    log = _Table.load(interactions, wanted, "interactions", spec.text)
    notes = [f"{log.name}: {log.rows:,} rows read"]

    users, items = log.ids(columns.user), log.ids(columns.item)
    seconds = log.seconds(columns.time, columns.time_unit)
    rating = (
        np.ones(log.rows, dtype=np.float32)
        if columns.rating is None
        else log.numbers(columns.rating).astype(np.float32)
    )
    kept = np.ones(log.rows, dtype=bool)
    if columns.min_rating is not None:
        kept = rating >= columns.min_rating
        notes.append(
            f"min rating {columns.min_rating:g}: dropped {int((~kept).sum()):,} of "
            f"{log.rows:,} rows rated lower"
        )
    user, item = IdCodes.of(users).encode(users), IdCodes.of(items).encode(items)
    pairs = np.unique(np.stack([user[kept], item[kept]]), axis=1).shape[1]
    if pairs < kept.sum():
        notes.append(
            f"repeated events: {int(kept.sum()) - pairs:,} rows repeat an earlier (user, item) "
            "pair; the split keeps each pair's latest"
        )
    if spec.k_core > 1:
        kept &= _k_core(user, item, kept, spec.k_core, log, columns, notes)
    if not kept.any():
        raise DataFormatError(log.name, None, "no interactions remain to import")
    pairs = np.unique(np.stack([user[kept], item[kept]]), axis=1)
    notes.append(
        f"kept {pairs.shape[1]:,} distinct (user, item) pairs of "
        f"{len(np.unique(pairs[0])):,} users and {len(np.unique(pairs[1])):,} items"
    )

    user_source = item_source = None
    if spec.users is not None:
        features = spec.users.features
        wanted_users = [spec.users.key, *features] if features else None
        user_source = _Table.load(spec.users.source, wanted_users, "users", spec.text)
    if spec.items is not None:
        optional = (spec.items.categories, spec.items.title)
        wanted_items = [spec.items.key, *(c for c in optional if c is not None)]
        item_source = _Table.load(spec.items.source, wanted_items, "items", spec.text)
    user_codes = _catalogue(users, kept, user_source, spec.users, "user")
    item_codes = _catalogue(items, kept, item_source, spec.items, "item")
    user_features, user_table = _user_table(spec.users, user_source, user_codes, notes)
    return Imported(
        raw=RawDataset(
            source=f"import:{'DataFrame' if isinstance(interactions, pd.DataFrame) else log.name}",
            interactions=pa.table(
                {
                    "user_id": user_codes.encode(users[kept]),
                    "item_id": item_codes.encode(items[kept]),
                    "timestamp": seconds[kept],
                    "rating": rating[kept],
                },
                schema=INTERACTIONS_SCHEMA,
            ),
            users=user_table,
            items=_item_table(spec.items, item_source, item_codes, notes),
            user_features=user_features,
        ),
        notes=notes,
    )


def _catalogue(
    log_ids: np.ndarray,
    kept: np.ndarray,
    source: _Table | None,
    table: UserTable | ItemTable | None,
    who: str,
) -> IdCodes:
    """The users (items) of the kept interactions, and those of the feature table that the
    log never mentions (a catalogue item nobody chose yet); those the k-core or the minimum
    rating dropped stay out."""
    ids = log_ids[kept]
    if source is None:
        return IdCodes.of(ids)
    in_log = IdCodes.of(log_ids)
    listed = source.ids(table.key)
    known = in_log.encode(listed) >= 0
    if not known.any():
        first = source.frame[table.key].iloc[0]
        raise source.error(
            0, table.key, f"no {who} ID of this table has an interaction (first: {first!r})"
        )
    unseen = listed[~known]
    if in_log.names is not None:
        unseen = unseen.astype(str).astype(object)
    elif unseen.dtype.kind != "i":  # an integer log: a table's text IDs cannot be its items
        unseen = np.array([int(t) for t in unseen if INTEGER_ID.fullmatch(t)], dtype=np.int64)
    return IdCodes.of(np.concatenate([ids, unseen]))


def _k_core(
    user: np.ndarray,
    item: np.ndarray,
    kept: np.ndarray,
    k: int,
    log: _Table,
    columns: InteractionColumns,
    notes: list[str],
) -> np.ndarray:
    """Which rows survive the k-core: users and items with ``k`` distinct partners or more."""
    pair_user, pair_item = np.unique(np.stack([user[kept], item[kept]]), axis=1)
    alive = np.ones(len(pair_user), dtype=bool)
    dropped_users: set[int] = set()
    dropped_items: set[int] = set()
    while True:
        users, user_count = np.unique(pair_user[alive], return_counts=True)
        items, item_count = np.unique(pair_item[alive], return_counts=True)
        few_users, few_items = users[user_count < k], items[item_count < k]
        if not len(few_users) and not len(few_items):
            break
        dropped_users.update(few_users.tolist())
        dropped_items.update(few_items.tolist())
        alive &= ~np.isin(pair_user, few_users) & ~np.isin(pair_item, few_items)
    survives = kept & ~np.isin(user, list(dropped_users)) & ~np.isin(item, list(dropped_items))
    for dropped, column, who in (
        (dropped_users, columns.user, "user"),
        (dropped_items, columns.item, "item"),
    ):
        if dropped:
            codes = user if who == "user" else item
            first = int(np.flatnonzero(kept & np.isin(codes, list(dropped)))[0])
            example = log.frame[column].iloc[first]
            partners = "items" if who == "user" else "users"
            notes.append(
                f"{log.name} {log.where(first)}, column {column!r}: {who} {example!r} and "
                f"{len(dropped) - 1:,} other {who}s have fewer than {k} distinct {partners} "
                f"(k-core {k}): dropped"
            )
    if dropped_users or dropped_items:
        notes.append(f"k-core {k}: {int(survives.sum()):,} of {int(kept.sum()):,} rows remain")
    return survives


def _user_table(
    table: UserTable | None, source: _Table | None, codes: IdCodes, notes: list[str]
) -> tuple[tuple[str, ...], pa.Table]:
    columns = codes.table("user_id")
    if table is None:
        return (), pa.table(columns)
    features = table.features or tuple(c for c in source.frame.columns if c != table.key)
    rows = source.matched_rows(table.key, codes, "user", notes)
    for name in features:
        values = np.full(len(codes.codes), MISSING_FEATURE, dtype=object)
        values[rows.target] = source.texts(name)[rows.source]
        columns[name] = pa.array(values.tolist(), pa.string())
    return features, pa.table(columns)


def _item_table(
    table: ItemTable | None, source: _Table | None, codes: IdCodes, notes: list[str]
) -> pa.Table:
    columns = codes.table("item_id")
    titles = np.array([str(name) for name in codes.named(codes.codes)], dtype=object)
    categories: list[list[str]] = [[] for _ in codes.codes]
    if table is not None:
        rows = source.matched_rows(table.key, codes, "item", notes)
        if table.title is not None:
            titles[rows.target] = source.texts(table.title)[rows.source]
        if table.categories is not None:
            lists = source.lists(table.categories, table.separator)
            for target, row in zip(rows.target, rows.source):
                categories[target] = lists[row]
    columns["title"] = pa.array(titles.tolist(), pa.string())
    columns["genres"] = pa.array(categories, pa.list_(pa.string()))
    return pa.table(columns)


@dataclass(frozen=True)
class _Matched:
    target: np.ndarray  # rows of the ID set
    source: np.ndarray  # the feature table's rows for them


@dataclass
class _Table:
    """One source read into a DataFrame, with where each of its rows came from."""

    name: str
    frame: pd.DataFrame
    locate: Callable[[int], tuple[int, str]]

    @property
    def rows(self) -> int:
        return len(self.frame)

    def where(self, row: int) -> str:
        number, unit = self.locate(row)
        return f"{unit} {number}"

    def error(self, row: int | None, column: str, problem: str) -> DataFormatError:
        if row is None:
            return DataFormatError(self.name, None, f"column {column!r}: {problem}")
        number, unit = self.locate(row)
        return DataFormatError(self.name, number, f"column {column!r}: {problem}", unit=unit)

    @classmethod
    def load(
        cls, source: Source, columns: Sequence[str] | None, what: str, text: TextFormat
    ) -> _Table:
        """Read ``columns`` (all when None) of ``source``, a text file as ``text`` says;
        ``what`` names a DataFrame."""
        if isinstance(source, pd.DataFrame):
            name = f"the {what} DataFrame"
            _require_columns(name, None, list(source.columns), columns)
            frame = source if columns is None else source[list(columns)]
            labels = source.index
            table = cls(name, frame.reset_index(drop=True), lambda row: (labels[row], "row"))
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            suffix = path.suffix.lower()
            readers = {".csv": _read_csv, ".parquet": _read_parquet, ".jsonl": _read_jsonl}
            readers |= {".pq": _read_parquet, ".ndjson": _read_jsonl, ".json": _read_jsonl}
            if suffix not in readers:
                raise ValueError(
                    f"{path}: unknown format {suffix!r}; expected .csv, .parquet or .jsonl"
                )
            table = readers[suffix](path, columns, text)
        if not table.rows:
            raise DataFormatError(table.name, None, "file has no rows")
        return table

    def _missing(self, column: str) -> np.ndarray:
        values = self.frame[column]
        missing = values.isna().to_numpy()
        if not pd.api.types.is_numeric_dtype(values):
            blank = values.map(lambda v: isinstance(v, str) and not v.strip())
            missing = missing | blank.to_numpy(dtype=bool)
        return missing

    def _require_present(self, column: str) -> None:
        missing = self._missing(column)
        if missing.any():
            raise self.error(int(np.flatnonzero(missing)[0]), column, "no value")

    def ids(self, column: str) -> np.ndarray:
        """The column's IDs: int64 when every one is an integer, else strings."""
        self._require_present(column)
        values = self.frame[column]
        if values.dtype.kind == "i":
            return values.to_numpy(np.int64)
        if values.dtype.kind == "f" and (values == values.round()).all():
            return values.to_numpy(np.int64)
        texts = values.astype(str).str.strip().to_numpy(dtype=object)
        if all(INTEGER_ID.fullmatch(text) for text in texts):
            return texts.astype(np.int64)
        return texts

    def numbers(self, column: str) -> np.ndarray:
        self._require_present(column)
        values = pd.to_numeric(self.frame[column], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.error(row, column, f"{self.frame[column].iloc[row]!r} is not a number")
        return values

    def seconds(self, column: str, unit: str) -> np.ndarray:
        """Epoch seconds (int64) of the column's timestamps, read by ``unit``."""
        self._require_present(column)
        values = self.frame[column]
        if pd.api.types.is_datetime64_any_dtype(values):
            return _epoch_seconds(pd.to_datetime(values, utc=True))
        if unit == "auto":
            first = pd.to_numeric(values.iloc[:1], errors="coerce").iloc[0]
            unit = "iso" if pd.isna(first) else "s"
            if unit == "s":
                largest = pd.to_numeric(values, errors="coerce").abs().max()
                unit = "ms" if largest >= MILLISECONDS_FROM else "s"
        if unit == "iso":
            parsed = pd.to_datetime(values.astype(str), format="ISO8601", utc=True, errors="coerce")
            self._require_parsed(column, parsed.isna().to_numpy(), "an ISO-8601 time")
            return _epoch_seconds(parsed)
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
        self._require_parsed(column, ~np.isfinite(numbers), f"epoch {unit}")
        return np.floor(numbers / (1000 if unit == "ms" else 1)).astype(np.int64)

    def _require_parsed(self, column: str, bad: np.ndarray, expected: str) -> None:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            text = self.frame[column].iloc[row]
            raise self.error(row, column, f"timestamp {text!r} is not {expected}")

    def texts(self, column: str) -> np.ndarray:
        """The column as strings; missing values become ``MISSING_FEATURE``."""
        values = self.frame[column].astype(object).to_numpy()
        missing = self._missing(column)
        texts = np.array([str(v).strip() for v in values], dtype=object)
        texts[missing] = MISSING_FEATURE
        return texts

    def lists(self, column: str, separator: str) -> list[list[str]]:
        """Each row's list of strings: a list value as it is, a string split on
        ``separator``, nothing for a missing value."""
        result = []
        for value in self.frame[column].to_numpy(dtype=object):
            if isinstance(value, list | tuple | np.ndarray):
                result.append([str(v).strip() for v in value if str(v).strip()])
            elif value is None or (isinstance(value, float) and np.isnan(value)):
                result.append([])
            else:
                result.append([p.strip() for p in str(value).split(separator) if p.strip()])
        return result

    def matched_rows(self, key: str, codes: IdCodes, who: str, notes: list[str]) -> _Matched:
        """Pair the rows of this feature table with the IDs of ``codes``; a repeated ID is
        an error, rows of IDs outside ``codes`` are dropped."""
        found = codes.encode(self.ids(key))
        seen: dict[int, int] = {}
        for row, code in enumerate(found.tolist()):
            if code >= 0 and code in seen:
                first = self.where(seen[code])
                raise self.error(row, key, f"{who} {self.frame[key].iloc[row]!r} again ({first})")
            seen[code] = row
        matched = found >= 0
        source = np.flatnonzero(matched)
        target = np.searchsorted(codes.codes, found[source])
        if (~matched).any():
            notes.append(
                f"{self.name}: dropped {int((~matched).sum()):,} rows whose {who} the filters "
                "above dropped"
            )
        absent = len(codes.codes) - len(source)
        if absent:
            notes.append(f"{self.name}: {absent:,} {who}s with interactions are not listed")
        return _Matched(target, source)


def _epoch_seconds(times: pd.Series) -> np.ndarray:
    return ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)


def _require_columns(
    name: str, line: int | None, present: list[str], wanted: Sequence[str] | None
) -> None:
    """Every ``wanted`` column among the ``present`` ones, none of which is named twice."""
    for index, column in enumerate(present):
        if column in present[:index]:
            raise DataFormatError(name, line, f"the header names column {column!r} twice")
    for column in wanted or ():
        if column not in present:
            hint = ""
            if len(present) == 1:
                found = next((s for s in ";\t|," if s in str(present[0])), None)
                if found is not None:
                    hint = f"; is the file separated by {found!r}? say so with --delimiter"
            raise DataFormatError(
                name,
                line,
                f"no column {column!r}; the columns are {', '.join(map(str, present))}{hint}",
            )


def _read_csv(path: Path, columns: Sequence[str] | None, text: TextFormat) -> _Table:
    """Every record of a CSV file, each checked to have the header's number of fields;
    records whose fields are all blank are skipped."""
    with _text_file(path, text) as lines:
        reader = csv.reader(lines, delimiter=text.delimiter, skipinitialspace=True)
        records = ((row, reader.line_num) for row in reader if any(f.strip() for f in row))
        header, header_line = next(records, (None, 0))
        if header is None:
            raise DataFormatError(str(path), None, "file is empty, expected a header row")
        header = [name.strip() for name in header]
        _require_columns(str(path), header_line, header, columns)
        names = header if columns is None else list(columns)
        values: list[list[str]] = [[] for _ in names]
        fields = [header.index(name) for name in names]
        line_of = array("q")
        for row, line in records:
            if len(row) != len(header):
                raise DataFormatError(
                    str(path),
                    line,
                    f"{len(row)} fields where the header (line {header_line}) has {len(header)}",
                )
            for column, field_ in zip(values, fields):
                column.append(row[field_])
            line_of.append(line)
    frame = pd.DataFrame(dict(zip(names, values)), dtype=object)
    return _Table(str(path), frame, lambda row: (line_of[row], "line"))


@contextmanager
def _text_file(path: Path, text: TextFormat) -> Iterator[TextIO]:
    """``path`` open for reading in ``text``'s encoding; a byte the encoding cannot read
    raises :class:`DataFormatError` naming its line and offset."""
    with path.open(encoding=text.codec, newline="") as file:
        try:
            yield file
        except UnicodeDecodeError:
            raise _undecodable(path, text.encoding) from None


def _undecodable(path: Path, encoding: str) -> DataFormatError:
    """Where ``path`` first holds bytes that ``encoding`` cannot decode, found line by line."""
    with path.open("rb") as raw:
        offset = 0
        for number, line in enumerate(raw, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as error:
                byte = line[error.start]
                return DataFormatError(
                    path,
                    number,
                    f"byte 0x{byte:02x} (byte {error.start + 1} of the line, offset "
                    f"{offset + error.start} in the file) is not {encoding}: give the file's "
                    "encoding, such as --encoding cp1252",
                )
            offset += len(line)
    return DataFormatError(
        path, None, f"the file is not {encoding}: give its encoding (--encoding)"
    )


def _read_parquet(path: Path, columns: Sequence[str] | None, text: TextFormat) -> _Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataFormatError(str(path), None, f"not a Parquet file ({error})") from None
    _require_columns(str(path), None, schema.names, columns)
    frame = pq.read_table(path, columns=None if columns is None else list(columns)).to_pandas()
    return _Table(str(path), frame, lambda row: (row + 1, "row"))


def _read_jsonl(path: Path, columns: Sequence[str] | None, text: TextFormat) -> _Table:
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    with _text_file(path, text) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=_object_once)
            except json.JSONDecodeError as error:
                raise DataFormatError(str(path), number, f"not JSON ({error.msg})") from None
            except _RepeatedKey as error:
                raise DataFormatError(
                    str(path), number, f"the object names {error} twice"
                ) from None
            if not isinstance(record, dict):
                raise DataFormatError(str(path), number, "not a JSON object")
            records.append(record)
            numbers.append(number)
    frame = pd.DataFrame.from_records(records)
    if records:
        _require_columns(str(path), None, list(frame.columns), columns)
        if columns is not None:
            frame = frame[list(columns)]
    return _Table(str(path), frame, lambda row: (numbers[row], "line"))


class _RepeatedKey(ValueError):
    pass


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key that comes twice (json keeps the last)."""
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        raise _RepeatedKey(repr(next(k for k, _ in pairs if k in seen or seen.add(k))))
    return record
