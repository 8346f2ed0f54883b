"""Publishing: versioned tables behind reader-facing views, swapped in one short transaction.

1. Load: for each serving table, a new `recsys.<view>__<version>__staging` table (NOT NULL
   columns) is filled with binary COPY encoded by numpy, indexed (unique key), analysed and
   checked (every row arrived, ranks contiguous). This transaction is long but touches nothing
   readers use.
2. Swap: one transaction repoints the three views (CREATE OR REPLACE VIEW keeps grants), renames
   the staging tables to their final names, marks the version serving and promotes it in the
   registry. Readers see the old version or the new one, never a mix or an empty table.
3. Prune: tables of published versions beyond the newest `keep_versions` are dropped; the
   registry and `published_versions` keep their rows.

A database advisory lock serialises publishes and rollbacks, so two runs cannot both publish.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from collections.abc import Callable

import pandas as pd
import psycopg
from psycopg import sql

from recmodel import db, pgbulk, registry
from recmodel.locks import AdvisoryLock, TRANSACTION_LOCK

log = logging.getLogger(__name__)

# Repointing a view waits at most this long for its lock; readers arriving meanwhile queue behind the
# request, so this is also the longest a reader is held up by a swap. Retried with backoff.
VIEW_LOCK_TIMEOUT_MS = 50
RETRY_FIRST_DELAY_SECONDS = 0.05
RETRY_MAX_DELAY_SECONDS = 2.0
VIEW_LOCK_PATIENCE_SECONDS = 600.0  # a reader holding a view longer than this fails the publish, naming it
VERSION_PATTERN = re.compile(r"^v[0-9]{14}(-baseline)?$")  # a run's model, or the baseline it served instead


@dataclass(frozen=True)
class ServingTable:
    view: str
    columns: tuple[tuple[str, str], ...]  # (name, Postgres type name) in contract order, NOT NULL
    key: tuple[str, ...]  # unique per version; indexed for readers
    # Columns added after the contract's: nullable (NULL where a frame has none), listed after served_by
    # in the view, as CREATE OR REPLACE VIEW can only add columns at the end.
    added: tuple[tuple[str, str], ...] = ()


SERVING_TABLES = (
    ServingTable("user_recommendations",
                 (("user_id", "int8"), ("rank", "int4"), ("item_id", "int8"), ("score", "float4"),
                  ("model_version", "text"), ("generated_at", "timestamptz")),
                 ("user_id", "rank"),
                 added=(("because_item_id", "int8"),)),
    ServingTable("similar_items",
                 (("item_id", "int8"), ("rank", "int4"), ("similar_item_id", "int8"), ("score", "float4"),
                  ("model_version", "text")),
                 ("item_id", "rank")),
    ServingTable("popular_items",
                 (("rank", "int4"), ("item_id", "int8"), ("score", "float4"), ("model_version", "text")),
                 ("rank",)),
)

UNMARK_SERVING = "UPDATE recsys.published_versions SET serving = false WHERE serving AND version <> %(version)s"
MARK_SERVING = """
INSERT INTO recsys.published_versions (version, tables, row_counts, serving, published_at)
VALUES (%(version)s, %(tables)s::jsonb, %(row_counts)s::jsonb, true, now())
ON CONFLICT (version) DO UPDATE
SET tables = EXCLUDED.tables, row_counts = EXCLUDED.row_counts, serving = true, published_at = now(),
    pruned_at = NULL
"""
SELECT_PRUNABLE = """
SELECT version, tables FROM recsys.published_versions
WHERE NOT serving AND pruned_at IS NULL
ORDER BY published_at DESC OFFSET %s
"""
# A session lock per version, held by a publish from its load to its swap (two-int advisory key space).
STAGING_OWNER_LOCK = "SELECT pg_advisory_lock(%s, hashtext(%s))"
STAGING_OWNER_TRY_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
STAGING_OWNER_UNLOCK = "SELECT pg_advisory_unlock(%s, hashtext(%s))"
SELECT_STAGING_TABLES = r"SELECT tablename FROM pg_tables WHERE schemaname = 'recsys' AND tablename LIKE '%\_\_staging'"
SELECT_VIEW_LOCK_HOLDERS = """
SELECT DISTINCT a.pid, a.usename, a.application_name, extract(epoch FROM now() - a.xact_start), a.state
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'recsys'
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.pid <> pg_backend_pid() AND c.relname = ANY(%(views)s)
"""
# Still prunable, checked again under the publish lock: a rollback may have made it serve meanwhile.
LOCK_PRUNABLE = """
SELECT version FROM recsys.published_versions WHERE version = %s AND NOT serving AND pruned_at IS NULL FOR UPDATE
"""
MARK_PRUNED = "UPDATE recsys.published_versions SET pruned_at = now() WHERE version = %s"
SELECT_PUBLISHED = "SELECT version, tables, pruned_at, serving FROM recsys.published_versions WHERE version = %s"
SELECT_SERVING = "SELECT version FROM recsys.published_versions WHERE serving"
# What serves, for the views' served_by column: 'model' or 'baseline'.
SELECT_KIND = "SELECT kind FROM recsys.model_registry WHERE version = %s"
# A scheduled run of an earlier interval (or a backfill) must not replace a model trained on newer data.
SELECT_NEWER_SERVING = """
SELECT s.version, s.watermark, n.watermark
FROM recsys.published_versions p
JOIN recsys.model_registry s ON s.version = p.version
JOIN recsys.model_registry n ON n.version = %(version)s
WHERE p.serving AND s.version <> %(version)s AND s.watermark > n.watermark
"""


class PublishError(RuntimeError):
    """The new tables failed their checks or the version cannot be served; nothing was switched."""


@dataclass(frozen=True)
class PublishResult:
    version: str
    row_counts: dict[str, int]
    swap_seconds: float
    lock_waits: int  # swap attempts that gave way to a reader holding a view
    pruned: list[str]


def table_name(view: str, version: str, staging: bool = False) -> str:
    if not VERSION_PATTERN.match(version):
        raise PublishError(f"version {version!r} is not of the form v<14 digits> or v<14 digits>-baseline")
    return f"{view}__{version}" + ("__staging" if staging else "")


def publish(url: str, version: str, frames: dict[str, pd.DataFrame], *, generated_at: datetime,
            keep_versions: int, claim: registry.Claim | None = None) -> PublishResult:
    """Load `frames` (view name -> rows without model_version/generated_at) and switch to them.

    With a run's `claim`, both the load and the swap land only while the run still holds it: a run
    declared dead while paused publishes nothing when it wakes.

    From load to swap this publish holds a session lock on its version (STAGING_OWNER_LOCK): its staging
    tables are in use, not leftovers, for any other publish that looks. A killed publish's lock goes
    with its connection.
    """
    with db.connect(url, autocommit=True) as owner:
        owner.execute(STAGING_OWNER_LOCK, (AdvisoryLock.PUBLISH_STAGING, version))
        row_counts = load_staging(url, version, frames, generated_at, claim)
        swap = swap_in(url, version, row_counts, claim)
    pruned = prune(url, keep_versions)
    log.info("published %s (%s) in a %.3f s swap (%d lock waits); pruned %s", version,
             ", ".join(f"{v}: {n} rows" for v, n in row_counts.items()), swap.seconds, swap.lock_waits,
             pruned or "nothing")
    return PublishResult(version=version, row_counts=row_counts, swap_seconds=swap.seconds,
                         lock_waits=swap.lock_waits, pruned=pruned)


def load_staging(url: str, version: str, frames: dict[str, pd.DataFrame], generated_at: datetime,
                 claim: registry.Claim | None = None) -> dict[str, int]:
    """Step 1: fill and check the version's staging tables (committed; nothing readers use changes)."""
    missing = [t.view for t in SERVING_TABLES if t.view not in frames]
    if missing:
        raise PublishError(f"nothing to publish for {', '.join(missing)}")
    with registry.fenced_transaction(url, claim) as conn:
        conn.execute(TRANSACTION_LOCK, (AdvisoryLock.PUBLISH,))
        _refuse_older(conn, version)
        _drop_leftover_staging(conn)
        return {table.view: _load(conn, table, version, frames[table.view], generated_at) for table in SERVING_TABLES}


@dataclass(frozen=True)
class Swap:
    seconds: float  # from the first attempt to the commit
    lock_waits: int  # attempts that gave up on a lock a reader held


def swap_in(url: str, version: str, row_counts: dict[str, int], claim: registry.Claim | None = None) -> Swap:
    """Step 2: repoint the views to the staged tables and mark the version serving, in one transaction."""
    def switch(conn: psycopg.Connection) -> None:
        registry.check_claim(conn, claim)
        _refuse_older(conn, version)  # again: the champion may have changed while we loaded
        served_by = _served_by(conn, version)
        for table in SERVING_TABLES:
            staging = table_name(table.view, version, staging=True)
            final = table_name(table.view, version)
            _point_view(conn, table, staging, served_by)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS recsys.{}").format(sql.Identifier(final)))
            conn.execute(sql.SQL("ALTER TABLE recsys.{} RENAME TO {}").format(sql.Identifier(staging),
                                                                              sql.Identifier(final)))
            conn.execute(sql.SQL("ALTER INDEX recsys.{} RENAME TO {}").format(sql.Identifier(_index_name(staging)),
                                                                              sql.Identifier(_index_name(final))))
        tables = {t.view: table_name(t.view, version) for t in SERVING_TABLES}
        conn.execute(UNMARK_SERVING, {"version": version})
        conn.execute(MARK_SERVING, {"version": version, "tables": json.dumps(tables),
                                    "row_counts": json.dumps(row_counts)})
        registry.promote(conn, version)

    started = time.monotonic()
    lock_waits = _with_view_locks(url, f"publish {version}", switch)
    return Swap(seconds=time.monotonic() - started, lock_waits=lock_waits)


def _with_view_locks(url: str, what: str, work: Callable[[psycopg.Connection], None]) -> int:
    """Run `work` (which repoints the views) in one transaction holding the publish lock; returns the lock waits.

    Repointing a view needs its exclusive lock, and while that request waits every new reader of the
    view queues behind it. So the request gives up after VIEW_LOCK_TIMEOUT_MS (readers wait at most
    that long) and is retried with backoff until a reader holding the view in a long transaction is
    done, up to VIEW_LOCK_PATIENCE_SECONDS; then a PublishError names the sessions in the way.
    """
    deadline = time.monotonic() + VIEW_LOCK_PATIENCE_SECONDS
    delay = RETRY_FIRST_DELAY_SECONDS
    waits = 0
    while True:
        try:
            with db.transaction(url) as conn:
                conn.execute(TRANSACTION_LOCK, (AdvisoryLock.PUBLISH,))
                _give_way_to_readers(conn)
                work(conn)
            return waits
        except psycopg.errors.LockNotAvailable:
            waits += 1
            holders = view_lock_holders(url)
            if time.monotonic() + delay > deadline:
                raise PublishError(f"{what}: the serving views stayed locked for {VIEW_LOCK_PATIENCE_SECONDS:.0f} s "
                                   f"by {'; '.join(holders) or 'another session'}; serving is unchanged") from None
            if waits == 1 or waits % 20 == 0:
                log.warning("%s waits for a reader holding the serving views (%s); retry %d in %.2f s", what,
                            "; ".join(holders) or "another session", waits, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_SECONDS)


def view_lock_holders(url: str) -> list[str]:
    """Sessions holding a lock on a serving view: pid, user, application, how long their transaction has run."""
    with db.connect(url) as conn:
        rows = conn.execute(SELECT_VIEW_LOCK_HOLDERS, {"views": [t.view for t in SERVING_TABLES]}).fetchall()
    return [f"pid {pid} ({user}{', ' + app if app else ''}, "
            f"{f'transaction open {age:.0f} s' if age is not None else 'no transaction'}, {state})"
            for pid, user, app, age, state in rows]


def _give_way_to_readers(conn: psycopg.Connection) -> None:
    """In this transaction, wait at most VIEW_LOCK_TIMEOUT_MS for any lock (LockNotAvailable after that)."""
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{VIEW_LOCK_TIMEOUT_MS}ms")))


def _index_name(table: str) -> str:
    return f"{table}_key"


def _drop_leftover_staging(conn: psycopg.Connection) -> None:
    """Staging tables of a publish that died between load and swap: those whose version no live
    publish holds (between its load and its swap, another publish may be loading)."""
    for (name,) in conn.execute(SELECT_STAGING_TABLES).fetchall():
        version = name.split("__")[1]
        if not conn.execute(STAGING_OWNER_TRY_LOCK, (AdvisoryLock.PUBLISH_STAGING, version)).fetchone()[0]:
            continue  # a live publish is between its load and its swap
        conn.execute(STAGING_OWNER_UNLOCK, (AdvisoryLock.PUBLISH_STAGING, version))
        conn.execute(sql.SQL("DROP TABLE recsys.{}").format(sql.Identifier(name)))
        log.warning("dropped %s, left by a publish that was interrupted before its swap", name)


def _load(conn: psycopg.Connection, table: ServingTable, version: str, frame: pd.DataFrame,
          generated_at: datetime) -> int:
    """Fill the version's staging table; its NOT NULL columns and unique key refuse bad rows."""
    staging_name = table_name(table.view, version, staging=True)
    staging = sql.Identifier(staging_name)
    columns = [sql.SQL("{} {} NOT NULL").format(sql.Identifier(n), sql.SQL(t)) for n, t in table.columns]
    columns += [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in table.added]
    conn.execute(sql.SQL("DROP TABLE IF EXISTS recsys.{}").format(staging))
    conn.execute(sql.SQL("CREATE TABLE recsys.{} ({})").format(staging, sql.SQL(", ").join(columns)))
    constants = {"model_version": version, "generated_at": generated_at}
    loaded = [*table.columns, *((n, t) for n, t in table.added if n in frame.columns)]
    wire = [(pg_type, constants[name] if name in constants else frame[name].to_numpy())
            for name, pg_type in loaded]
    copy_sql = sql.SQL("COPY recsys.{} ({}) FROM STDIN (FORMAT BINARY)").format(
        staging, sql.SQL(", ").join(sql.Identifier(n) for n, _ in loaded))
    try:
        with conn.cursor().copy(copy_sql) as copy:
            for chunk in pgbulk.binary_copy_stream(wire, len(frame)):
                copy.write(chunk)
        conn.execute(sql.SQL("CREATE UNIQUE INDEX {} ON recsys.{} ({})").format(
            sql.Identifier(_index_name(staging_name)), staging, sql.SQL(", ").join(map(sql.Identifier, table.key))))
    except (pgbulk.BulkCopyError, psycopg.errors.DataError, psycopg.errors.IntegrityError) as error:
        detail = getattr(getattr(error, "diag", None), "message_detail", None)
        reason = str(error).strip().splitlines()[0] + (f": {detail}" if detail else "")
        raise PublishError(f"{table.view}: the new rows cannot be loaded ({reason}); serving is unchanged") from error
    conn.execute(sql.SQL("ANALYZE recsys.{}").format(staging))
    _check(conn, table, staging, len(frame))
    return len(frame)


def _check(conn: psycopg.Connection, table: ServingTable, staging: sql.Identifier, expected_rows: int) -> None:
    """Every row arrived and ranks run 1..n in each group; else nothing is switched.

    The unique index already rules out a repeated rank, so min = 1 and max = count per group
    means the ranks are contiguous; one aggregate pass, no sort.
    """
    count = conn.execute(sql.SQL("SELECT count(*) FROM recsys.{}").format(staging)).fetchone()[0]
    if count == 0:
        raise PublishError(f"{table.view}: the new table is empty; the serving version is unchanged")
    if count != expected_rows:
        raise PublishError(f"{table.view}: {count} rows arrived of {expected_rows}; the serving version is unchanged")
    group = [sql.Identifier(c) for c in table.key if c != "rank"]
    group_by = sql.SQL("GROUP BY {}").format(sql.SQL(", ").join(group)) if group else sql.SQL("")
    gaps = conn.execute(sql.SQL(
        "SELECT count(*) FROM (SELECT 1 FROM recsys.{} {} HAVING min(rank) <> 1 OR max(rank) <> count(*)) g"
    ).format(staging, group_by)).fetchone()[0]
    if gaps:
        raise PublishError(f"{table.view}: ranks are not contiguous from 1 in {gaps} groups; serving is unchanged")


def _refuse_older(conn: psycopg.Connection, version: str) -> None:
    newer = conn.execute(SELECT_NEWER_SERVING, {"version": version}).fetchone()
    if newer is not None:
        raise PublishError(f"refusing to publish {version} (data as of {newer[2]:%Y-%m-%d %H:%M}) over {newer[0]}, "
                           f"which serves a model of newer data (as of {newer[1]:%Y-%m-%d %H:%M}); "
                           "use rollback to serve an older version on purpose")


def _served_by(conn: psycopg.Connection, version: str) -> str:
    row = conn.execute(SELECT_KIND, (version,)).fetchone()
    if row is None:
        raise PublishError(f"{version} is not in the model registry; register it before publishing")
    return row[0]


def _point_view(conn: psycopg.Connection, table: ServingTable, source: str, served_by: str) -> None:
    """The view reads `source` and labels every row with what produced it ('model' or 'baseline')."""
    columns = sql.SQL(", ").join(sql.Identifier(n) for n, _ in table.columns)
    added = sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(n)) for n, _ in table.added)
    conn.execute(sql.SQL("CREATE OR REPLACE VIEW recsys.{} AS SELECT {}, {}::text AS served_by{} FROM recsys.{}").format(
        sql.Identifier(table.view), columns, sql.Literal(served_by), added, sql.Identifier(source)))


def prune(url: str, keep_versions: int) -> list[str]:
    """Drop the tables of published versions older than the newest `keep_versions` (serving is kept).

    One transaction per version, each waiting at most VIEW_LOCK_TIMEOUT_MS for its tables: a version a
    reader still holds is left for the next publish to prune, and nobody queues behind the DROP.
    """
    with db.connect(url) as conn:
        prunable = conn.execute(SELECT_PRUNABLE, (max(keep_versions - 1, 0),)).fetchall()
    pruned = []
    for version, tables in prunable:
        try:
            with db.transaction(url) as conn:
                conn.execute(TRANSACTION_LOCK, (AdvisoryLock.PUBLISH,))
                if conn.execute(LOCK_PRUNABLE, (version,)).fetchone() is None:
                    continue  # rolled back to (or pruned) since it was listed
                _give_way_to_readers(conn)
                for name in tables.values():
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS recsys.{}").format(sql.Identifier(name)))
                conn.execute(MARK_PRUNED, (version,))
        except psycopg.errors.LockNotAvailable:
            log.info("kept %s's tables for now: a reader still holds them; the next publish prunes them", version)
            continue
        pruned.append(version)
    return pruned


def rollback(url: str, version: str) -> str:
    """Serve an earlier published version again; returns the version that served before.

    A model's ONNX files are checked against the sha256 the registry recorded before anything is
    repointed: the next retrain warm-starts from and gates against what serves.
    """
    with db.connect(url) as conn:
        row = conn.execute(SELECT_PUBLISHED, (version,)).fetchone()
        if row is None:
            why = "it was never published" if registry.exists(conn, version) else "no such version in the registry"
            raise PublishError(f"cannot roll back to {version!r}: {why}")
    try:
        registry.verify_artifacts(url, version)
    except registry.ArtifactError as exc:
        raise PublishError(f"cannot roll back to {version}: {exc}") from None
    previous: list[str] = []

    def repoint(conn: psycopg.Connection) -> None:
        _, tables, pruned_at, serving = conn.execute(SELECT_PUBLISHED, (version,)).fetchone()
        if serving:
            raise PublishError(f"{version} is already serving; nothing to roll back")
        if pruned_at is not None:
            raise PublishError(f"cannot roll back to {version}: its tables were pruned on {pruned_at:%Y-%m-%d %H:%M}")
        previous[:] = [row[0] for row in conn.execute(SELECT_SERVING)]
        served_by = _served_by(conn, version)
        for table in SERVING_TABLES:
            _point_view(conn, table, tables[table.view], served_by)
        conn.execute(UNMARK_SERVING, {"version": version})
        conn.execute("UPDATE recsys.published_versions SET serving = true WHERE version = %s", (version,))
        registry.promote(conn, version)

    _with_view_locks(url, f"rollback to {version}", repoint)
    log.info("rolled back: %s now serves (was %s)", version, previous[0] if previous else "nothing")
    return previous[0] if previous else ""
