"""`python -m recmodel …`: run, inspect and operate recsys-retrain (docs/OPERATIONS.md). Errors print one clear line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from recmodel import db
from recmodel.config import settings
from recmodel.errors import PermanentError
from recmodel.stages import RETRAIN_DAG_ID
from recmodel.logsetup import quiet_libraries

# Piped output (CI logs, `| less`) would otherwise be cut to 80 columns and wrap version ids.
console = Console(width=None if sys.stdout.isatty() else 140)
log_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)  # logs on stderr, so `$(python -m recmodel db url)` captures just the URL
log = logging.getLogger("recmodel")

SAMPLE_RECOMMENDATIONS = """
WITH sample AS (
    SELECT DISTINCT user_id FROM recsys.user_recommendations ORDER BY user_id LIMIT %(users)s
)
SELECT r.user_id, r.rank, r.item_id, i.title, r.score, r.model_version
FROM recsys.user_recommendations r JOIN sample USING (user_id) LEFT JOIN items i USING (item_id)
WHERE r.rank <= %(k)s ORDER BY r.user_id, r.rank
"""
SERVING_COUNTS = """
SELECT (SELECT count(*) FROM recsys.user_recommendations),
       (SELECT count(DISTINCT user_id) FROM recsys.user_recommendations),
       (SELECT count(*) FROM recsys.similar_items),
       (SELECT count(*) FROM recsys.popular_items),
       (SELECT max(generated_at) FROM recsys.user_recommendations)
"""
COUNT_INTERACTIONS = "SELECT count(*) FROM interactions"
RUN_ACTIVITY = "SELECT active_step, stage FROM recsys.pipeline_runs WHERE run_key = %s"
RUN_EXISTS = "SELECT 1 FROM recsys.pipeline_runs WHERE run_key = %s"


DEMO_APP_ROLE = "recsys_app"
APP_QUERY = ("SELECT r.rank, r.item_id, c.title, r.served_by FROM recsys.user_recommendations r "
             "JOIN recsys.item_catalog c USING (item_id) WHERE r.user_id = 1 ORDER BY r.rank")
QUIET_SECONDS = 10.0  # the longest the terminal stays silent during a run


class UsageError(ValueError):
    """Bad command-line input."""


class QuietWatch(logging.Filter):
    """Notes when a log line last reached the terminal; `heartbeat` speaks up when that was too long ago."""

    def __init__(self) -> None:
        super().__init__()
        self.last_output = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        self.last_output = time.monotonic()
        return True


quiet_watch = QuietWatch()


@contextmanager
def heartbeat(describe: Callable[[], str], every: float = QUIET_SECONDS) -> Iterator[None]:
    """While the block runs, print what it is doing whenever nothing was printed for `every` seconds.

    The stages log their own progress; this covers what they cannot: Airflow's setup, model
    loading, a slow query. `describe` is called from a background thread.
    """
    started, done = time.monotonic(), threading.Event()

    def speak() -> None:
        while not done.wait(1.0):
            if time.monotonic() - quiet_watch.last_output >= every:
                try:
                    what = describe()
                except Exception as exc:  # noqa: BLE001 - a heartbeat must not kill the run it reports on
                    what = f"working ({type(exc).__name__} while asking what)"
                log.info("… %s (%.0f s since the start)", what, time.monotonic() - started)
                quiet_watch.last_output = time.monotonic()

    quiet_watch.last_output = time.monotonic()
    thread = threading.Thread(target=speak, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _url() -> str:
    return db.resolve_url(settings())


def cmd_db(args: argparse.Namespace) -> int:
    env = settings()
    if args.action == "down":
        if env.database_url:
            raise UsageError("RECSYS_DATABASE_URL is set: that server is yours to stop, not the embedded one")
        stopped = db.stop_embedded(env.home)
        console.print(f"stopped the embedded Postgres under {env.home / 'pg'}" if stopped
                      else f"no embedded Postgres is running under {env.home / 'pg'}")
        return 0
    if env.database_url:
        url = db.libpq_url(env.database_url)
        db.connect(url).close()
    else:
        url = _url()
    if args.action == "up":
        console.print(f"Postgres is up: {db.redact(url)}")
    else:
        print(url)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    applied = db.migrate(_url())
    console.print(f"applied {len(applied)} migration(s): {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from recmodel.synth import seed_database

    url = _url()
    db.migrate(url)
    summary = seed_database(url, users=args.users, items=args.items, events=args.events, seed=args.seed)
    verb = "appended" if summary.appended else "loaded"
    console.print(f"{verb} {summary.events_added:,} interactions and {summary.items_added:,} items "
                  f"({summary.first_event_at:%Y-%m-%d} to {summary.last_event_at:%Y-%m-%d %H:%M})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from recmodel.importers import import_movielens

    url = _url()
    db.migrate(url)
    summary = import_movielens(url, Path(args.folder))
    console.print(f"imported MovieLens ({summary.format}): {summary.describe()}")
    return 0


def _parse_conf(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--conf is not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise UsageError("--conf must be a JSON object, e.g. '{\"epochs\": 2}'")
    return conf


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. 13,14,15") from None
    if len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
        raise UsageError(f"--seeds {text!r} must list distinct non-negative seeds")
    return seeds


def _parse_as_of(text: str | None) -> datetime:
    if not text:
        from recmodel.registry import as_of_now

        return as_of_now()
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--as-of {text!r} is not an ISO timestamp like 2026-11-23T12:00:00+00:00") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def run_retrain(conf: dict[str, Any], as_of: datetime) -> int:
    """One run of recsys_retrain through Airflow, then the summary. Exit 0 only on success."""
    from recmodel.config import PipelineConfig
    from recmodel.pipeline import check_as_of
    from recmodel.registry import command_holds_as_of, refuse_if_another_run_is_live
    from recmodel.runner import prepare_airflow, run_dag

    overrides = {k: v for k, v in conf.items() if k != "as_of"}
    config = PipelineConfig.from_overrides(overrides)  # fail here, not inside a task, on a bad setting
    as_of = _parse_as_of(conf["as_of"]) if "as_of" in conf else as_of
    check_as_of(as_of, config)
    url = _url()
    db.migrate(url)
    refuse_if_another_run_is_live(url)
    with db.connect(url) as conn:
        if conn.execute(COUNT_INTERACTIONS).fetchone()[0] == 0:
            raise db.DatabaseError("the interactions table is empty: run `python -m recmodel seed` or "
                                   "`python -m recmodel import movielens DIR` first")
    started = time.perf_counter()
    console.print(f"[bold]recsys_retrain[/] as of {as_of:%Y-%m-%d %H:%M:%S} UTC through Airflow …")
    with command_holds_as_of(url, as_of), heartbeat(lambda: _run_activity(url, as_of)):
        prepare_airflow(settings(), url)
        outcome = run_dag(RETRAIN_DAG_ID, conf={**overrides, "as_of": as_of.isoformat()}, logical_date=as_of)
    elapsed = time.perf_counter() - started
    _print_run_summary(url, as_of, outcome.task_states, elapsed)
    if not outcome.succeeded:
        failed = [t for t, s in outcome.task_states.items() if s == "failed"]
        console.print(f"[red]DAG run {outcome.run_id} {outcome.state}[/] (failed tasks: {', '.join(failed) or '?'})")
        return 1
    return 0


def _run_activity(url: str, as_of: datetime) -> str:
    """What the run keyed by `as_of` is doing, from its liveness record (migration 007)."""
    from recmodel.registry import run_key_for

    with db.connect(url) as conn:
        row = conn.execute(RUN_ACTIVITY, (run_key_for(as_of),)).fetchone()
    if row is None:
        return "preparing Airflow (metadata database, DAG parsing)"
    active_step, stage = row
    return f"{active_step} is running" if active_step else f"between tasks (last: {stage or 'none'})"


def cmd_retrain(args: argparse.Namespace) -> int:
    return run_retrain(_parse_conf(args.conf), _parse_as_of(args.as_of))


def cmd_demo(args: argparse.Namespace) -> int:
    from recmodel.synth import seed_database

    if args.executor == "celery":
        _check_celery_stack(args.workers)
    started = time.perf_counter()
    url = _url()
    console.print(f"database: {db.redact(url)}")
    db.migrate(url)
    with db.connect(url) as conn:
        empty = conn.execute(COUNT_INTERACTIONS).fetchone()[0] == 0
    if empty:
        summary = seed_database(url, users=args.users, items=args.items, events=args.events, seed=args.seed)
        console.print(f"loaded synthetic data: {summary.events_added:,} interactions, {summary.items_added:,} items, "
                      f"{summary.users:,} users")
    if args.executor == "celery":
        return _demo_on_celery(url, args, started)
    code = run_retrain({}, _parse_as_of(None))
    _finish_demo(url, started)
    if args.ui and code == 0:
        return serve_ui(url, args.port)
    return code


def _finish_demo(url: str, started: float) -> None:
    """Sample lists, an app's login to read them, and what to try next."""
    _print_sample(url)
    app_url = db.reader_login(url, DEMO_APP_ROLE, secrets.token_urlsafe(12))
    console.print(f"apps read as a login in [bold]recsys_reader[/] (the serving views and recsys.item_catalog, "
                  f"nothing else); the demo made one, {DEMO_APP_ROLE}, with a new password:", highlight=False)
    console.print(f"  psql '{app_url}' -c \"{APP_QUERY}\"", highlight=False, markup=False, soft_wrap=True)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s. Next: `python -m recmodel seed "
                  f"--events 5000` (new activity) then `python -m recmodel retrain`; `python -m recmodel status`; "
                  "`python -m recmodel ui` (Airflow's UI); `python -m recmodel db down` stops the embedded Postgres.")


def _demo_on_celery(url: str, args: argparse.Namespace, started: float) -> int:
    """The demo's run on the local Celery stack; with --ui the stack then stays up until Ctrl-C."""
    try:
        with local_celery_stack(url, workers=args.workers, port=args.port) as stack:
            code = run_on_celery(url, stack)
            _finish_demo(url, started)
            if args.ui and code == 0:
                return _serve_until_interrupted(stack.airflow, settings().airflow_home)
            return code
    except KeyboardInterrupt:
        console.print("stopped")
        return 130


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_ui(args: argparse.Namespace) -> int:
    from recmodel.runner import prepare_airflow

    url = _url()
    db.migrate(url)
    with heartbeat(lambda: "preparing Airflow (metadata database, DAG parsing)"):
        prepare_airflow(settings(), url)
    return serve_ui(url, args.port)


def serve_ui(url: str, port: int) -> int:
    """Run Airflow's api-server, scheduler and dag-processor until Ctrl-C, with the DAGs unpaused."""
    from recmodel.runner import DEMO_DAGS, airflow_environment, register_dags, set_paused, start_stack

    env = settings()
    variables = airflow_environment(env, url)
    register_dags()
    set_paused(DEMO_DAGS, False)
    console.print(f"starting Airflow (api-server on port {port}, scheduler, dag-processor) …")
    stack = start_stack(variables, port, env.airflow_home / "logs" / "ui")
    try:
        return _serve_until_interrupted(stack, env.airflow_home)
    finally:
        stack.stop()


def _serve_until_interrupted(stack: Any, airflow_home: Path) -> int:
    """Print where the UI is, then wait until Ctrl-C (0) or until a component dies (1); the caller stops `stack`."""
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and container stops shut Airflow down like Ctrl-C
    try:
        console.print(f"[bold]Airflow UI:[/] {stack.base_url}/  log in as [bold]{stack.username}[/] with password "
                      f"[bold]{stack.password or '(see ' + str(airflow_home) + '/simple_auth_manager_passwords.json.generated)'}[/]")
        console.print(f"[bold]Recommender page:[/] {stack.base_url}/plugin/recommender (nav: Recommender). "
                      f"Component logs: {stack.log_dir}. Ctrl-C stops.")
        while not (dead := stack.exited()):
            time.sleep(1)
        console.print(f"[red]airflow {dead[0]} exited;[/] see {stack.log_dir / (dead[0] + '.log')}")
        return 1
    except KeyboardInterrupt:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(signum, signal.SIG_IGN)
        console.print("stopping Airflow …")
        return 0


@contextmanager
def local_celery_stack(url: str, *, workers: int, port: int) -> Iterator[Any]:
    """Redis, Airflow on CeleryExecutor and `workers` Celery workers, as docker-compose.yaml defines them, for
    the block; stopped on the way out, Ctrl-C and `kill` included."""
    import os

    from recmodel.celerystack import start_celery_stack
    from recmodel.runner import prepare_airflow

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stack like Ctrl-C, not leaving it running
    env = settings()
    with heartbeat(lambda: "preparing Airflow (metadata database, DAG parsing)"):
        variables = prepare_airflow(env, url)
    # Only the runs you trigger (the demo's, the UI's "Retrain now", the REST API): unpausing the DAG would
    # otherwise also start its latest scheduled run.
    variables["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = os.environ.get("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")
    console.print(f"starting Redis, Airflow on CeleryExecutor and {workers} Celery worker(s) as docker-compose.yaml "
                  "defines them …")
    stack = start_celery_stack(variables, env.airflow_home / "logs" / "celery", workers=workers, port=port)
    try:
        yield stack
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(signum, signal.SIG_IGN)
        console.print("stopping Redis and Airflow …")
        stack.stop()


def run_on_celery(url: str, stack: Any) -> int:
    """One recsys_retrain run on a local Celery stack, then where each task ran. Exit 0 only on success."""
    from recmodel.celerystack import AirflowApi

    api = AirflowApi(stack.base_url, stack.airflow.username, stack.airflow.password)
    api.wait_for_dag(RETRAIN_DAG_ID)
    api.set_paused(RETRAIN_DAG_ID, False)
    as_of = _parse_as_of(None)
    started = time.perf_counter()
    # Two scoring shards per worker, so the scoring fan-out spreads over all of them.
    run_id = api.trigger(RETRAIN_DAG_ID, {"as_of": as_of.isoformat(), "score_shards": 2 * len(stack.workers)})
    console.print(f"[bold]recsys_retrain[/] as of {as_of:%Y-%m-%d %H:%M:%S} UTC on {', '.join(stack.workers)} …")
    with heartbeat(lambda: _run_activity(url, as_of)):
        state = api.wait_for_run(RETRAIN_DAG_ID, run_id, timeout=float("inf"), check=stack.check_alive)
    instances = api.task_instances(RETRAIN_DAG_ID, run_id)
    _print_placement(instances)
    _print_run_summary(url, as_of, {_ti_name(ti): ti["state"] for ti in instances}, time.perf_counter() - started)
    if state != "success":
        console.print(f"[red]DAG run {run_id} {state}[/]; component and task logs in {stack.airflow.log_dir} and "
                      f"{settings().airflow_home / 'logs'}")
        return 1
    return 0


def _check_celery_stack(workers: int) -> None:
    """Refuse before anything starts: too few workers for the compose file's queues, or no Redis to start."""
    import shutil

    from recmodel.celerystack import plan_workers, read_compose

    plan_workers(read_compose(), workers)
    if shutil.which("redis-server") is None:
        raise UsageError("--executor celery needs redis-server, the Celery broker (Debian: `apt-get install "
                         "redis-server`; macOS: `brew install redis`)")


def _ti_name(ti: dict[str, Any]) -> str:
    return f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]


def _print_placement(instances: list[dict[str, Any]]) -> None:
    """Which worker and queue ran each task, and for how long (Airflow's task-instance records)."""
    table = Table(title="where each task ran")
    for column in ("task", "worker", "queue", "seconds", "state"):
        table.add_column(column)
    for ti in sorted(instances, key=lambda t: (t["start_date"] or "", t["map_index"])):
        table.add_row(_ti_name(ti), ti["hostname"] or "", ti["queue"] or "",
                      f"{ti['duration']:.1f}" if ti["duration"] is not None else "", ti["state"] or "")
    console.print(table)


def _print_run_summary(url: str, as_of: datetime, task_states: dict[str, str], elapsed: float) -> None:
    from recmodel.registry import overview, run_key_for

    run_key = run_key_for(as_of)
    state = overview(url, limit=50)
    run = next((r for r in state["runs"] if r["run_key"] == run_key), None)
    console.print("tasks: " + "  ".join(f"{t}={s}" for t, s in task_states.items()) + f"  ({elapsed:.0f} s)")
    if run is None:
        return
    console.print(f"run {run_key}: [bold]{run['status']}[/] — {run['message'] or ''}")
    console.print(f"rows extracted: {run['rows_extracted'] or 0:,}  quarantined: {run['rows_quarantined'] or 0:,}")
    _print_quarantine_reasons(run)
    version = run["model_version"]
    candidate = next((m for m in state["models"] if m["run_key"] == run_key and m["kind"] == "model"), None)
    if candidate and candidate["decision"]:
        _print_gate(candidate)
    elif holdout := (run["details"] or {}).get("holdout"):
        console.print(f"gate holdout: {_holdout_text(holdout)}")
    baseline = next((m for m in state["models"] if m["version"] == version and m["kind"] == "baseline"), None)
    if run["status"] == "success" and baseline is not None:
        console.print(f"[yellow]serving the popularity baseline {version}[/]: no model has been accepted yet "
                      "(served_by = 'baseline' in the views); the first accepted model replaces it")
        for reason in baseline["reasons"]:
            console.print(f"  baseline: {reason}")


def _print_quarantine_reasons(run: dict[str, Any]) -> None:
    """Each quarantine reason of the run: rows, rule, an example and the setting that governs it."""
    reasons = ((run["details"] or {}).get("validate") or {}).get("reasons", [])
    if not reasons:
        return
    from recmodel.validate import ReasonSummary  # Great Expectations: imported only when there is something to say

    for reason in reasons:
        console.print("  quarantined " + ReasonSummary(**reason).line(), highlight=False, markup=False)


def _holdout_text(holdout: dict[str, Any]) -> str:
    from recmodel.gate import HoldoutPlan

    fields = {k: v for k, v in holdout.items() if k != "champion_version"}
    try:
        return HoldoutPlan(**fields).describe()
    except TypeError:  # a version registered before holdouts were planned
        return f"since {holdout.get('cutoff')}, {holdout.get('users')} users"


def _print_gate(model: dict[str, Any]) -> None:
    metrics = model["metrics"]
    holdout = metrics.get("holdout", {})
    champion_version = holdout.get("champion_version")
    caption = f"champion = {champion_version}" if champion_version else "no champion yet"
    if holdout:
        caption += f"; holdout: {_holdout_text(holdout)}"
    names = [n for n in ("candidate", "champion", "popularity") if metrics.get(n)]
    if names:
        table = Table(title=f"gate on the holdout ({model['decision']})", caption=caption)
        table.add_column("model")
        metric_names = ["ndcg@10", "recall@10", "hr@10", "mrr@10", "coverage@10"]
        for m in metric_names:
            table.add_column(m, justify="right")
        for name in names:
            row = metrics[name]
            table.add_row(name, *(f"{row[m]:.4f}" for m in metric_names))
        console.print(table)
        _print_slices({name: metrics[name] for name in names})
    else:
        console.print(caption)
    for reason in model["reasons"]:
        console.print(f"  gate: {reason}")


SLICE_TITLES = {"cold_item": "new items", "rare_item": "rare items (1-4)", "warm_item": "warm items",
                "cold_user": "cold users (1-2)"}


def _print_slices(rows: dict[str, dict[str, Any]], first_column: str = "model",
                  title: str = "by slice: NDCG@10 / HR@10 (users)") -> None:
    """NDCG@10 / HR@10 of each row's model on the gate's slices, with the users each is scored on."""
    rows = {name: row for name, row in rows.items() if "cold_item_users" in row}  # judged before slices: none
    if not rows:
        return
    table = Table(title=title, caption="new: the held-out item had no training interaction; rare: 1-4; "
                  "cold users: 1-2 training interactions")
    table.add_column(first_column)
    for heading in SLICE_TITLES.values():
        table.add_column(heading, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[f'{key}_ndcg@10']:.4f} / {row[f'{key}_hr@10']:.3f} ({int(row[f'{key}_users']):,})"
                              if row.get(f"{key}_users") else "-" for key in SLICE_TITLES))
    console.print(table)


def _print_sample(url: str, users: int = 3, k: int = 5) -> None:
    with db.connect(url) as conn:
        rows = conn.execute(SAMPLE_RECOMMENDATIONS, {"users": users, "k": k}).fetchall()
        counts = conn.execute(SERVING_COUNTS).fetchone()
    console.print(f"serving: user_recommendations {counts[0]:,} rows for {counts[1]:,} users, similar_items "
                  f"{counts[2]:,}, popular_items {counts[3]:,}; generated {counts[4]}")
    table = Table(title="sample recommendations (recsys.user_recommendations)")
    for column in ("user", "rank", "item", "title", "score", "version"):
        table.add_column(column)
    for user_id, rank, item_id, title, score, version in rows:
        table.add_row(str(user_id), str(rank), str(item_id), title or "?", f"{score:.3f}", version)
    console.print(table)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Serve an earlier version again, recorded in `recsys.pipeline_runs` (kind 'rollback') as the
    `recsys_rollback` DAG records it: running, then success or failed with the reason."""
    from recmodel import registry
    from recmodel.publish import rollback

    url = _url()
    db.require_tables(url)
    run_key = f"rollback:cli__{datetime.now(UTC).isoformat()}"

    def record(status: str, message: str, model_version: str | None = None) -> None:
        registry.record_event(url, run_key, kind="rollback", status=status, stage="rollback", message=message,
                              model_version=model_version)

    record("running", f"rolling back to {args.version}")
    try:
        previous = rollback(url, args.version)
    except BaseException as exc:  # Ctrl-C too: no row may stay 'running'
        record("failed", f"rollback failed: {type(exc).__name__}: {exc}")
        raise
    message = f"{args.version} now serves (was {previous or 'nothing'})"
    record("success", message, args.version)
    console.print(message)
    return 0


def _known_run_key(url: str, text: str) -> str:
    """`text` when it is the key of a recorded run (20261101T120000Z, as `status` lists runs), else UsageError:
    it names a folder, so it is checked before any path is built from it."""
    from recmodel.registry import RUN_KEY_FORMAT

    try:
        well_formed = datetime.strptime(text, RUN_KEY_FORMAT).strftime(RUN_KEY_FORMAT) == text
    except ValueError:
        well_formed = False
    if not well_formed:
        raise UsageError(f"{text!r} is not a run key: runs are keyed by their as-of time in UTC, like "
                         f"{datetime(2026, 11, 1, 12, tzinfo=UTC).strftime(RUN_KEY_FORMAT)}")
    with db.connect(url) as conn:
        if conn.execute(RUN_EXISTS, (text,)).fetchone() is None:
            raise UsageError(f"no run {text} in recsys.pipeline_runs: `status` lists the recent runs")
    return text


def cmd_reproduce(args: argparse.Namespace) -> int:
    from recmodel.pipeline import reproduce

    url = _url()
    db.require_tables(url)
    run_key = _known_run_key(url, args.run_key)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"reproduce-{run_key}-"))
    try:
        result = reproduce(url, run_key, out_dir)
    except BaseException:
        if not args.out:  # a run that cannot be rebuilt leaves no empty or half-written folder of ours behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    verdict = ("identical weights" if result.identical else
               f"weights differ by up to {result.max_weight_diff:.3g} (the original stopped by {result.stopped_by})")
    console.print(f"run {result.run_key}: rebuilt into {result.model_dir}: {verdict}")
    return 0 if result.identical else 1


def cmd_quarantine(args: argparse.Namespace) -> int:
    from recmodel.extract import request_replay
    from recmodel.validate import REASONS

    if args.reason not in REASONS:
        raise UsageError(f"unknown quarantine reason {args.reason!r}; reasons: {', '.join(REASONS)}")
    url = _url()
    db.migrate(url)
    marked, pending = request_replay(url, args.reason, args.run)
    scope = f" of run {args.run}" if args.run else ""
    if marked == 0:
        console.print(f"no open quarantine entries with reason {args.reason}{scope}; nothing to replay")
    else:
        console.print(f"marked {marked:,} quarantine entries ({args.reason}{scope}) for replay; the next run re-reads "
                      f"and re-validates {pending:,} rows (a row quarantined for several reasons waits until "
                      "each of them is replayed)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from recmodel.outcomes import versions
    from recmodel.registry import overview, recent_alerts, serving_freshness

    url = _url()
    db.require_tables(url)
    state = overview(url, limit=args.limit)
    table = Table(title="model registry (newest first)")
    for column in ("version", "kind", "parent", "status", "decision", "ndcg@10", "champion", "popularity", "holdout",
                   "published", "serving"):
        table.add_column(column)
    for m in state["models"]:
        metrics = m["metrics"] or {}
        holdout = metrics.get("holdout")
        table.add_row(m["version"], m["kind"] + (" (refit)" if (m["lineage"] or {}).get("refit") else ""),
                      m["parent_version"] or "-", m["status"], m["decision"] or "-", _ndcg(metrics, "candidate"),
                      _ndcg(metrics, "champion"), _ndcg(metrics, "popularity"), _holdout_text(holdout) if holdout else "-",
                      f"{m['published_at']:%Y-%m-%d %H:%M}" if m["published_at"] else "-",
                      "yes" if m["serving"] else ("pruned" if m["pruned_at"] else ""))
    console.print(table)
    _print_slices({m["version"]: (m["metrics"] or {}).get("candidate") or {} for m in state["models"]}, "version",
                  "by slice, each candidate on its gate's holdout: NDCG@10 / HR@10 (users)")
    serving_model = next((m for m in state["models"] if m["serving"]), None)
    if serving_model and serving_model["kind"] == "baseline":
        console.print(f"[yellow]the popularity baseline {serving_model['version']} serves[/] (served_by = 'baseline'): "
                      + "; ".join(serving_model["reasons"]))
    runs = Table(title="recent runs")
    for column in ("run", "status", "stage", "extracted", "quarantined", "version", "message"):
        runs.add_column(column)
    for r in state["runs"]:
        runs.add_row(r["run_key"], r["status"], r["stage"] or "", str(r["rows_extracted"] or 0),
                     str(r["rows_quarantined"] or 0), r["model_version"] or "", (r["message"] or "")[:80])
    console.print(runs)
    _print_served(versions(url, limit=args.limit))
    _print_alerts(recent_alerts(url, limit=args.alerts))
    latest = next((r for r in state["runs"] if r["kind"] == "retrain" and (r["details"] or {}).get("validate")), None)
    if latest is not None and latest["details"]["validate"].get("reasons"):
        console.print(f"quarantine reasons of run {latest['run_key']}:")
        _print_quarantine_reasons(latest)
    freshness = serving_freshness(url)
    console.print(("[red]" if freshness.stale else "") + freshness.message)
    return 0


def _print_served(served: list[dict[str, Any]]) -> None:
    """What each served version's lists achieved (realized, @10) beside its gate figure and long tail."""
    if not served:
        return
    table = Table(title="served versions: realized outcomes @10 (observational: the lists shaped what users did) "
                        "and long tail")
    for column in ("version", "served", "users", "HR", "popularity HR", "NDCG", "popularity NDCG", "gate HR",
                   "coverage", "tail share", "novelty", "new items"):
        table.add_column(column)
    for v in served:
        realized, tail = v["realized"], v["long_tail"]
        until = "now" if v["serving"] else f"{v['last_served']:%m-%d %H:%M}"
        table.add_row(v["version"], f"{v['first_served']:%Y-%m-%d %H:%M} .. {until}", str(realized["users"]),
                      _figure(realized["hr@10"]), _figure(realized["popular_hr@10"]), _figure(realized["ndcg@10"]),
                      _figure(realized["popular_ndcg@10"]), _figure(v["gate"]["hr@10"]), _figure(tail.get("coverage")),
                      _figure(tail.get("tail_share")), _figure(tail.get("novelty"), "{:.2f} bits"),
                      _figure(tail.get("new_item_share"), "{:.2%}"))
    console.print(table)


def _figure(value: float | None, form: str = "{:.4f}") -> str:
    return "-" if value is None else form.format(value)


def _ndcg(metrics: dict[str, Any], name: str) -> str:
    return f"{metrics[name]['ndcg@10']:.4f}" if metrics.get(name) else "-"


def _print_alerts(alerts: list[Any]) -> None:
    if not alerts:
        console.print("no alerts")
        return
    table = Table(title="recent alerts (newest first)")
    for column in ("when (UTC)", "kind", "run", "message", "sent to"):
        table.add_column(column)
    for alert in alerts:
        table.add_row(f"{alert.at:%Y-%m-%d %H:%M}", alert.kind, alert.run_key, alert.message[:160],
                      ", ".join(alert.channels))
    console.print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if args.suite == "accuracy":
        from recmodel.accuracy import run_accuracy, run_accuracy_over_seeds
        from recmodel.config import PipelineConfig

        if not args.movielens:
            raise UsageError("bench accuracy needs --movielens DIR (a folder with ratings.csv + movies.csv)")
        if args.curves and not (args.ablations or args.seeds):
            raise UsageError("--curves draws the ablations' or the seeds' validation curves: add --ablations or "
                             "--seeds")
        if not 0 <= args.cold_items < 1:
            raise UsageError(f"--cold-items is a share of the items in [0, 1), got {args.cold_items}")
        conf = _parse_conf(args.conf)
        if "as_of" in conf:
            raise UsageError("bench accuracy runs its retrain as of now: --conf takes pipeline settings only")
        PipelineConfig.from_overrides(conf)  # a bad setting fails here, not in the retrain's first task
        options = {"cold_share": args.cold_items, "cold_seed": args.cold_seed, "placeholders": args.placeholder_titles}
        if args.seeds:
            seeds = _parse_seeds(args.seeds)
            if args.ablations or "seed" in conf:
                raise UsageError("--seeds sets the retrain's seed and runs no ablations: drop --ablations and "
                                 "conf's seed")
            run_accuracy_over_seeds(Path(args.movielens), seeds, output=output, conf=conf,
                                    curves=Path(args.curves) if args.curves else None, **options)
            return 0
        run_accuracy(Path(args.movielens), output=output, with_ablations=args.ablations, conf=conf,
                     curves=Path(args.curves) if args.curves else None, **options)
        return 0
    if args.suite == "celery":
        from recmodel.bench_scaleout import ScaleoutOptions, run_scaleout

        events = 500_000 if args.events is None else args.events
        if args.users < 10 or args.items < 20 or events < args.users or args.shards < 2 or args.rounds < 1:
            raise UsageError("bench celery needs --users >= 10, --items >= 20, --events >= --users, --shards >= 2 "
                             "and --rounds >= 1")
        _check_celery_stack(2)
        run_scaleout(ScaleoutOptions(users=args.users, items=args.items, events=events, shards=args.shards,
                                     rounds=args.rounds, output=output))
        return 0
    args.events = 1_000_000 if args.events is None else args.events
    from recmodel.bench import BenchOptions, run_bench

    if args.events < 1000:
        raise UsageError(f"--events must be at least 1000, got {args.events}")
    try:
        sizes = tuple(int(size) for size in args.sizes.split(",")) if args.sizes else ()
    except ValueError:
        raise UsageError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if any(size < 1000 for size in sizes):
        raise UsageError(f"every --sizes value must be at least 1000, got {args.sizes}")
    if args.epochs < 1 or args.score_users < 1 or args.score_items < 20:
        raise UsageError("--epochs and --score-users must be >= 1 and --score-items >= 20")
    run_bench(BenchOptions(events=args.events, sizes=sizes, epochs=args.epochs, score_users=args.score_users,
                           score_items=args.score_items, end_to_end=not args.no_dag, output=output,
                           plot=Path(args.plot) if args.plot else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recmodel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded DB, synthetic data, one full run through Airflow, summary "
                                       "(about 2 minutes on 2 CPU cores)")
    # Sized so the first run, MiniLM and the converged training included, takes about two minutes on two cores.
    demo.add_argument("--users", type=int, default=1000)
    demo.add_argument("--items", type=int, default=600)
    demo.add_argument("--events", type=int, default=40_000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--ui", action="store_true",
                      help="then keep Airflow running (api-server, scheduler, dag-processor) with the Recommender page")
    demo.add_argument("--port", type=int, default=8080, help="--ui: the Airflow API server's port")
    demo.add_argument("--executor", choices=["local", "celery"], default="local",
                      help="celery: run on the local Celery stack docker-compose.yaml describes (Redis, Airflow on "
                           "CeleryExecutor, Celery workers; needs redis-server) instead of in this process")
    demo.add_argument("--workers", type=int, default=2,
                      help="--executor celery: Celery workers (the first takes the train queue, as the GPU worker)")
    demo.set_defaults(func=cmd_demo)

    ui = sub.add_parser("ui", help="Airflow's UI (api-server, scheduler, dag-processor) on the current state, "
                                   "until Ctrl-C")
    ui.add_argument("--port", type=int, default=8080, help="the Airflow API server's port")
    ui.set_defaults(func=cmd_ui)

    database = sub.add_parser("db", help="the embedded Postgres: start it (up), print its URL (url) or stop it (down)")
    database.add_argument("action", choices=["up", "url", "down"])
    database.set_defaults(func=cmd_db)

    sub.add_parser("migrate", help="apply sql/ migrations").set_defaults(func=cmd_migrate)

    seed = sub.add_parser("seed", help="load (or append) synthetic interactions and catalog")
    seed.add_argument("--users", type=int, default=2000)
    seed.add_argument("--items", type=int, default=1000)
    seed.add_argument("--events", type=int, default=100_000)
    seed.add_argument("--seed", type=int, default=0)
    seed.set_defaults(func=cmd_seed)

    importer = sub.add_parser("import", help="import a dataset")
    importer.add_argument("kind", choices=["movielens"])
    importer.add_argument("folder")
    importer.set_defaults(func=cmd_import)

    retrain = sub.add_parser("retrain", help="one run of the recsys_retrain DAG through Airflow")
    retrain.add_argument("--conf", help="JSON object: pipeline settings (and optionally as_of)")
    retrain.add_argument("--as-of", help="ISO timestamp the run's data ends at (default: now)")
    retrain.set_defaults(func=cmd_retrain)

    roll = sub.add_parser("rollback", help="serve an earlier published version again")
    roll.add_argument("version")
    roll.set_defaults(func=cmd_rollback)

    rebuild = sub.add_parser("reproduce", help="train a run's model again from its manifest and compare the weights")
    rebuild.add_argument("run_key", help="the run, as `status` lists it (e.g. 20261101T120000Z)")
    rebuild.add_argument("--out", help="folder for the rebuilt model (default: a new temporary folder)")
    rebuild.set_defaults(func=cmd_reproduce)

    quarantine = sub.add_parser("quarantine", help="re-admit quarantined rows once their cause is fixed")
    quarantine.add_argument("action", choices=["replay"])
    quarantine.add_argument("--reason", required=True, help="quarantine reason, e.g. unknown_item")
    quarantine.add_argument("--run", help="only the rows quarantined by this run key (default: every run)")
    quarantine.set_defaults(func=cmd_quarantine)

    status = sub.add_parser("status", help="registry, gate decisions, serving version and freshness")
    status.add_argument("--limit", type=int, default=20, help="model versions and runs to list")
    status.add_argument("--alerts", type=int, default=5, help="alerts to list")
    status.set_defaults(func=cmd_status)

    bench = sub.add_parser("bench", help="benchmarks: stage timings (perf) or model vs baselines (accuracy)")
    bench.add_argument("suite", nargs="?", choices=["perf", "accuracy", "celery"], default="perf",
                       help="celery: scoring wall time on the local Celery stack with 1 and 2 workers")
    bench.add_argument("--output", help="write results as JSON here")
    bench.add_argument("--events", type=int,
                       help="perf: synthetic interactions at the main size, where every comparison runs "
                            "(default 1,000,000); celery: interactions (default 500,000)")
    bench.add_argument("--users", type=int, default=50_000, help="celery: synthetic users, all of them scored")
    bench.add_argument("--items", type=int, default=5_000, help="celery: synthetic items")
    bench.add_argument("--shards", type=int, default=4, help="celery: scoring shards")
    bench.add_argument("--rounds", type=int, default=2, help="celery: timed rounds per worker count")
    bench.add_argument("--sizes", help="perf: more sizes for the scaling table, e.g. 100000,5000000")
    bench.add_argument("--epochs", type=int, default=3, help="perf: training epochs per run")
    bench.add_argument("--score-users", type=int, default=100_000, help="perf: users in the scoring comparison")
    bench.add_argument("--score-items", type=int, default=20_000, help="perf: items in the scoring comparison")
    bench.add_argument("--no-dag", action="store_true", help="perf: skip the end-to-end run through Airflow")
    bench.add_argument("--plot", help="perf: write a PNG of stage time vs data size here")
    bench.add_argument("--movielens", help="accuracy: a MovieLens folder (e.g. ml-latest-small from GroupLens)")
    bench.add_argument("--ablations", action="store_true",
                       help="accuracy: also train each ablation (no text, other loss, constant LR, plain SASRec, "
                            "warm start) on the same snapshot and score it")
    bench.add_argument("--cold-items", type=float, default=0.0, metavar="SHARE",
                       help="accuracy: remove every interaction of this share of the items before the import "
                            "(e.g. 0.1): they are new items for the retrain and every reference")
    bench.add_argument("--placeholder-titles", action="store_true",
                       help="accuracy: replace every title with \"Product <id>\" and drop descriptions and tags "
                            "(a catalog whose text says nothing)")
    bench.add_argument("--cold-seed", type=int, default=0, help="accuracy: which items --cold-items makes cold")
    bench.add_argument("--curves", help="accuracy, with --ablations or --seeds: write a PNG of the validation curves "
                                        "here (per ablation, or each seed's training with the epochs it kept)")
    bench.add_argument("--seeds", help="accuracy: comma-separated training seeds, e.g. 13,14,15: one retrain per seed "
                                       "and the published view's mean with a t interval over them")
    bench.add_argument("--conf", help="accuracy: JSON object of pipeline settings for the retrain (and the "
                                      "ablations' base), as retrain --conf takes them, e.g. '{\"seed\": 14}'")
    bench.set_defaults(func=cmd_bench)
    return parser


def configure_logging(verbose: bool) -> None:
    """Our records on stderr through rich; third-party libraries only from WARNING.

    The `recmodel` logger has its own handler and does not propagate: a DAG run started from here
    executes its tasks in this process, where Airflow reconfigures the root logger at its own
    (quiet) level, and the stages' progress must still reach the terminal.
    """
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=log_console, show_path=False, show_time=False)
    handler.addFilter(quiet_watch)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])
    ours = logging.getLogger("recmodel")
    ours.handlers, ours.propagate = [handler], False
    ours.setLevel(level)
    quiet_libraries("airflow")  # the terminal shows Airflow's warnings, not its INFO chatter


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except (PermanentError, ValueError, RuntimeError, OSError) as exc:
        # Stage and input errors carry operator-facing messages; -v shows the traceback.
        if args.verbose:
            raise
        console.print(f"[red]error:[/] {exc}")
        return 2
