"""`bench celery`: the scoring fan-out's wall time on the local Celery stack, with one worker and with two.

One `recsys_retrain` run on CeleryExecutor (`recmodel.celerystack`, the stack docker-compose.yaml
describes) trains and gates a model; only scoring is timed, so training is one epoch with no refit and
the gate does not hold the model back. Then the run's scoring fan-out (`score_users` over its shards,
and `publish` after them) is cleared and runs again, alternately on one worker and on two, `rounds`
times each; the fastest round of each counts. A round's wall time runs from the first shard's start to
the last shard's end, from Airflow's task-instance records. Each shard task's time is also split into
its scoring stage (the run manifest's seconds) and what surrounds it: process start, imports, reading
the snapshot and the model, which a second worker does not shrink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any

from recmodel import db, registry
from recmodel.bench import bench_environment, console, device_name, matmul_gflops, scratch_database
from recmodel.config import Settings, settings
from recmodel.stages import RETRAIN_DAG_ID, SCORE_USERS

SCALEOUT_DB = "recsys_bench_celery"
SCALEOUT_AIRFLOW_DB = "recsys_bench_celery_airflow"
WORKER_COUNTS = (1, 2)
RUN_TIMEOUT = 4 * 3600.0


@dataclass(frozen=True)
class ScaleoutOptions:
    users: int
    items: int
    events: int
    shards: int
    rounds: int = 2
    output: Path | None = None


def run_scaleout(options: ScaleoutOptions) -> dict[str, Any]:
    from recmodel.celerystack import AirflowApi, start_celery_stack
    from recmodel.runner import airflow_environment
    from recmodel.synth import seed_database

    server_url = db.resolve_url(settings())
    # One task at a time per worker unless told otherwise: "workers" then counts tasks running at once.
    os.environ.setdefault("AIRFLOW_WORKER_CONCURRENCY", "1")
    result: dict[str, Any] = {"device": device_name(), "cpu_count": os.cpu_count(),
                              "matmul_gflops": round(matmul_gflops(), 1), "users": options.users,
                              "items": options.items, "events": options.events, "shards": options.shards,
                              "worker_concurrency": int(os.environ["AIRFLOW_WORKER_CONCURRENCY"])}
    with tempfile.TemporaryDirectory(prefix="recsys-bench-celery-") as tmp, \
            scratch_database(server_url, SCALEOUT_DB) as url, \
            scratch_database(server_url, SCALEOUT_AIRFLOW_DB, migrate=False) as airflow_url:
        home = Path(tmp)
        console.print(f"seeding {options.events:,} interactions of {options.users:,} users on {options.items:,} items …")
        seed_database(url, users=options.users, items=options.items, events=options.events, seed=0)
        with bench_environment(url, home):
            os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db.sqlalchemy_url(airflow_url, "psycopg2")
            variables = {**airflow_environment(Settings(home=home, database_url=None), url),
                         "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env={**os.environ, **variables},
                       check=True, capture_output=True)
        stack = start_celery_stack(variables, home / "logs", workers=max(WORKER_COUNTS))
        try:
            api = AirflowApi(stack.base_url, stack.airflow.username, stack.airflow.password)
            api.wait_for_dag(RETRAIN_DAG_ID)
            api.set_paused(RETRAIN_DAG_ID, False)
            as_of = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
            conf = {"as_of": as_of.isoformat(), "epochs": 1, "refit_epochs": 0, "gate_enforced": False,
                    "score_shards": options.shards}
            console.print(f"training and gating once on {len(stack.workers)} workers, then timing the scoring "
                          f"fan-out ({options.shards} shards) with {' and '.join(map(str, WORKER_COUNTS))} worker(s) …")
            run_id = api.trigger(RETRAIN_DAG_ID, conf)
            _require_success(api, run_id)
            result["first_run"] = fan_out(api, run_id, url, registry.run_key_for(as_of))
            planned = dict(stack.workers)
            rounds: dict[str, list[dict[str, Any]]] = {str(n): [] for n in WORKER_COUNTS}
            for _ in range(options.rounds):
                for count in WORKER_COUNTS:
                    scale(stack, planned, count)
                    api.clear(RETRAIN_DAG_ID, run_id, [SCORE_USERS.name])
                    _require_success(api, run_id)
                    rounds[str(count)].append(fan_out(api, run_id, url, registry.run_key_for(as_of)))
                    console.print(f"  {count} worker(s): scoring wall {rounds[str(count)][-1]['wall_seconds']} s")
        finally:
            stack.stop()
    result["rounds"] = rounds
    best = {n: min(r["wall_seconds"] for r in runs) for n, runs in rounds.items()}
    result["best_wall_seconds"] = best
    result["speedup_2_vs_1"] = round(best["1"] / best["2"], 2)
    console.print(f"scoring wall time: 1 worker {best['1']} s, 2 workers {best['2']} s "
                  f"({result['speedup_2_vs_1']}x); matmul {result['matmul_gflops']} GFLOP/s on {result['cpu_count']} cores")
    if options.output:
        options.output.write_text(json.dumps(result, indent=2, default=str))
        console.print(f"wrote {options.output}")
    return result


def scale(stack: Any, planned: dict[str, Any], count: int) -> None:
    """Keep the first `count` planned workers running (warm shutdown of the rest, restart of missing ones)."""
    wanted = list(planned)[:count]
    for name in [n for n in stack.workers if n not in wanted]:
        stack.stop_worker(name)
    for name in [n for n in wanted if n not in stack.workers]:
        stack.start_worker(name, planned[name])
    stack.wait_for_workers()


def _require_success(api: Any, run_id: str) -> None:
    state = api.wait_for_run(RETRAIN_DAG_ID, run_id, RUN_TIMEOUT)
    if state != "success":
        raise RuntimeError(f"the benchmark's run {run_id} ended {state}: "
                           f"{ {t['task_id']: t['state'] for t in api.task_instances(RETRAIN_DAG_ID, run_id)} }")


def fan_out(api: Any, run_id: str, url: str, run_key: str) -> dict[str, Any]:
    """The scoring shards' latest tries: wall time, and per shard its worker, task seconds and stage seconds."""
    shards = [ti for ti in api.task_instances(RETRAIN_DAG_ID, run_id) if ti["task_id"] == SCORE_USERS.name]
    starts = [datetime.fromisoformat(ti["start_date"]) for ti in shards]
    ends = [datetime.fromisoformat(ti["end_date"]) for ti in shards]
    stages = (registry.run_manifest(url, run_key) or {}).get("stages", {})
    per_shard = []
    for ti in sorted(shards, key=lambda t: t["map_index"]):
        stage = stages.get(f"{SCORE_USERS.name}.{ti['map_index']}", {})
        per_shard.append({"shard": ti["map_index"], "worker": ti["hostname"], "task_seconds": round(ti["duration"], 2),
                          "stage_seconds": stage.get("seconds")})
    task_total = sum(s["task_seconds"] for s in per_shard)
    stage_total = sum(s["stage_seconds"] or 0 for s in per_shard)
    return {"wall_seconds": round((max(ends) - min(starts)).total_seconds(), 2), "shards": per_shard,
            "task_seconds": round(task_total, 2), "stage_seconds": round(stage_total, 2),
            "outside_stage_share": round(1 - stage_total / task_total, 3) if task_total else None}
