"""Import a MovieLens dataset (the "latest"/ml-25m CSV layout or ml-100k) into items and interactions.

Every rating becomes one "rating" interaction, ingested when it occurred (a historical import).
Ratings of movies missing from the movies file are kept: validation quarantines unknown items
later, so the import only reports how many there are.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

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
        ratings = _ratings(_read_csv(ratings_file), ratings_file, ("userId", "movieId", "rating", "timestamp"),
                           first_line=2)
    else:
        movies, ratings_file = _ml100k_movies(folder), folder / "u.data"
        names = ("user", "item", "rating", "timestamp")
        ratings = _ratings(_read_csv(ratings_file, sep="\t", header=None, names=list(names)), ratings_file, names,
                           first_line=1)
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
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise MalformedDatasetError(f"{path} lacks column(s) {', '.join(missing)} "
                                    f"(has {', '.join(map(str, frame.columns))})")


def _numeric(frame: pd.DataFrame, column: str, path: Path, first_line: int) -> np.ndarray:
    """The column as numbers; the first empty or non-numeric value is reported by its line in `path`."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raw = frame[column].iloc[row]
        problem = "missing" if pd.isna(raw) or str(raw).strip() == "" else f"{str(raw)!r}, not a number"
        raise MalformedDatasetError(f"{path} line {row + first_line}: {column} is {problem}")
    return values.to_numpy()


def _ids(frame: pd.DataFrame, column: str, path: Path, first_line: int) -> np.ndarray:
    values = _numeric(frame, column, path, first_line)
    fractional = values != np.floor(values)
    if fractional.any():
        row = int(np.argmax(fractional))
        raise MalformedDatasetError(f"{path} line {row + first_line}: {column} is {values[row]!r}, not an integer")
    return values.astype(np.int64)


def _ratings(frame: pd.DataFrame, path: Path, columns: tuple[str, ...], *, first_line: int) -> _Ratings:
    """`columns` names user, item, rating and unix-seconds columns; `first_line` is the file line of row 0."""
    _require_columns(frame, path, columns)
    user, item, rating, timestamp = columns
    return _Ratings(user_id=_ids(frame, user, path, first_line), item_id=_ids(frame, item, path, first_line),
                    rating=_numeric(frame, rating, path, first_line).astype(float),
                    seconds=_ids(frame, timestamp, path, first_line))


def _latest_movies(folder: Path) -> pd.DataFrame:
    """movieId, title and tags (genres, then the most used user tags) from movies.csv and tags.csv."""
    path = folder / "movies.csv"
    frame = _read_csv(path, dtype=str, keep_default_na=False)
    _require_columns(frame, path, ("movieId", "title", "genres"))
    genres = [[g for g in value.split("|") if g and g not in NO_GENRES] for value in frame["genres"]]
    movies = _movies(_ids(frame, "movieId", path, first_line=2), frame["title"].tolist(), genres, path)
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
    tags = pd.DataFrame({"item_id": _ids(frame, "movieId", path, first_line=2),
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
    flags = np.column_stack([_ids(frame, name, path, first_line=1) for name in genre_names])
    genres = [[name for name, flag in zip(genre_names, row) if flag and name not in NO_GENRES] for row in flags]
    return _movies(_ids(frame, "movie id", path, first_line=1), frame["title"].tolist(), genres, path)


def _ml100k_genres(folder: Path) -> tuple[str, ...]:
    """Genre names in flag order from u.genre ("name|index" lines), else the standard 19."""
    path = folder / "u.genre"
    if not path.is_file():
        return ML100K_GENRES
    frame = _read_csv(path, sep="|", header=None, dtype=str, keep_default_na=False, encoding="latin-1")
    if frame.shape[1] != 2:
        raise MalformedDatasetError(f"{path} must hold 'name|index' lines, found {frame.shape[1]} fields per line")
    frame.columns = ["name", "index"]
    order = _ids(frame, "index", path, first_line=1)
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
    first_rating = pd.Series(ratings.seconds).groupby(ratings.item_id).min()
    created = pd.to_datetime(movies["item_id"].map(first_rating), unit="s", utc=True).dt.as_unit("us")
    return pd.DataFrame({
        "item_id": movies["item_id"],
        "title": movies["title"],
        "description": [_description(title, genres) for title, genres in zip(movies["title"], movies["genres"])],
        "tags": movies["tags"],
        "created_at": created,
        "active": True,
    })[list(ITEM_COLUMNS)]


def _interactions(ratings: _Ratings) -> pd.DataFrame:
    order = np.argsort(ratings.seconds, kind="stable")
    occurred = pd.Series(pd.to_datetime(ratings.seconds[order], unit="s", utc=True).as_unit("us"))
    return pd.DataFrame({
        "user_id": ratings.user_id[order],
        "item_id": ratings.item_id[order],
        "event_type": "rating",
        "value": ratings.rating[order],
        "occurred_at": occurred,
        "ingested_at": occurred,
    })[list(INTERACTION_COLUMNS)]
