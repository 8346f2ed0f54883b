"""`python -m recmodel bench`: time every pipeline stage on synthetic data in a scratch database.

The benchmark never touches the configured recsys database: it creates `recsys_bench` on the
same server, seeds it, runs each step of one retraining run directly (no Airflow) and drops it.
Results are printed as a table and optionally written as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from recmodel import db, pipeline
from recmodel.config import settings

BENCH_DB = "recsys_bench"
console = Console()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_bench(*, output: Path | None, events: int) -> int:
    from recmodel.synth import seed_database

    server_url = db.resolve_url(settings())
    db.ensure_database(server_url, BENCH_DB)
    url = db.with_database(server_url, BENCH_DB)
    try:
        db.migrate(url)
        users = max(events // 50, 10)
        items = max(events // 100, 20)
        seed_database(url, users=users, items=items, events=events, seed=0)
        with tempfile.TemporaryDirectory(prefix="recsys-bench-") as home:
            stages = _time_stages(url, Path(home))
    finally:
        with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(BENCH_DB)))
    result = {"device": device_name(), "events": events, "stages": stages}
    _print(result)
    if output:
        output.write_text(json.dumps(result, indent=2, default=str))
        console.print(f"wrote {output}")
    return 0


def _time_stages(url: str, home: Path) -> dict[str, dict[str, Any]]:
    previous_home, previous_url = os.environ.get("RECSYS_HOME"), os.environ.get("RECSYS_DATABASE_URL")
    os.environ["RECSYS_HOME"], os.environ["RECSYS_DATABASE_URL"] = str(home), url
    try:
        ctx = pipeline.make_context(datetime.now(timezone.utc))
        stages: dict[str, dict[str, Any]] = {}

        def timed(name: str, step: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
            started = time.perf_counter()
            out = step(ctx, *args)
            stages[name] = {"seconds": round(time.perf_counter() - started, 3)}
            return out

        extracted = timed("extract", pipeline.step_extract)
        stages["extract"]["rows_per_s"] = round(extracted["rows"] / stages["extract"]["seconds"])
        validated = timed("validate", pipeline.step_validate, extracted)
        trained = timed("train", pipeline.step_train, validated)
        exported = timed("export", pipeline.step_export, trained)
        gated = timed("gate", pipeline.step_gate, exported)
        scored = timed("score", pipeline.step_score, {**gated, "accepted": True})
        published = timed("publish", pipeline.step_publish, scored)
        rows = sum(published["row_counts"].values())
        stages["publish"]["rows_per_s"] = round(rows / stages["publish"]["seconds"])
        stages["publish"]["swap_seconds"] = round(published["swap_seconds"], 4)
        return stages
    finally:
        for key, value in (("RECSYS_HOME", previous_home), ("RECSYS_DATABASE_URL", previous_url)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _print(result: dict[str, Any]) -> None:
    table = Table(title=f"recsys-retrain bench: {result['events']:,} interactions on {result['device']}")
    for column in ("stage", "seconds", "figure"):
        table.add_column(column)
    for name, figures in result["stages"].items():
        extra = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in figures.items() if k != "seconds")
        table.add_row(name, f"{figures['seconds']:.2f}", extra)
    console.print(table)
