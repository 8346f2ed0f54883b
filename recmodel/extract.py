"""Extract: new interactions since the last watermark, streamed from Postgres into Parquet.

The window is ``(low - lookback, as_of]`` on `ingested_at`, where `low` is the high watermark
of the newest committed run before this one. Reading a little before the watermark picks up
rows whose transaction committed after an earlier extract had already passed their
`ingested_at` (late data); rows already folded into a dataset or quarantined are dropped by
event_id, so each row is used exactly once. Because the bounds come from the watermark table
and the run's own as-of time, a rerun of the same run reads the same rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from recmodel import db, pgbulk, registry
from recmodel.artifacts import CATALOG_FILE, INCREMENT_FILE
from recmodel.config import PipelineConfig
from recmodel.data import RAW_OCCURRED_AT
from recmodel.errors import PermanentError

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 262_144  # rows buffered per Parquet row group: bounds the extract's memory
MAX_EVENT_ID = 2**63 - 1  # what a first run has "read": no row is above it, so its window reads everything
EVENT_TYPE_MAX_CHARS = 256  # longer event types are cut at the source (no setting names one this long)
MAX_TAGS = 64  # tags kept per item in the catalog snapshot

INTERACTION_SCHEMA = pa.schema([
    ("event_id", pa.int64()),
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("event_type", pa.string()),
    ("value", pa.float64()),
    ("occurred_at", pa.timestamp("us", tz="UTC")),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
    (RAW_OCCURRED_AT, pa.string()),
])
CATALOG_SCHEMA = pa.schema([
    ("item_id", pa.int64()),
    ("title", pa.string()),
    ("description", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("active", pa.bool_()),
])

SELECT_PREVIOUS_WATERMARK = """
SELECT run_key, high_watermark, dataset_path, max_event_id
FROM recsys.extract_watermarks
WHERE high_watermark < %(as_of)s AND run_key <> %(run_key)s
ORDER BY high_watermark DESC LIMIT 1
"""
# Rows whose every open quarantine entry (of other runs) has a replay request: re-read whatever
# their ingested_at. Entries this run replayed count as open, so a rerun of it reads the same rows.
REPLAY_PENDING = """
SELECT event_id FROM recsys.quarantine
WHERE run_key <> {run_key} AND (replayed_by IS NULL OR replayed_by = {run_key})
  AND event_id IN (SELECT event_id FROM recsys.quarantine WHERE replay_requested_at IS NOT NULL
                   AND (replayed_by IS NULL OR replayed_by = {run_key}))
GROUP BY event_id HAVING bool_and(replay_requested_at IS NOT NULL)
"""
# Every value the source's column types accept must reach validation, so the columns are read in forms the
# bulk reader always parses: occurred_at only within the years 1..9999 (infinity, -infinity, BC dates and
# years past 9999 come as NULL, with their text in RAW_OCCURRED_AT), event_type cut to EVENT_TYPE_MAX_CHARS
# (an unbounded field would outgrow the reader's block), and numeric values beyond float8 as +-Infinity
# (a plain cast would fail the whole COPY). Validation then quarantines each such row with its reason.
READABLE_TIME = "BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'"  # what Arrow and Python hold
READABLE_OCCURRED_AT = f"occurred_at {READABLE_TIME}"
INCREMENT_COLUMNS = f"""
event_id, user_id, item_id, left(event_type, {EVENT_TYPE_MAX_CHARS}),
CASE WHEN value IS NULL OR value = 'NaN' OR abs(value) <= 1e308 THEN value::float8
     WHEN value > 0 THEN 'Infinity'::float8 ELSE '-Infinity'::float8 END,
CASE WHEN {READABLE_OCCURRED_AT} THEN occurred_at END,
ingested_at,
CASE WHEN NOT ({READABLE_OCCURRED_AT}) THEN occurred_at::text END"""
# Branches rather than one OR, so each keeps its index range scan on a large table: the ingested_at window;
# rows no earlier run read whose ingested_at is already behind it (appended with a historical ingested_at:
# found by an event_id above any read before); and quarantined rows up for replay.
SELECT_INCREMENT = f"""
SELECT {INCREMENT_COLUMNS}
FROM interactions
WHERE ingested_at > {{low}} AND ingested_at <= {{high}}
UNION ALL
SELECT {INCREMENT_COLUMNS}
FROM interactions
WHERE event_id > {{max_seen}} AND ingested_at <= {{low}}
UNION ALL
SELECT {INCREMENT_COLUMNS}
FROM interactions
WHERE ingested_at <= {{low}} AND event_id <= {{max_seen}} AND event_id IN (""" + REPLAY_PENDING + """)
"""
# Quarantined by an earlier run and not (or not yet) up for replay: never read again.
SELECT_QUARANTINED_IN_WINDOW = """
SELECT DISTINCT q.event_id
FROM recsys.quarantine q JOIN interactions i USING (event_id)
WHERE i.ingested_at > %(low)s AND i.ingested_at <= %(high)s AND q.run_key <> %(run_key)s
  AND q.replayed_by IS NULL AND q.replay_requested_at IS NULL
"""
MARK_REPLAYED = """
UPDATE recsys.quarantine SET replayed_by = %(run_key)s
WHERE event_id = ANY(%(event_ids)s) AND run_key <> %(run_key)s
  AND replay_requested_at IS NOT NULL AND replayed_by IS NULL
"""
REQUEST_REPLAY = """
UPDATE recsys.quarantine SET replay_requested_at = now()
WHERE reason = %(reason)s AND replayed_by IS NULL AND replay_requested_at IS NULL
  AND (%(run_key)s::text IS NULL OR run_key = %(run_key)s)
"""
# Tags travel as JSON: COPY's text form of an array is not something Arrow parses. Text is cut to a
# bound (`item_text_max_chars` per field, MAX_TAGS tags): the encoder reads a few hundred tokens of
# it anyway, and one unbounded row would outgrow the bulk reader's block. created_at is read where a
# snapshot can hold it (else NULL: no creation time known), like interactions' occurred_at. The last column
# says whether the row's text was cut, so the extract reports it without reading the table a second time.
SELECT_CATALOG = f"""
SELECT item_id, left(title, {{max_chars}}), left(description, {{max_chars}}),
       CASE WHEN tags IS NOT NULL THEN array_to_json(ARRAY(
           SELECT left(t.tag, {{max_chars}}) FROM unnest(tags[1:{{max_tags}}]) WITH ORDINALITY AS t(tag, n)
           ORDER BY t.n))::text END,
       CASE WHEN created_at {READABLE_TIME} THEN created_at END,
       active,
       COALESCE(length(title) > {{max_chars}} OR length(description) > {{max_chars}}
                OR cardinality(tags) > {{max_tags}}
                OR EXISTS (SELECT 1 FROM unnest(tags) AS tag WHERE length(tag) > {{max_chars}}), false)
FROM items ORDER BY item_id
"""
TEXT_CUT = "text_cut"
CATALOG_WIRE_SCHEMA = CATALOG_SCHEMA.set(CATALOG_SCHEMA.get_field_index("tags"),
                                         pa.field("tags", pa.string())).append(pa.field(TEXT_CUT, pa.bool_()))

# What the fresh-data check counts: rows ingested after the data the newest served (or settled) version
# learned from, plus rows no extract has read yet whatever their ingested_at (appended with a historical one).
# Not after the newest snapshot: a snapshot whose training failed has taught nothing.
COUNT_SINCE_TRAINED = f"""
SELECT count(*) FROM interactions
WHERE ingested_at > COALESCE(({registry.SELECT_TRAINED_THROUGH}), '-infinity')
   OR event_id > COALESCE((SELECT max(max_event_id) FROM recsys.extract_watermarks), {MAX_EVENT_ID})
"""
# The source's column types, checked before reading: a changed type would otherwise surface as an
# Arrow parse error deep in the COPY, or worse, as silently different values.
SELECT_SOURCE_COLUMNS = """
SELECT table_name, column_name, data_type FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name IN ('interactions', 'items')
"""
SOURCE_TYPES = {
    "interactions": {"event_id": {"bigint", "integer"}, "user_id": {"bigint", "integer"},
                     "item_id": {"bigint", "integer"}, "event_type": {"text", "character varying"},
                     "value": {"real", "double precision", "numeric", "integer", "smallint"},
                     "occurred_at": {"timestamp with time zone"}, "ingested_at": {"timestamp with time zone"}},
    "items": {"item_id": {"bigint", "integer"}, "title": {"text", "character varying"},
              "description": {"text", "character varying"}, "tags": {"ARRAY"},
              "created_at": {"timestamp with time zone"}, "active": {"boolean"}},
}


class ExtractError(PermanentError, RuntimeError):
    """The source tables cannot be read as needed."""


@dataclass(frozen=True)
class ExtractResult:
    increment_path: str
    catalog_path: str
    rows: int
    rows_already_seen: int
    low_watermark: datetime | None
    high_watermark: datetime
    base_dataset_path: str | None  # the previous run's dataset, which this increment extends
    catalog_items: int
    catalog_items_truncated: int = 0  # items whose text was cut to `item_text_max_chars` (or MAX_TAGS tags)
    max_event_id: int | None = None  # the highest event_id read by this run or any before it
    rows_behind_watermark: int = 0  # rows read whose ingested_at was already behind the watermark (appended late)


def extract(url: str, run_key: str, as_of: datetime, run_dir: Path, *, lookback: timedelta,
            text_max_chars: int = PipelineConfig.item_text_max_chars) -> ExtractResult:
    """Write this run's increment and a catalog snapshot under `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with db.connect(url) as conn:
        check_source_schema(conn)
        previous = conn.execute(SELECT_PREVIOUS_WATERMARK, {"as_of": as_of, "run_key": run_key}).fetchone()
        low = previous[1] if previous else None
        base_dataset = previous[2] if previous else None
        max_seen = _max_event_id_read(previous)
        read_from = (low - lookback) if low else datetime(1, 1, 1, tzinfo=UTC)
        # Never past the database's clock: rows stamped later have not arrived yet, and a watermark
        # beyond now would hide them from every later run.
        high = min(as_of, conn.execute("SELECT now()").fetchone()[0].astimezone(UTC))
        used_ids = _already_used_ids(conn, run_key, base_dataset, read_from, high)
        increment_path = run_dir / INCREMENT_FILE
        streamed = _stream_increment(conn, url, run_key, read_from, high, increment_path, used_ids, max_seen)
        catalog_path = run_dir / CATALOG_FILE
        catalog_items, truncated = _snapshot_catalog(conn, url, catalog_path, text_max_chars)
    if catalog_items == 0:
        raise ExtractError("the items table is empty: load a catalog (seed, import movielens, or your app) first")
    rows, skipped = streamed.rows, streamed.skipped
    log.info("extracted %d new interactions with ingested_at in (%s, %s] (%d re-read rows already used)",
             rows, read_from, high, skipped)
    if streamed.behind_watermark:
        log.warning("%d of them were added with an ingested_at already behind the previous run's watermark (a "
                    "historical import after the first run?): found by their event_id, they are read now",
                    streamed.behind_watermark)
    if truncated:
        log.warning("%d items have text longer than item_text_max_chars=%d characters per field (or more than %d "
                    "tags): the snapshot keeps the first %d of each, which is more than the text encoder reads",
                    truncated, text_max_chars, MAX_TAGS, text_max_chars)
    return ExtractResult(increment_path=str(increment_path), catalog_path=str(catalog_path), rows=rows,
                         rows_already_seen=skipped, low_watermark=low, high_watermark=high,
                         base_dataset_path=base_dataset, catalog_items=catalog_items,
                         catalog_items_truncated=truncated, max_event_id=streamed.max_event_id,
                         rows_behind_watermark=streamed.behind_watermark)


def check_source_schema(conn) -> None:
    """Fail before reading when a source column is missing or changed type; the message names each one."""
    found = {(table, column): data_type for table, column, data_type in conn.execute(SELECT_SOURCE_COLUMNS)}
    problems = []
    for table, columns in SOURCE_TYPES.items():
        for column, allowed in columns.items():
            actual = found.get((table, column))
            if actual is None:
                problems.append(f"{table}.{column} is missing")
            elif actual not in allowed:
                problems.append(f"{table}.{column} is {actual}, expected {' or '.join(sorted(allowed))}")
    if problems:
        raise ExtractError("the source tables changed schema: " + "; ".join(problems)
                           + " (docs/ARCHITECTURE.md lists the columns the pipeline reads)")


def _already_used_ids(conn, run_key: str, base_dataset: str | None, low: datetime, high: datetime) -> np.ndarray:
    """Sorted event ids of the window that the previous dataset holds or an earlier run quarantined."""
    quarantined = [row[0] for row in conn.execute(
        SELECT_QUARANTINED_IN_WINDOW, {"low": low, "high": high, "run_key": run_key}).fetchall()]
    used = [np.asarray(quarantined, dtype=np.int64)]
    if base_dataset is not None:
        table = pq.read_table(base_dataset, columns=["event_id", "ingested_at"],
                              filters=[("ingested_at", ">", pd.Timestamp(low))])
        used.append(table.column("event_id").to_numpy())
    return np.unique(np.concatenate(used))


def _max_event_id_read(previous: tuple | None) -> int | None:
    """The highest event_id an earlier run read (None before any); for a run recorded before the watermark
    kept it, the highest in its dataset."""
    if previous is None:
        return None
    if previous[3] is not None:
        return int(previous[3])
    return pc.max(pq.read_table(previous[2], columns=["event_id"]).column("event_id")).as_py()


@dataclass(frozen=True)
class _Streamed:
    rows: int  # written to the increment
    skipped: int  # read again but already used (in the previous dataset, or quarantined by an earlier run)
    behind_watermark: int  # written rows found by event_id although their ingested_at is behind the window
    max_event_id: int | None  # the highest event_id read by this run or an earlier one


def _stream_increment(conn, url: str, run_key: str, low: datetime, high: datetime, path: Path,
                      used_ids: np.ndarray, max_seen: int | None) -> _Streamed:
    """COPY the window (and rows up for replay, and rows appended behind the watermark) into Parquet,
    ROW_GROUP_ROWS at a time, so memory stays flat as rows grow."""
    read_above = MAX_EVENT_ID if max_seen is None else max_seen  # rows above it are read whatever their ingested_at
    query = sql.SQL(SELECT_INCREMENT).format(low=sql.Literal(low), high=sql.Literal(high),
                                             run_key=sql.Literal(run_key),
                                             max_seen=sql.Literal(read_above)).as_string(conn)
    rows = skipped = behind = 0
    highest = max_seen
    window_start = np.datetime64(low.astimezone(UTC).replace(tzinfo=None))
    tmp = path.with_suffix(".tmp")
    # Dictionary-encoding only event_type: ids and timestamps gain nothing from it but cost 40% of the write.
    with pq.ParquetWriter(tmp, INTERACTION_SCHEMA, use_dictionary=["event_type"]) as writer:
        def flush(batches: list[pa.RecordBatch]) -> None:
            nonlocal rows, skipped, behind, highest
            table = pa.Table.from_batches(batches, schema=INTERACTION_SCHEMA)
            event_ids = table.column("event_id").to_numpy()
            newest = int(event_ids.max())
            highest = newest if highest is None else max(highest, newest)
            used = np.isin(event_ids, used_ids)
            if used.any():
                table = table.filter(pa.array(~used))
            skipped += int(used.sum())
            rows += table.num_rows
            behind += int(np.sum((table.column("event_id").to_numpy() > read_above)
                                 & (table.column("ingested_at").to_numpy() <= window_start)))
            writer.write_table(table)

        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in pgbulk.read_batches(url, query, INTERACTION_SCHEMA):
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                flush(pending)
                pending, pending_rows = [], 0
        if pending:
            flush(pending)
    tmp.replace(path)
    return _Streamed(rows=rows, skipped=skipped, behind_watermark=behind, max_event_id=highest)


def _snapshot_catalog(conn, url: str, path: Path, text_max_chars: int) -> tuple[int, int]:
    """The items table via COPY (a 50k-item catalog: 0.33 s as Python rows before), text cut to its bound:
    (items, items whose text was cut)."""
    query = sql.SQL(SELECT_CATALOG).format(max_chars=sql.Literal(text_max_chars),
                                           max_tags=sql.Literal(MAX_TAGS)).as_string(conn)
    wire = pa.Table.from_batches(list(pgbulk.read_batches(url, query, CATALOG_WIRE_SCHEMA)),
                                 schema=CATALOG_WIRE_SCHEMA)
    tags = pa.array([None if t is None else json.loads(t) for t in wire.column("tags").to_pylist()],
                    type=pa.list_(pa.string()))
    cut = pc.sum(wire.column(TEXT_CUT)).as_py() or 0
    table = wire.drop_columns([TEXT_CUT]).set_column(CATALOG_SCHEMA.get_field_index("tags"),
                                                     CATALOG_SCHEMA.field("tags"), tags)
    pq.write_table(table, path)
    return table.num_rows, cut


def fresh_interactions(url: str) -> tuple[int, bool]:
    """(rows ingested after what the newest judged model learned from, whether a retrain is alive now):
    the asset check's input. A run counts as alive only while its heartbeat is fresh, so a killed run
    does not hold retraining back."""
    with db.connect(url) as conn:
        rows = conn.execute(COUNT_SINCE_TRAINED).fetchone()[0]
    return rows, bool(registry.live_runs(url))


def request_replay(url: str, reason: str, run_key: str | None = None) -> tuple[int, int]:
    """Mark open quarantine entries of `reason` (optionally of one run) for the next run to re-read.

    Returns (entries marked, rows the next run will re-read): a row quarantined for several reasons
    is re-read only once every one of them has been replayed.
    """
    with db.transaction(url) as conn:
        marked = conn.execute(REQUEST_REPLAY, {"reason": reason, "run_key": run_key}).rowcount
        pending = conn.execute(sql.SQL("SELECT count(*) FROM ({}) p").format(
            sql.SQL(REPLAY_PENDING).format(run_key=sql.Literal("")))).fetchone()[0]
    log.info("quarantine replay %s%s: %d entries marked; the next run re-reads %d rows", reason,
             f" (run {run_key})" if run_key else "", marked, pending)
    return marked, pending


def mark_replayed(conn, run_key: str, event_ids: np.ndarray) -> int:
    """In the caller's transaction: the replayed rows of this increment are now this run's business."""
    return conn.execute(MARK_REPLAYED, {"run_key": run_key, "event_ids": [int(i) for i in event_ids]}).rowcount


# How an increment is read: ids as nullable Int64 (a NULL id must not turn the column into float64, which
# cannot hold ids above 2**53 exactly) and value as Arrow float64, which keeps NaN apart from NULL.
INCREMENT_DTYPES = {pa.int64(): pd.Int64Dtype(), pa.float64(): pd.ArrowDtype(pa.float64())}


def read_increment(path: str | Path) -> pd.DataFrame:
    """An extracted increment, with its NULLs and non-finite values as they are in the source."""
    return pq.read_table(path).to_pandas(types_mapper=INCREMENT_DTYPES.get)


def read_interactions(path: str | Path) -> pd.DataFrame:
    """A clean dataset snapshot (no NULL ids): plain numpy dtypes."""
    return pq.read_table(path).to_pandas()


def read_catalog(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


UPSERT_WATERMARK = """
INSERT INTO recsys.extract_watermarks (run_key, low_watermark, high_watermark, rows_extracted, rows_clean,
    dataset_path, dataset_rows, max_event_id)
VALUES (%(run_key)s, %(low)s, %(high)s, %(rows_extracted)s, %(rows_clean)s, %(dataset_path)s, %(dataset_rows)s,
        %(max_event_id)s)
ON CONFLICT (run_key) DO UPDATE
SET low_watermark = EXCLUDED.low_watermark, high_watermark = EXCLUDED.high_watermark,
    rows_extracted = EXCLUDED.rows_extracted, rows_clean = EXCLUDED.rows_clean,
    dataset_path = EXCLUDED.dataset_path, dataset_rows = EXCLUDED.dataset_rows,
    max_event_id = EXCLUDED.max_event_id, committed_at = now()
"""


def commit_watermark(conn, run_key: str, extracted: ExtractResult, *, rows_clean: int, dataset_path: str,
                     dataset_rows: int) -> None:
    """Record that rows up to the high watermark are folded into `dataset_path` (in the caller's transaction)."""
    conn.execute(UPSERT_WATERMARK, {
        "run_key": run_key, "low": extracted.low_watermark, "high": extracted.high_watermark,
        "rows_extracted": extracted.rows, "rows_clean": rows_clean, "dataset_path": dataset_path,
        "dataset_rows": dataset_rows, "max_event_id": extracted.max_event_id,
    })


DELETE_QUARANTINE = "DELETE FROM recsys.quarantine WHERE run_key = %s"
COPY_QUARANTINE = "COPY recsys.quarantine (run_key, event_id, reason, row_data) FROM STDIN"
# Increment sizes of the runs before this one, for the volume check (newest first).
SELECT_PREVIOUS_VOLUMES = """
SELECT rows_extracted FROM recsys.extract_watermarks
WHERE high_watermark < %(as_of)s AND run_key <> %(run_key)s
ORDER BY high_watermark DESC LIMIT %(limit)s
"""


def previous_volumes(url: str, run_key: str, as_of: datetime, limit: int) -> tuple[int, ...]:
    """How many rows each of the last `limit` runs before `as_of` extracted, newest first."""
    with db.connect(url) as conn:
        return tuple(row[0] for row in conn.execute(SELECT_PREVIOUS_VOLUMES,
                                                    {"as_of": as_of, "run_key": run_key, "limit": limit}))


def write_quarantine(conn, run_key: str, rows: Iterable[tuple[int, str, str]]) -> None:
    """Replace this run's quarantine entries, (event_id, reason, row as JSON) each, with COPY (in the caller's
    transaction): a rerun writes the same set again."""
    conn.execute(DELETE_QUARANTINE, (run_key,))
    with conn.cursor().copy(COPY_QUARANTINE) as copy:
        for event_id, reason, row_json in rows:
            copy.write_row((run_key, event_id, reason, row_json))
