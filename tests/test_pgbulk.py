"""Bulk COPY in and out of a real Postgres: values, NULLs and hostile strings survive the round trip."""

from __future__ import annotations

from datetime import datetime, timedelta, UTC

import numpy as np
import pyarrow as pa
import pytest

from recmodel import db, pgbulk
from recmodel.publish import PublishError, publish
from tests.test_publish import frames, register

HOSTILE = ["plain", "tab\there", "new\nline", "back\\slash", "\\N", "", "carriage\rreturn", "émoji 🎬",
           "quote'\"", "\\\\n", "trailing\\"]
SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.string()), ("value", pa.float64()),
                    ("at", pa.timestamp("us", tz="UTC"))])


def _fill(url: str, labels: list[str | None], values: list[float | None]) -> None:
    with db.transaction(url) as conn:
        conn.execute("CREATE TABLE bulk (id bigint, label text, value real, at timestamptz)")
        with conn.cursor() as cursor:
            cursor.executemany("INSERT INTO bulk VALUES (%s, %s, %s, %s)", [
                (i, label, value, datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=7 * i))
                for i, (label, value) in enumerate(zip(labels, values))])


def test_read_batches_returns_every_value_nulls_and_hostile_strings_unchanged(db_url: str) -> None:
    labels = HOSTILE + [None]
    values = [float(i) / 4 for i in range(len(HOSTILE))] + [None]
    _fill(db_url, labels, values)
    table = pa.Table.from_batches(
        list(pgbulk.read_batches(db_url, "SELECT id, label, value::float8, at FROM bulk ORDER BY id", SCHEMA)),
        schema=SCHEMA)
    assert table.column("label").to_pylist() == labels
    assert table.column("value").to_pylist() == values
    assert table.column("at").to_pylist()[-1] == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(
        microseconds=7 * (len(labels) - 1))


def test_read_batches_streams_many_rows_in_bounded_batches(db_url: str) -> None:
    query = ("SELECT g::int8, 'x' || g, g::float8, timestamptz '2026-01-01' + g * interval '1 second' "
             "FROM generate_series(1, 300000) g")
    batches = list(pgbulk.read_batches(db_url, query, SCHEMA))
    assert len(batches) > 1  # parsed as the stream arrives, not loaded whole
    ids = np.concatenate([b.column(0).to_numpy() for b in batches])
    assert np.array_equal(ids, np.arange(1, 300_001))


def test_read_batches_of_an_empty_result_yields_nothing(db_url: str) -> None:
    assert list(pgbulk.read_batches(db_url, "SELECT 1::int8, 'a', 1.0::float8, now() WHERE false", SCHEMA)) == []


def test_read_batches_reports_a_failing_query_and_a_column_mismatch(db_url: str) -> None:
    with pytest.raises(pgbulk.BulkCopyError, match="no_such_table"):
        list(pgbulk.read_batches(db_url, "SELECT * FROM no_such_table", SCHEMA))
    with pytest.raises(pgbulk.BulkCopyError, match="do not match|does not match"):
        list(pgbulk.read_batches(db_url, "SELECT 'not a number', 'a', 1.0::float8, now()", SCHEMA))


def test_binary_copy_stream_loads_exact_values(db_url: str) -> None:
    generated = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=UTC)
    ids = np.array([1, -5, 2**62], dtype=np.int64)
    scores = np.array([0.5, -0.125, 3.25], dtype=np.float32)
    with db.transaction(db_url) as conn:
        conn.execute("CREATE TABLE loaded (id int8, rank int4, score float4, version text, at timestamptz)")
        with conn.cursor().copy("COPY loaded FROM STDIN (FORMAT BINARY)") as copy:
            for chunk in pgbulk.binary_copy_stream(
                    [("int8", ids), ("int4", np.arange(1, 4)), ("float4", scores), ("text", "v20261101123015"),
                     ("timestamptz", generated)], rows=3, chunk_rows=2):
                copy.write(chunk)
        rows = conn.execute("SELECT id, rank, score, version, at FROM loaded ORDER BY rank").fetchall()
    assert rows == [(int(i), r, float(s), "v20261101123015", generated)
                    for i, r, s in zip(ids, range(1, 4), scores)]


def test_binary_copy_stream_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(pgbulk.BulkCopyError, match="2 values for 3 rows"):
        list(pgbulk.binary_copy_stream([("int8", np.arange(2))], rows=3))
    with pytest.raises(pgbulk.BulkCopyError, match="no binary layout for Postgres type 'jsonb'"):
        list(pgbulk.binary_copy_stream([("jsonb", "{}")], rows=1))
    with pytest.raises(pgbulk.BulkCopyError, match="timezone-aware"):
        list(pgbulk.binary_copy_stream([("timestamptz", datetime(2026, 1, 1))], rows=1))


@pytest.mark.reliability
def test_publish_refuses_duplicate_keys_and_serves_nothing_new(db_url: str) -> None:
    register(db_url, "v20261101000000")
    broken = frames(users=3, k=2, seed=0)
    broken["user_recommendations"].loc[1, "rank"] = 1  # user 1 has rank 1 twice
    with pytest.raises(PublishError, match="user_recommendations: the new rows cannot be loaded .*duplicate"):
        publish(db_url, "v20261101000000", broken, generated_at=datetime.now(UTC), keep_versions=3)
    with db.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM recsys.user_recommendations").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%%staging'").fetchone()[0] == 0


def test_binary_copy_stream_takes_airflow_pendulum_datetimes(db_url: str) -> None:
    import pendulum

    generated = pendulum.datetime(2026, 11, 1, 12, 30, 15, 999999, tz="Europe/Berlin")
    with db.transaction(db_url) as conn:
        conn.execute("CREATE TABLE stamped (at timestamptz)")
        with conn.cursor().copy("COPY stamped FROM STDIN (FORMAT BINARY)") as copy:
            for chunk in pgbulk.binary_copy_stream([("timestamptz", generated)], rows=1):
                copy.write(chunk)
        assert conn.execute("SELECT at FROM stamped").fetchone()[0] == generated
