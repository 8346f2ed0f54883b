"""Import a MovieLens dataset (the "latest"/ml-25m CSV layout or ml-100k) into items and interactions.

Every rating becomes one "rating" interaction, ingested when it occurred (a historical import).
Ratings of movies missing from the movies file are kept: validation quarantines unknown items
later, so the import only reports how many there are.

Ids are read as integers, never through a float, and kept exactly. A value that is not what its
column holds (an id outside bigint or not whole, a timestamp outside years 1 to 9999, a rating that
is no finite number, a missing field) stops the import with its file, line and text.
"""

from __future__ import annotations

import csv
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from recmodel import db
from recmodel.synth import ITEM_COLUMNS, INTERACTION_COLUMNS, copy_frames

log = logging.getLogger(__name__)

LATEST_FILES = ("ratings.csv", "movies.csv")
ML100K_FILES = ("u.data", "u.item")
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
NO_GENRES = {"(no genres listed)", "unknown"}
MAX_TAGS = 20  # per item, genres first
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
BIGINT = (-(2**63), 2**63 - 1)  # the id columns' type
# Unix seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: times Postgres, pandas and Python all hold.
SECONDS = (-62_135_596_800, 253_402_300_799)
WHOLE_NUMBER = r"^[+-]?[0-9]+(\.0*)?$"  # "12.0" is 12; Arrow's own parse takes only [-]digits, the rest is ours
DECIMAL = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"

COUNT_ROWS = "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM interactions)"
LOCK_SOURCE_TABLES = "LOCK TABLE items, interactions IN SHARE ROW EXCLUSIVE MODE"


class MalformedDatasetError(ValueError):
    """The dataset folder cannot be imported; the message names the file and what is wrong."""


class DatabaseNotEmptyError(ValueError):
    """The target database already holds source rows, which an import would duplicate."""


@dataclass(frozen=True)
class ImportSummary:
    items: int
    interactions: int
    users: int
    first_event_at: datetime
    last_event_at: datetime
    format: str  # "latest" or "100k"

    def describe(self) -> str:
        return (f"{self.interactions:,} ratings by {self.users:,} users on {self.items:,} items, "
                f"{self.first_event_at:%Y-%m-%d} to {self.last_event_at:%Y-%m-%d}")


@dataclass(frozen=True)
class _Ratings:
    """Ratings as parsed columns, before they become interactions."""

    user_id: np.ndarray
    item_id: np.ndarray
    rating: np.ndarray
    seconds: np.ndarray


def import_movielens(url: str, folder: Path) -> ImportSummary:
    """Load a MovieLens folder into an empty database in one transaction."""
    dataset = dataset_format(folder)
    items, interactions = read_movielens(folder)
    summary = import_frames(url, items, interactions, dataset)
    log.info("imported MovieLens %s from %s: %s", summary.format, folder, summary.describe())
    return summary


def import_frames(url: str, items: pd.DataFrame, interactions: pd.DataFrame, source: str) -> ImportSummary:
    """COPY `items` (ITEM_COLUMNS) and `interactions` (INTERACTION_COLUMNS) into an empty database, in one
    transaction that locks both tables (so two imports cannot interleave)."""
    with db.transaction(url) as conn:
        conn.execute(LOCK_SOURCE_TABLES)
        n_items, n_interactions = conn.execute(COUNT_ROWS).fetchone()
        if n_interactions:
            raise DatabaseNotEmptyError(f"interactions already holds {n_interactions} rows; "
                                        "import into an empty database")
        if n_items:
            raise DatabaseNotEmptyError(f"items already holds {n_items} rows; import into an empty database")
        copy_frames(conn, items, interactions)
    occurred = interactions["occurred_at"]
    return ImportSummary(items=len(items), interactions=len(interactions),
                         users=int(interactions["user_id"].nunique()),
                         first_event_at=occurred.min().to_pydatetime(), last_event_at=occurred.max().to_pydatetime(),
                         format=source)


def dataset_format(folder: Path) -> str:
    """ "latest" or "100k", by which files the folder holds."""
    if not folder.is_dir():
        raise MalformedDatasetError(f"MovieLens folder {folder} does not exist")
    if all((folder / name).is_file() for name in LATEST_FILES):
        return "latest"
    if all((folder / name).is_file() for name in ML100K_FILES):
        return "100k"
    raise MalformedDatasetError(
        f"{folder} is not a MovieLens dataset: looked for {' + '.join(LATEST_FILES)} (latest/ml-25m) "
        f"or {' + '.join(ML100K_FILES)} (ml-100k)")


def read_movielens(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items (ITEM_COLUMNS) and interactions (INTERACTION_COLUMNS, by occurred_at) of a MovieLens folder."""
    if dataset_format(folder) == "latest":
        movies, ratings_file = _latest_movies(folder), folder / "ratings.csv"
        ratings = _ratings(_Source(ratings_file), ("userId", "movieId", "rating", "timestamp"))
    else:
        movies, ratings_file = _ml100k_movies(folder), folder / "u.data"
        names = ("user", "item", "rating", "timestamp")
        ratings = _ratings(_Source(ratings_file, sep="\t", names=names), names)
    unknown = int((~np.isin(ratings.item_id, movies["item_id"].to_numpy())).sum())
    if unknown:
        log.warning("%d ratings in %s reference movies absent from the movies file; kept for validation to "
                    "quarantine", unknown, ratings_file)
    return _items(movies, ratings), _interactions(ratings)


def _read_csv(path: Path, **options: object) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MalformedDatasetError(f"{path} cannot be parsed: {exc}") from None


def _require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    _require(path, tuple(map(str, frame.columns)), columns)


def _require(path: Path, header: tuple[str, ...], columns: tuple[str, ...]) -> None:
    missing = [column for column in columns if column not in header]
    if missing:
        raise MalformedDatasetError(f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(header)})")


@dataclass(frozen=True)
class _Kind:
    """What a column holds: the type it is parsed as and the values allowed (bounds None: any finite float)."""

    arrow_type: pa.DataType
    bounds: tuple[int, int] | None = None
    allowed: str = ""  # the bounds, as a message says them

    def outside(self, values: np.ndarray) -> np.ndarray:
        """Which parsed values are not allowed."""
        if self.bounds is None:
            return ~np.isfinite(values)
        low, high = self.bounds
        return (values < low) | (values > high)

    def problem(self, raw: str) -> str:
        """Why `raw`, a refused value as the file writes it, is not one of these."""
        text = raw.strip()
        if not text:
            return "missing"
        if self.bounds is None:
            number = re.fullmatch(DECIMAL, text) or text.lower().lstrip("+-") in ("nan", "inf", "infinity")
            return f"{raw!r}, not a {'finite ' if number else ''}number"
        if re.fullmatch(WHOLE_NUMBER, text):
            return f"{raw!r}, outside {self.allowed}"
        if re.fullmatch(DECIMAL, text):
            return f"{raw!r}, not a whole number"
        return f"{raw!r}, not a number"


ID = _Kind(pa.int64(), BIGINT, f"the bigint range {BIGINT[0]}..{BIGINT[1]}")
TIMESTAMP = _Kind(pa.int64(), SECONDS, f"{SECONDS[0]}..{SECONDS[1]} (unix seconds of 0001-01-01 to 9999-12-31 UTC)")
RATING = _Kind(pa.float64())


@dataclass(frozen=True)
class _Source:
    """A delimited file and how its lines split into fields: enough to read it and to point at one of its rows."""

    path: Path
    sep: str = ","
    names: tuple[str, ...] | None = None  # the columns of a file without a header line
    encoding: str = "utf8"

    def header(self) -> tuple[str, ...]:
        if self.names is not None:
            return self.names
        with self.path.open(newline="", encoding=self.encoding, errors="replace") as file:
            return tuple(next(csv.reader(file, delimiter=self.sep), []))

    def rows(self) -> Iterator[tuple[int, list[str]]]:
        """Each data row's fields and the line it starts on (1-based; a header is line 1), counted as the readers
        count rows: blank lines are skipped, a quoted field may span lines. Only read to report a problem."""
        with self.path.open(newline="", encoding=self.encoding, errors="replace") as file:
            records = csv.reader(file, delimiter=self.sep)
            if self.names is None:
                next(records, None)
            while True:
                line = records.line_num + 1
                fields = next(records, None)
                if fields is None:
                    return
                if fields:
                    yield line, fields

    def refuse(self, row: int, column: str, kind: _Kind) -> NoReturn:
        """Raise for the value of `column` in data row `row`, naming its line."""
        line, fields = next(itertools.islice(self.rows(), row, None), (0, []))
        index = self.header().index(column)
        raw = fields[index] if index < len(fields) else ""
        raise MalformedDatasetError(f"{self.path} line {line}: {column} is {kind.problem(raw)}")

    def refuse_unreadable(self, exc: Exception) -> NoReturn:
        """Raise for a file Arrow cannot split into rows: the first row with the wrong number of fields, if any."""
        header = self.header()
        for line, fields in self.rows():
            if len(fields) < len(header):
                raise MalformedDatasetError(f"{self.path} line {line}: {header[len(fields)]} is missing (the line "
                                            f"has {len(fields)} of the {len(header)} fields {', '.join(header)})")
            if len(fields) > len(header):
                raise MalformedDatasetError(f"{self.path} line {line} has {len(fields)} fields; expected "
                                            f"{len(header)} ({', '.join(header)})")
        raise MalformedDatasetError(f"{self.path} cannot be parsed: {exc}")


def _read_numbers(source: _Source, kinds: dict[str, _Kind]) -> dict[str, np.ndarray]:
    """The `kinds` columns of `source` as exact numbers, every value checked; the first malformed one is refused
    naming its line.

    Arrow parses integers as integers (never through a float, which rounds above 2**53) and refuses what is not
    one. Then the columns are read again as text and parsed here, to find which value that was.
    """
    _require(source.path, source.header(), tuple(kinds))
    try:
        table = _arrow_csv(source, {column: kind.arrow_type for column, kind in kinds.items()})
        parsed = {column: (table[column].to_numpy(), np.zeros(len(table), bool)) for column in kinds}
    except pa.ArrowInvalid:
        try:
            text = _arrow_csv(source, dict.fromkeys(kinds, pa.string()))
        except pa.ArrowInvalid as exc:
            source.refuse_unreadable(exc)
        parsed = {column: _parse(text[column], kind) for column, kind in kinds.items()}
    return _checked(source, kinds, parsed)


def _arrow_csv(source: _Source, types: dict[str, pa.DataType]) -> pa.Table:
    """Only the `types` columns; no value becomes null (a missing one fails to parse)."""
    return pa_csv.read_csv(
        source.path,
        read_options=pa_csv.ReadOptions(column_names=list(source.names) if source.names else None,
                                        encoding=source.encoding),
        parse_options=pa_csv.ParseOptions(delimiter=source.sep),
        convert_options=pa_csv.ConvertOptions(column_types=types, include_columns=list(types), null_values=[],
                                              strings_can_be_null=False, quoted_strings_can_be_null=False))


def _parse(text: pa.Array | pa.ChunkedArray, kind: _Kind) -> tuple[np.ndarray, np.ndarray]:
    """Exact values of decimal text, and which rows hold none (their value is left 0).

    Integers may be signed and end in ".0"; they must fit a bigint, compared as digit strings, never as floats.
    """
    trimmed = pc.utf8_trim_whitespace(text)
    try:  # most columns of a file that failed to parse are fine: Arrow's strict cast is all they need
        return pc.cast(trimmed, kind.arrow_type).to_numpy(), np.zeros(len(trimmed), bool)
    except pa.ArrowInvalid:
        pass
    if kind.bounds is None:
        parsed = pc.fill_null(pc.match_substring_regex(trimmed, DECIMAL), False)
        values = pc.cast(pc.if_else(parsed, trimmed, "0"), pa.float64())
    else:
        number = pc.replace_substring_regex(trimmed, r"^\+|\.0*$", "")
        magnitude = pc.replace_substring_regex(number, "^-?0*", "")
        limit = pc.if_else(pc.starts_with(number, "-"), str(-BIGINT[0]), str(BIGINT[1]))
        digits, most = pc.utf8_length(magnitude), len(str(BIGINT[1]))
        fits = pc.or_(pc.less(digits, most), pc.and_(pc.equal(digits, most), pc.less_equal(magnitude, limit)))
        parsed = pc.fill_null(pc.and_(pc.match_substring_regex(trimmed, WHOLE_NUMBER), fits), False)
        values = pc.cast(pc.if_else(parsed, number, "0"), pa.int64())
    return values.to_numpy(), ~parsed.to_numpy(zero_copy_only=False)


def _checked(source: _Source, kinds: dict[str, _Kind], parsed: dict[str, tuple[np.ndarray, np.ndarray]],
             ) -> dict[str, np.ndarray]:
    """The parsed values once every one is allowed; else the earliest malformed one is refused."""
    first: tuple[int, str] | None = None
    for column, kind in kinds.items():
        values, unparsed = parsed[column]
        bad = unparsed | kind.outside(values)
        if bad.any() and (first is None or int(np.argmax(bad)) < first[0]):
            first = int(np.argmax(bad)), column
    if first is not None:
        source.refuse(*first, kinds[first[1]])
    return {column: values for column, (values, _) in parsed.items()}


def _ids(frame: pd.DataFrame, column: str, source: _Source) -> np.ndarray:
    """A text column of an already read frame as exact bigints."""
    return _checked(source, {column: ID}, {column: _parse(pa.array(frame[column], pa.string()), ID)})[column]


def _ratings(source: _Source, columns: tuple[str, ...]) -> _Ratings:
    """`columns` names the user, item, rating and unix-seconds columns."""
    user, item, rating, timestamp = columns
    numbers = _read_numbers(source, {user: ID, item: ID, rating: RATING, timestamp: TIMESTAMP})
    return _Ratings(user_id=numbers[user], item_id=numbers[item], rating=numbers[rating], seconds=numbers[timestamp])


def _latest_movies(folder: Path) -> pd.DataFrame:
    """movieId, title and tags (genres, then the most used user tags) from movies.csv and tags.csv."""
    path = folder / "movies.csv"
    frame = _read_csv(path, dtype=str, keep_default_na=False)
    _require_columns(frame, path, ("movieId", "title", "genres"))
    genres = [[g for g in value.split("|") if g and g not in NO_GENRES] for value in frame["genres"]]
    movies = _movies(_ids(frame, "movieId", _Source(path)), frame["title"].tolist(), genres, path)
    tags_path = folder / "tags.csv"
    if not tags_path.is_file():
        return movies
    user_tags = _user_tags(_read_csv(tags_path, dtype=str, keep_default_na=False), tags_path)
    extra = movies["item_id"].map(user_tags)
    movies["tags"] = [(tags + [t for t in more if t not in tags])[:MAX_TAGS] if isinstance(more, list) else tags
                      for tags, more in zip(movies["tags"], extra)]
    return movies


def _user_tags(frame: pd.DataFrame, path: Path) -> pd.Series:
    """Per movieId, its distinct lower-cased user tags, most used first, at most MAX_TAGS."""
    _require_columns(frame, path, ("movieId", "tag"))
    tags = pd.DataFrame({"item_id": _ids(frame, "movieId", _Source(path)),
                         "tag": frame["tag"].str.strip().str.lower()})
    tags = tags[tags["tag"] != ""]
    counted = (tags.reset_index().groupby(["item_id", "tag"], sort=False)
               .agg(uses=("index", "size"), first=("index", "min")).reset_index()
               .sort_values(["item_id", "uses", "first"], ascending=[True, False, True]))
    return counted.groupby("item_id").head(MAX_TAGS).groupby("item_id")["tag"].agg(list)


def _ml100k_movies(folder: Path) -> pd.DataFrame:
    """u.item: id|title|release date|video release date|IMDb URL|one 0/1 flag per genre (latin-1)."""
    path = folder / "u.item"
    genre_names = _ml100k_genres(folder)
    frame = _read_csv(path, sep="|", header=None, dtype=str, keep_default_na=False, encoding="latin-1")
    columns = ["movie id", "title", "release date", "video release date", "IMDb URL", *genre_names]
    if frame.shape[1] < len(columns):
        raise MalformedDatasetError(f"{path} has {frame.shape[1]} columns; expected {len(columns)}: "
                                    f"{', '.join(columns[:5])} and one flag per genre ({len(genre_names)})")
    frame.columns = columns + [f"extra {i}" for i in range(frame.shape[1] - len(columns))]
    source = _Source(path, sep="|", names=tuple(frame.columns), encoding="latin-1")
    flags = np.column_stack([_ids(frame, name, source) for name in genre_names])
    genres = [[name for name, flag in zip(genre_names, row) if flag and name not in NO_GENRES] for row in flags]
    return _movies(_ids(frame, "movie id", source), frame["title"].tolist(), genres, path)


def _ml100k_genres(folder: Path) -> tuple[str, ...]:
    """Genre names in flag order from u.genre ("name|index" lines), else the standard 19."""
    path = folder / "u.genre"
    if not path.is_file():
        return ML100K_GENRES
    frame = _read_csv(path, sep="|", header=None, dtype=str, keep_default_na=False, encoding="latin-1")
    if frame.shape[1] != 2:
        raise MalformedDatasetError(f"{path} must hold 'name|index' lines, found {frame.shape[1]} fields per line")
    frame.columns = ["name", "index"]
    order = _ids(frame, "index", _Source(path, sep="|", names=("name", "index"), encoding="latin-1"))
    return tuple(frame["name"].to_numpy()[np.argsort(order)].tolist())


def _movies(item_ids: np.ndarray, titles: list[str], genres: list[list[str]], path: Path) -> pd.DataFrame:
    duplicated = pd.Series(item_ids).duplicated().to_numpy()
    if duplicated.any():
        raise MalformedDatasetError(f"{path} lists movie {item_ids[np.argmax(duplicated)]} more than once")
    return pd.DataFrame({"item_id": item_ids, "title": titles, "genres": genres,
                         "tags": [[g.lower() for g in names] for names in genres]})


def _description(title: str, genres: list[str]) -> str:
    text = f"Genres: {', '.join(genres)}." if genres else "No genres listed."
    year = YEAR_IN_TITLE.search(title)
    return f"{text} Released {year.group(1)}." if year else text


def _items(movies: pd.DataFrame, ratings: _Ratings) -> pd.DataFrame:
    """Items with created_at = the movie's first rating (NaT when never rated)."""
    first_rating = pd.Series(_utc(ratings.seconds)).groupby(ratings.item_id).min()
    created = movies["item_id"].map(first_rating).astype("datetime64[us, UTC]")
    return pd.DataFrame({
        "item_id": movies["item_id"],
        "title": movies["title"],
        "description": [_description(title, genres) for title, genres in zip(movies["title"], movies["genres"])],
        "tags": movies["tags"],
        "created_at": created,
        "active": True,
    })[list(ITEM_COLUMNS)]


def _utc(seconds: np.ndarray) -> pd.DatetimeIndex:
    """Unix seconds as microsecond UTC times, exact over all of SECONDS (a nanosecond step would overflow)."""
    return pd.DatetimeIndex(seconds.astype("datetime64[s]").astype("datetime64[us]")).tz_localize("UTC")


def _interactions(ratings: _Ratings) -> pd.DataFrame:
    order = np.argsort(ratings.seconds, kind="stable")
    occurred = pd.Series(_utc(ratings.seconds[order]))
    return pd.DataFrame({
        "user_id": ratings.user_id[order],
        "item_id": ratings.item_id[order],
        "event_type": "rating",
        "value": ratings.rating[order],
        "occurred_at": occurred,
        "ingested_at": occurred,
    })[list(INTERACTION_COLUMNS)]
