from __future__ import annotations

import re
from datetime import datetime, UTC
from pathlib import Path

import pandas as pd
import psycopg
import pytest

from recmodel import importers

COUNT_ROWS = "SELECT (SELECT count(*) FROM items), (SELECT count(*) FROM interactions)"


def _write(folder: Path, files: dict[str, str], encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text.encode(encoding))
    return folder


def _latest(folder: Path, *, ratings: str | None = None, movies: str | None = None) -> Path:
    """A tiny latest-format folder with CRLF line endings and a quoted, comma-bearing title."""
    return _write(folder, {
        "movies.csv": movies or ('movieId,title,genres\r\n1,"American President, The (1995)",Comedy|Drama\r\n'
                                 '2,Heat (1995),(no genres listed)\r\n'),
        "ratings.csv": ratings or "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,2,3.5,964981247\r\n"
                                  "2,7,5.0,964983000\r\n",
    })


def _ml100k(folder: Path) -> Path:
    genres = "".join(f"{name}|{index}\n" for index, name in enumerate(importers.ML100K_GENRES))
    flags = ["0"] * 19
    flags[2], flags[11] = "1", "1"  # Adventure, Horror
    return _write(folder, {
        "u.data": "1\t10\t4\t881250949\n2\t10\t2\t881250950\n2\t20\t5\t881250940\n",
        "u.item": (f"10|Amélie (2001)|01-Jan-2001||http://imdb/x|{'|'.join(flags)}\n"
                   f"20|Kolya (1996)|24-Jan-1997||http://imdb/y|{'|'.join(['1'] + ['0'] * 18)}\n"),
        "u.genre": genres,
    }, encoding="latin-1")


def test_movielens_latest_small_imports(db_url: str, movielens_dir: Path) -> None:
    summary = importers.import_movielens(db_url, movielens_dir)
    assert (summary.interactions, summary.items, summary.users, summary.format) == (100_836, 9_742, 610, "latest")
    assert summary.first_event_at < summary.last_event_at
    with psycopg.connect(db_url) as conn:
        assert conn.execute(COUNT_ROWS).fetchone() == (9_742, 100_836)
        title, description, tags = conn.execute(
            "SELECT title, description, tags FROM items WHERE item_id = 11").fetchone()
        kinds = conn.execute("SELECT array_agg(DISTINCT event_type) FROM interactions").fetchone()[0]
    assert title == "American President, The (1995)"
    assert description == "Genres: Comedy, Drama, Romance. Released 1995."
    assert tags[:3] == ["comedy", "drama", "romance"] and len(tags) <= importers.MAX_TAGS
    assert kinds == ["rating"]


def test_importing_twice_is_refused_and_changes_nothing(db_url: str, tmp_path: Path) -> None:
    folder = _latest(tmp_path / "ml")
    importers.import_movielens(db_url, folder)
    with pytest.raises(importers.DatabaseNotEmptyError, match="interactions already holds 3 rows"):
        importers.import_movielens(db_url, folder)
    with psycopg.connect(db_url) as conn:
        assert conn.execute(COUNT_ROWS).fetchone() == (2, 3)


def test_latest_format_details(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _latest(tmp_path / "ml")
    _write(folder, {"tags.csv": "userId,movieId,tag,timestamp\r\n1,1,Politics,1\r\n2,1,politics ,2\r\n"
                                "2,1,Comedy,3\r\n3,1,white house,4\r\n"})
    items, interactions = importers.read_movielens(folder)
    assert items["title"].tolist() == ["American President, The (1995)", "Heat (1995)"]
    assert items["tags"].tolist() == [["comedy", "drama", "politics", "white house"], []]
    assert items["description"].tolist() == ["Genres: Comedy, Drama. Released 1995.",
                                             "No genres listed. Released 1995."]
    assert items["created_at"].tolist() == [pd.Timestamp(964982703, unit="s", tz="UTC"),
                                            pd.Timestamp(964981247, unit="s", tz="UTC")]
    assert interactions["occurred_at"].is_monotonic_increasing
    assert interactions["ingested_at"].equals(interactions["occurred_at"])
    assert 7 in set(interactions["item_id"])  # unknown movie kept for validation to quarantine
    assert "1 ratings" in caplog.text


def test_ml100k_folder_imports(db_url: str, tmp_path: Path) -> None:
    folder = _ml100k(tmp_path / "ml-100k")
    summary = importers.import_movielens(db_url, folder)
    assert (summary.format, summary.items, summary.interactions, summary.users) == ("100k", 2, 3, 2)
    assert summary.first_event_at == datetime.fromtimestamp(881250940, UTC)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT item_id, title, description, tags, created_at FROM items ORDER BY 1").fetchall()
        values = conn.execute("SELECT array_agg(value ORDER BY event_id) FROM interactions").fetchone()[0]
    assert rows[0][:4] == (10, "Amélie (2001)", "Genres: Adventure, Horror. Released 2001.", ["adventure", "horror"])
    assert rows[0][4] == datetime.fromtimestamp(881250949, UTC)
    assert rows[1][2:4] == ("No genres listed. Released 1996.", [])
    assert values == [5.0, 4.0, 2.0]


@pytest.mark.parametrize(("layout", "message"), [
    ("no folder", "does not exist"),
    ("only ratings", r"looked for ratings\.csv \+ movies\.csv .* or u\.data \+ u\.item"),
    ("missing column", r"ratings\.csv lacks column\(s\) timestamp"),
    ("bad id", r"ratings\.csv line 3: movieId is 'abc', not a number"),
    ("bad timestamp", r"u\.data line 2: timestamp is missing"),
    ("duplicate movie", r"movies\.csv lists movie 1 more than once"),
])
def test_malformed_folders_name_the_problem(tmp_path: Path, layout: str, message: str) -> None:
    folder = tmp_path / "ml"
    if layout == "only ratings":
        _write(folder, {"ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n"})
    elif layout == "missing column":
        _latest(folder, ratings="userId,movieId,rating\n1,1,4.0\n")
    elif layout == "bad id":
        _latest(folder, ratings="userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,abc,4.0,964982703\n")
    elif layout == "bad timestamp":
        _ml100k(folder)
        _write(folder, {"u.data": "1\t10\t4\t881250949\n2\t10\t2\n"})
    elif layout == "duplicate movie":
        _latest(folder, movies="movieId,title,genres\n1,Heat (1995),Action\n1,Heat (1995),Crime\n")
    with pytest.raises(importers.MalformedDatasetError, match=message):
        importers.read_movielens(folder)


def test_malformed_folder_leaves_the_database_empty(db_url: str, tmp_path: Path) -> None:
    folder = _latest(tmp_path / "ml", ratings="userId,movieId,rating,timestamp\n1,x,4.0,1\n")
    with pytest.raises(importers.MalformedDatasetError):
        importers.import_movielens(db_url, folder)
    with psycopg.connect(db_url) as conn:
        assert conn.execute(COUNT_ROWS).fetchone() == (0, 0)


# Above 2**53 a float64 rounds ids (...993 to ...992); an id written "7.0" made pandas read the column as floats.
BIG_IDS = ("9007199254740993", "9007199254740995", "7.0", str(2**63 - 1), str(-(2**63)))


@pytest.mark.parametrize("layout", ["latest", "100k"])
def test_ids_are_imported_exactly(db_url: str, tmp_path: Path, layout: str) -> None:
    if layout == "latest":
        folder = _latest(tmp_path / "ml", ratings="userId,movieId,rating,timestamp\n" + "".join(
            f"{user},1,4.0,964982703\n" for user in BIG_IDS))
    else:
        folder = _ml100k(tmp_path / "ml")
        _write(folder, {"u.data": "".join(f"{user}\t10\t4\t881250949\n" for user in BIG_IDS)})
    importers.import_movielens(db_url, folder)
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT array_agg(user_id ORDER BY user_id) FROM interactions").fetchone()[0]
    assert stored == [-(2**63), 7, 9007199254740993, 9007199254740995, 2**63 - 1]


def test_timestamps_from_year_1_to_9999_are_imported(db_url: str, tmp_path: Path) -> None:
    seconds = [-62135596800, 0, 253402300799]  # 0001-01-01T00:00:00Z, 1970, 9999-12-31T23:59:59Z
    folder = _latest(tmp_path / "ml", ratings="userId,movieId,rating,timestamp\n" + "".join(
        f"1,1,4.0,{second}\n" for second in seconds))
    importers.import_movielens(db_url, folder)
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT array_agg(extract(epoch FROM occurred_at)::bigint ORDER BY occurred_at), "
                              "min(occurred_at) = '0001-01-01T00:00:00Z' FROM interactions").fetchone()
    assert stored == (seconds, True)


TOO_BIG = "10000000000000000000"
BIGINT_RANGE = "outside the bigint range -9223372036854775808..9223372036854775807"
UNIX_RANGE = "outside -62135596800..253402300799 (unix seconds of 0001-01-01 to 9999-12-31 UTC)"
HEADER = "userId,movieId,rating,timestamp\n"
FLAGS = "|".join("0" * 19)


@pytest.mark.parametrize(("file", "text", "message"), [
    ("ratings.csv", f"{HEADER}1,1,4.0,1\n{TOO_BIG},1,4.0,2\n", f"ratings.csv line 3: userId is '{TOO_BIG}', {BIGINT_RANGE}"),
    ("ratings.csv", f"{HEADER}-9223372036854775809,1,4.0,2\n",
     f"ratings.csv line 2: userId is '-9223372036854775809', {BIGINT_RANGE}"),
    ("ratings.csv", f"{HEADER}1,1,4.0,1\r\n\r\n1.5,1,4.0,2\r\n", "ratings.csv line 4: userId is '1.5', not a whole number"),
    ("ratings.csv", f"{HEADER}1,1,4.0,99999999999999\n", f"ratings.csv line 2: timestamp is '99999999999999', {UNIX_RANGE}"),
    ("ratings.csv", f"{HEADER}1,1,4.0,1\n1,2,4.0,9.6e8\n", "ratings.csv line 3: timestamp is '9.6e8', not a whole number"),
    ("ratings.csv", f"{HEADER}1,1,4.0,1\n1,1,1e400,1\n", "ratings.csv line 3: rating is '1e400', not a finite number"),
    ("ratings.csv", f"{HEADER}1,1,nan,1\n", "ratings.csv line 2: rating is 'nan', not a finite number"),
    ("ratings.csv", f"{HEADER}1,1,4.0,1\n1,1,,1\n", "ratings.csv line 3: rating is missing"),
    ("ratings.csv", f"{HEADER}1,1,4.0,1,5\n", "ratings.csv line 2 has 5 fields; expected 4 (userId, movieId"),
    ("movies.csv", f"movieId,title,genres\n1,A (1995),Drama\n{TOO_BIG},B (1996),Drama\n",
     f"movies.csv line 3: movieId is '{TOO_BIG}', {BIGINT_RANGE}"),
    ("tags.csv", "userId,movieId,tag,timestamp\n1,1,x,1\n1,9007199254740993.5,y,1\n",
     "tags.csv line 3: movieId is '9007199254740993.5', not a whole number"),
    ("u.data", f"1\t10\t4\t881250949\n{TOO_BIG}\t10\t4\t881250949\n", f"u.data line 2: user is '{TOO_BIG}', {BIGINT_RANGE}"),
    ("u.data", "1\t10\t4\t881250949\n2\t10\t-inf\t881250949\n", "u.data line 2: rating is '-inf', not a finite number"),
    ("u.data", "1\t10\tfour\t881250949\n", "u.data line 1: rating is 'four', not a number"),
    ("u.data", "1\t10\t4\t-99999999999\n", f"u.data line 1: timestamp is '-99999999999', {UNIX_RANGE}"),
    ("u.item", f"10|A (2001)|||x|{FLAGS}\n1.5|B (1996)|||y|{FLAGS}\n", "u.item line 2: movie id is '1.5', not a whole number"),
], ids=["id above bigint", "id below bigint", "fractional id after a blank line", "timestamp past 9999",
        "timestamp as float", "rating overflows", "rating nan", "rating missing", "extra field", "movies id",
        "tags id", "100k id", "100k rating -inf", "100k rating text", "100k timestamp before year 1", "100k item id"])
def test_a_malformed_value_is_refused_naming_file_line_and_value(tmp_path: Path, file: str, text: str,
                                                                 message: str) -> None:
    folder = _ml100k(tmp_path / "ml") if file.startswith("u.") else _latest(tmp_path / "ml")
    _write(folder, {file: text})
    with pytest.raises(importers.MalformedDatasetError, match=re.escape(f"{folder}/{message}")):
        importers.read_movielens(folder)
