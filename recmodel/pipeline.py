"""One retraining run as a sequence of steps, each a plain function the DAG tasks (and tests) call.

Steps pass small JSON-able dicts (paths, counts, versions) to each other, never data: snapshots,
models and score tables live under ``$RECSYS_HOME/runs/<run_key>`` and ``$RECSYS_HOME/models``.
A run is keyed by its as-of time, so rerunning the same interval rewrites the same rows,
files and model version instead of adding new ones; once that version was published it is
immutable and the rerun is refused. Each step runs under its run's heartbeat (`beating`), and
`step_extract` claims the run: one at a time per database.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable

import numpy as np
import pandas as pd

from recmodel import db, registry
from recmodel.config import ConfigError, PipelineConfig, settings
from recmodel.logsetup import quiet_libraries
from recmodel.extract import (ExtractError, ExtractResult, commit_watermark, extract, mark_replayed, read_catalog,
                              read_increment, read_interactions)

log = logging.getLogger(__name__)

DELETE_QUARANTINE = "DELETE FROM recsys.quarantine WHERE run_key = %s"
COPY_QUARANTINE = "COPY recsys.quarantine (run_key, event_id, reason, row_data) FROM STDIN"
# Increment sizes of the runs before this one, for the volume check (newest first).
SELECT_PREVIOUS_VOLUMES = """
SELECT rows_extracted FROM recsys.extract_watermarks
WHERE high_watermark < %(as_of)s AND run_key <> %(run_key)s
ORDER BY high_watermark DESC LIMIT %(limit)s
"""
LIVE_RUN_POLL_SECONDS = 10.0
DATASET_FILE = "dataset.parquet"
RECOMMENDATIONS_FILE = "user_recommendations.parquet"
SIMILAR_FILE = "similar_items.parquet"
POPULAR_FILE = "popular_items.parquet"


@dataclass(frozen=True)
class RunContext:
    run_key: str
    as_of: datetime
    url: str
    home: Path
    config: PipelineConfig

    @property
    def version(self) -> str:
        return "v" + self.as_of.strftime("%Y%m%d%H%M%S")

    @property
    def run_dir(self) -> Path:
        return self.home / "runs" / self.run_key

    @property
    def model_dir(self) -> Path:
        return self.home / "models" / self.version


def make_context(as_of: datetime, overrides: dict[str, Any] | None = None) -> RunContext:
    """Resolve the database and settings for a run whose data ends at `as_of` (tz-aware)."""
    if as_of.tzinfo is None:
        raise ValueError(f"as_of must be timezone-aware, got {as_of.isoformat()}")
    as_of = as_of.astimezone(UTC).replace(microsecond=0)
    config = PipelineConfig.from_overrides(overrides)
    check_as_of(as_of, config)
    env = settings()
    url = db.resolve_url(env)
    db.require_tables(url)
    return RunContext(run_key=registry.run_key_for(as_of), as_of=as_of, url=url, home=env.home, config=config)


def check_as_of(as_of: datetime, config: PipelineConfig, now: datetime | None = None) -> None:
    """Refuse an as-of time in the future: its watermark would hide every row ingested until then."""
    latest = (now or datetime.now(UTC)) + timedelta(seconds=config.future_tolerance_seconds)
    if as_of > latest:
        raise ConfigError(f"as-of {as_of:%Y-%m-%d %H:%M:%S} UTC is in the future (now + future_tolerance_seconds="
                          f"{config.future_tolerance_seconds:g} is {latest:%Y-%m-%d %H:%M:%S} UTC): a run can only "
                          "read data that has arrived")


def as_of_from_airflow(context: dict[str, Any]) -> tuple[datetime, dict[str, Any]]:
    """A recsys_retrain run's as-of time and its other conf: ``conf["as_of"]`` when given (the CLI and
    the UI pass it), else the end of the scheduled data interval (or the run's run_after)."""
    conf = dict(context["dag_run"].conf or {})
    as_of = conf.pop("as_of", None)
    if as_of:
        when = datetime.fromisoformat(as_of)
        if when.tzinfo is None:
            raise ValueError(f"conf as_of must carry a timezone, got {as_of!r}")
    else:
        when = context.get("data_interval_end") or context["dag_run"].run_after
    return when, conf


def context_from_airflow(context: dict[str, Any]) -> RunContext:
    """The run's context for a task; every task starts here, so this also applies the logging policy."""
    quiet_libraries()
    as_of, overrides = as_of_from_airflow(context)
    return make_context(as_of, overrides)


Step = TypeVar("Step", bound=Callable[..., Any])


def beating(step: Step) -> Step:
    """Run a step under its run's heartbeat (`registry.heartbeat`), named after the step."""
    name = step.__name__.removeprefix("step_")

    @functools.wraps(step)
    def wrapper(ctx: RunContext, *args: Any, **kwargs: Any) -> Any:
        with registry.heartbeat(ctx.url, ctx.run_key, name):
            return step(ctx, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _extract_result(payload: dict[str, Any]) -> ExtractResult:
    return ExtractResult(**payload)


def step_extract(ctx: RunContext, dag_run_id: str | None = None, *, wait_seconds: float = 0.0) -> dict[str, Any]:
    """Claim the run (one at a time, never over a published version), then extract its increment.

    While another run is alive, waits up to `wait_seconds` for it (a scheduled run or backfill queues
    behind the run in progress; the CLI refuses at once), then refuses. The heartbeat starts once the
    run is claimed: a run waiting for its turn holds nothing.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            dead = registry.claim_run(ctx.url, ctx.run_key, ctx.as_of, dag_run_id,
                                      [ctx.version, baseline_version(ctx.version)])
            break
        except registry.AnotherRunIsLive as exc:
            if time.monotonic() + LIVE_RUN_POLL_SECONDS > deadline:
                raise
            log.info("waiting for the run in progress: %s", exc)
            time.sleep(LIVE_RUN_POLL_SECONDS)
    for run_key in dead:
        log.warning("run %s had stopped without finishing (no heartbeat); marked failed", run_key)
    with registry.heartbeat(ctx.url, ctx.run_key, "extract"):
        return _extract_claimed(ctx)


def _extract_claimed(ctx: RunContext) -> dict[str, Any]:
    result = extract(ctx.url, ctx.run_key, ctx.as_of, ctx.run_dir,
                     lookback=timedelta(hours=ctx.config.late_data_lookback_hours))
    registry.update_run(ctx.url, ctx.run_key, stage="extract", rows_extracted=result.rows,
                        details={"extract": {"low_watermark": result.low_watermark, "rows": result.rows,
                                             "rows_already_seen": result.rows_already_seen}})
    return asdict(result)


@beating
def step_validate(ctx: RunContext, extracted: dict[str, Any]) -> dict[str, Any]:
    """Quarantine bad rows, fail on dataset-level problems, fold clean rows into a new dataset snapshot.

    When nothing new arrived, returns the previous snapshot if no model was judged on it yet (a run
    failed after validating it), else no dataset (`dataset_path` None): the caller skips the rest.
    """
    from recmodel.validate import DataValidationError, Reference, reason_summaries, validate_increment

    result = _extract_result(extracted)
    if result.rows == 0:
        if result.base_dataset_path is None and result.rows_already_seen:
            raise ExtractError(f"all {result.rows_already_seen:,} interactions with ingested_at <= "
                               f"{ctx.as_of:%Y-%m-%d %H:%M:%S} UTC were quarantined by earlier runs (`python -m "
                               "recmodel status` says why); once the cause is fixed or the setting changed, re-admit "
                               "them with `python -m recmodel quarantine replay --reason REASON`")
        if result.base_dataset_path is None:
            raise ExtractError(f"no interactions with ingested_at <= {ctx.as_of:%Y-%m-%d %H:%M:%S} UTC: "
                               "the interactions table is empty (load data with seed or import first)")
        with db.connect(ctx.url) as conn:
            judged_through = registry.trained_through(conn)
        if judged_through is None or judged_through < result.low_watermark:
            # The snapshot was committed but no model was judged on it (training failed or was
            # killed after validation): train on it now rather than wait for new rows.
            log.info("no new interactions, but the snapshot up to %s UTC was never trained on (models were judged "
                     "on data up to %s): training on it", f"{result.low_watermark:%Y-%m-%d %H:%M:%S}",
                     f"{judged_through:%Y-%m-%d %H:%M:%S} UTC" if judged_through else "nothing yet")
            registry.update_run(ctx.url, ctx.run_key, stage="validate", rows_quarantined=0,
                                details={"validate": {"clean": 0, "untrained_snapshot": result.base_dataset_path}})
            return {"new_rows": 0, "dataset_path": result.base_dataset_path, "catalog_path": result.catalog_path,
                    "quarantined": 0, "watermark": ctx.as_of.isoformat()}
        message = f"no new interactions since the watermark {result.low_watermark:%Y-%m-%d %H:%M:%S} UTC; nothing to train"
        registry.update_run(ctx.url, ctx.run_key, stage="validate", status="skipped", rows_quarantined=0,
                            message=message)
        log.info(message)
        return {"new_rows": 0, "dataset_path": None, "message": message}

    increment = read_increment(result.increment_path)
    catalog = read_catalog(result.catalog_path)
    base = read_interactions(result.base_dataset_path) if result.base_dataset_path else None
    with db.connect(ctx.url) as conn:
        volumes = tuple(row[0] for row in conn.execute(
            SELECT_PREVIOUS_VOLUMES, {"as_of": ctx.as_of, "run_key": ctx.run_key, "limit": ctx.config.volume_history_runs}))
    report = validate_increment(increment, catalog["item_id"].to_numpy(), as_of=ctx.as_of, config=ctx.config,
                                gx_dir=ctx.home / "gx", run_key=ctx.run_key,
                                reference=Reference(previous_volumes=volumes, previous_snapshot=base))
    reasons = reason_summaries(report.quarantined, ctx.config)
    for reason in reasons:
        log.warning("quarantined %s", reason.line())
    summary = {
        "clean": len(report.clean), "quarantined_rows": int(report.quarantined["event_id"].nunique()),
        "by_reason": report.quarantined["reason"].value_counts().to_dict(),
        "reasons": [asdict(reason) for reason in reasons],
        "docs_path": str(report.docs_path) if report.docs_path else None,
        "expectations": [asdict(o) for o in report.outcomes],
    }
    with db.transaction(ctx.url) as conn:
        _write_quarantine(conn, ctx.run_key, report.quarantined)
        if report.passed:
            from recmodel.data import extend_dataset

            dataset = extend_dataset(base, report.clean)
            dataset_path = ctx.run_dir / DATASET_FILE
            dataset.to_parquet(dataset_path, index=False)
            commit_watermark(conn, ctx.run_key, result, rows_clean=len(report.clean),
                             dataset_path=str(dataset_path), dataset_rows=len(dataset))
            replayed = mark_replayed(conn, ctx.run_key, increment["event_id"].to_numpy())
            if replayed:
                summary["replayed_entries"] = replayed
    registry.update_run(ctx.url, ctx.run_key, stage="validate", rows_quarantined=summary["quarantined_rows"],
                        details={"validate": summary})
    if not report.passed:
        message = "data validation failed: " + "; ".join(report.dataset_failures)
        if reasons:
            message += ". Quarantined by reason: " + " | ".join(reason.line() for reason in reasons)
        if report.docs_path:
            message += f" (Data Docs: {report.docs_path})"
        registry.update_run(ctx.url, ctx.run_key, status="failed", message=message)
        raise DataValidationError(message)
    log.info("validated %s rows: %s clean, %s quarantined%s; dataset now %s rows", f"{result.rows:,}",
             f"{summary['clean']:,}", f"{summary['quarantined_rows']:,}",
             f" {summary['by_reason']}" if summary["by_reason"] else "", f"{len(dataset):,}")
    return {"new_rows": summary["clean"], "dataset_path": str(dataset_path), "catalog_path": result.catalog_path,
            "quarantined": summary["quarantined_rows"], "watermark": ctx.as_of.isoformat()}


def _write_quarantine(conn, run_key: str, quarantined: pd.DataFrame) -> None:
    """Replace this run's quarantine rows (a rerun writes the same set again) with COPY."""
    conn.execute(DELETE_QUARANTINE, (run_key,))
    if quarantined.empty:
        return
    from recmodel.validate import quarantine_json

    records = quarantined.drop(columns=["reason"]).astype(object).to_dict(orient="records")
    with conn.cursor().copy(COPY_QUARANTINE) as copy:
        for event_id, reason, record in zip(quarantined["event_id"], quarantined["reason"], records):
            copy.write_row((run_key, int(event_id), reason, quarantine_json(record)))


def _training_events(ctx: RunContext, dataset_path: str) -> pd.DataFrame:
    """The snapshot as training, export and the gate see it: cut to `training_window_days` when set.

    Scoring reads the whole snapshot, so a user whose events are all older than the window is still served.
    """
    from recmodel.data import within_training_window

    return within_training_window(read_interactions(dataset_path), ctx.config.training_window_days)


def verified_champion(url: str) -> registry.ModelRecord | None:
    """The serving model, after checking its ONNX files (served and gated) against the sha256 the
    registry recorded."""
    record = registry.champion(url)
    if record is not None:
        registry.check_artifacts(record)
    return record


class SupersededRun(Exception):
    """The champion was trained on newer data than this run's interval: training would be wasted."""


@beating
def step_train(ctx: RunContext, validated: dict[str, Any]) -> dict[str, Any]:
    """Plan the gate's holdout, then fine-tune from the champion on everything else.

    Raises `SupersededRun` when the champion's data is newer than ours. That happens when a
    scheduled interval runs after a manual run of a later as-of time (e.g. the DAG is unpaused
    after `retrain`), or in a backfill: the snapshot is built (validate), but a model of older
    data would never be published over the champion, so it is not trained.
    """
    from recmodel.gate import held_out_mask, plan_holdout
    from recmodel.train import TrainingError, train

    serving = registry.serving_watermark(ctx.url)  # a model or a baseline
    if serving is not None and serving[1] > ctx.as_of:
        message = (f"superseded: {serving[0]}, which serves, was built on data up to "
                   f"{serving[1]:%Y-%m-%d %H:%M} UTC, newer than this run's {ctx.as_of:%Y-%m-%d %H:%M} UTC; "
                   "the snapshot is kept, no model is trained")
        registry.update_run(ctx.url, ctx.run_key, stage="train", status="skipped", message=message)
        raise SupersededRun(message)
    champion = verified_champion(ctx.url)
    # A rerun of the run that produced the champion trains the same way again: no parent.
    parent = champion if champion is not None and champion.version != ctx.version else None
    dataset = _training_events(ctx, validated["dataset_path"])
    catalog = read_catalog(validated["catalog_path"])
    plan = plan_holdout(dataset, ctx.config)
    log.info("gate holdout: %s%s", plan.describe(), "" if plan.enough else
             f" (fewer than gate_min_users={plan.min_users}: the gate will not decide)")
    registry.update_run(ctx.url, ctx.run_key, stage="train", details={"holdout": asdict(plan)})
    try:
        result = train(dataset[~held_out_mask(dataset, plan)], catalog, config=ctx.config, out_dir=ctx.model_dir,
                       cache_dir=ctx.home / "cache", parent_dir=parent.gated.artifact_dir if parent else None)
    except TrainingError as exc:
        if champion is not None:
            raise  # a model serves: it keeps serving, and the failure is the news
        log.warning("no model can be trained yet (%s); the gate will publish the baseline", exc)
        return {**validated, "holdout": asdict(plan), "untrainable": str(exc), "parent_version": None}
    registry.update_run(ctx.url, ctx.run_key, details={"train": asdict(result)})
    return {**validated, "model_dir": result.model_dir, "holdout": asdict(plan), "device": result.device,
            "parent_version": parent.version if parent else None, "train_events": result.train_events,
            "n_items": result.n_items}


@beating
def step_export(ctx: RunContext, trained: dict[str, Any]) -> dict[str, Any]:
    from recmodel.export import export

    if trained.get("untrainable"):
        return trained  # nothing to export; the gate serves the baseline
    registry.update_run(ctx.url, ctx.run_key, stage="export")
    dataset = _training_events(ctx, trained["dataset_path"])
    catalog = read_catalog(trained["catalog_path"])
    result = export(Path(trained["model_dir"]), catalog, dataset, top_k=ctx.config.top_k, seed=ctx.config.seed)
    registry.register_candidate(
        ctx.url, version=ctx.version, parent_version=trained["parent_version"], run_key=ctx.run_key,
        dataset_path=trained["dataset_path"], watermark=ctx.as_of, train_rows=trained["train_events"],
        n_items=trained["n_items"], device=trained["device"], artifact_dir=trained["model_dir"],
        onnx_path=result.onnx_path, onnx_sha256=result.onnx_sha256)
    registry.update_run(ctx.url, ctx.run_key, model_version=ctx.version, details={"export": asdict(result)})
    return {**trained, "onnx_path": result.onnx_path, "onnx_sha256": result.onnx_sha256, "provider": result.provider}


def baseline_version(version: str) -> str:
    """The version under which a run's baseline is published when its candidate is not."""
    return version + "-baseline"


@beating
def step_gate(ctx: RunContext, exported: dict[str, Any]) -> dict[str, Any]:
    """Candidate vs champion vs popularity on the planned holdout; decides what this run publishes.

    `serve` in the result: "model" (accepted), "baseline" (not accepted and no model champion yet:
    a popularity baseline is registered and published, so every known user is served), or None
    (not accepted; the champion keeps serving).
    """
    from recmodel import gate
    from recmodel.data import is_active
    from recmodel.score import open_session
    from recmodel.train import load_vocab

    registry.update_run(ctx.url, ctx.run_key, stage="gate")
    dataset = _training_events(ctx, exported["dataset_path"])
    catalog = read_catalog(exported["catalog_path"])
    plan = gate.HoldoutPlan(**exported["holdout"])
    active_ids = catalog.loc[is_active(catalog), "item_id"].to_numpy()
    serving_model = verified_champion(ctx.url)
    # The champion to beat; none for a rerun of the run that produced it.
    champion_record = serving_model if serving_model is not None and serving_model.version != ctx.version else None

    def evaluate(model_dir: Path, onnx_path: Path, holdout: gate.Holdout, stats: gate.CatalogStats) -> dict[str, Any]:
        session, _ = open_session(onnx_path)
        return gate.evaluate_lists(gate.onnx_recommendations(session, load_vocab(model_dir), holdout),
                                   holdout.targets, stats)

    if exported.get("untrainable"):
        decision = gate.GateDecision(gate.UNDECIDED, [f"no model could be trained: {exported['untrainable']}"])
    elif plan.users == 0:
        decision = gate.undecided(plan)
    else:
        held_out = gate.held_out_mask(dataset, plan)
        holdout = gate.build_holdout(dataset, held_out)
        train_events = dataset[~held_out]
        stats = gate.catalog_stats(train_events["item_id"].to_numpy(), active_ids)
        candidate = evaluate(Path(exported["model_dir"]), Path(exported["onnx_path"]), holdout, stats)
        champion = (evaluate(champion_record.gated.artifact_dir, champion_record.gated.onnx_path, holdout, stats)
                    if champion_record else None)
        popularity = gate.evaluate_lists(gate.popularity_recommendations(train_events, holdout, active_ids),
                                         holdout.targets, stats)
        decision = gate.decide(candidate, champion, popularity, ctx.config)
        if not plan.enough:
            decision = gate.GateDecision(gate.UNDECIDED, gate.undecided(plan).reasons, decision.metrics)
    metrics = {**decision.metrics, "holdout": asdict(plan)}
    if champion_record is not None:
        metrics["holdout"]["champion_version"] = champion_record.version
    registry.record_decision(ctx.url, ctx.version, decision=decision.outcome, reasons=decision.reasons,
                             metrics=metrics)
    gated = {**exported, "decision": decision.outcome, "reasons": decision.reasons,
             "serve": "model" if decision.accepted else None, "publish_version": ctx.version}
    if decision.accepted:
        registry.update_run(ctx.url, ctx.run_key, details={"gate": metrics})
        log.info("gate accepted %s: %s", ctx.version, decision.reasons[0])
        return gated
    message = f"gate {decision.outcome} {ctx.version}: " + "; ".join(decision.reasons)
    if serving_model is None:
        version = baseline_version(ctx.version)
        why = (f"no model serves yet and candidate {ctx.version} was {decision.outcome}: publishing the popularity "
               "baseline so every known user gets recommendations until a model is accepted")
        registry.register_baseline(
            ctx.url, version=version, run_key=ctx.run_key, dataset_path=exported["dataset_path"], watermark=ctx.as_of,
            train_rows=len(dataset), n_items=len(active_ids), artifact_dir=str(ctx.run_dir),
            reasons=[*decision.reasons, why],
            metrics={"baseline": metrics.get("popularity", {}), "holdout": metrics["holdout"]},
            lineage={"instead_of": ctx.version, "gate": decision.outcome})
        registry.update_run(ctx.url, ctx.run_key, message=f"{message}; {why}", details={"gate": metrics})
        log.warning("%s; %s", message, why)
        return {**gated, "serve": "baseline", "publish_version": version, "reasons": [*decision.reasons, why]}
    registry.update_run(ctx.url, ctx.run_key, status="rejected", message=message, details={"gate": metrics})
    log.warning("%s; the current champion keeps serving", message)
    return gated


@beating
def step_refit(ctx: RunContext, gated: dict[str, Any]) -> dict[str, Any]:
    """The accepted model, trained on for `refit_epochs` on the whole snapshot (within `training_window_days`;
    the holdout included),
    re-exported with its parity check: what serves has learned from every interaction up to as_of.

    Leaves `gated` as it is when nothing is accepted or `refit_epochs` is 0. A refit whose ONNX
    export fails its parity check is dropped: the accepted gated model serves, and `lineage` says why.
    """
    from recmodel.export import ExportParityError, export
    from recmodel.train import train

    if gated["serve"] != "model" or ctx.config.refit_epochs == 0:
        return gated
    registry.update_run(ctx.url, ctx.run_key, stage="refit")
    dataset = _training_events(ctx, gated["dataset_path"])
    catalog = read_catalog(gated["catalog_path"])
    refit_dir = ctx.model_dir / "refit"
    lineage: dict[str, Any] = {"gated": {"artifact_dir": gated["model_dir"], "onnx_path": gated["onnx_path"],
                                         "onnx_sha256": gated["onnx_sha256"], "train_rows": gated["train_events"],
                                         "holdout": gated["holdout"]}}
    result = train(dataset, catalog, config=ctx.config, out_dir=refit_dir, cache_dir=ctx.home / "cache",
                   parent_dir=Path(gated["model_dir"]), refit=True)
    try:
        exported = export(refit_dir, catalog, dataset, top_k=ctx.config.top_k, seed=ctx.config.seed)
    except ExportParityError as exc:
        lineage["refit_failed"] = str(exc)
        registry.record_refit(ctx.url, ctx.version, artifact_dir=gated["model_dir"], onnx_path=gated["onnx_path"],
                              onnx_sha256=gated["onnx_sha256"], train_rows=gated["train_events"], lineage=lineage)
        log.warning("refit of %s dropped (%s); the gated model serves", ctx.version, exc)
        return gated
    lineage |= {
        "refit": {"artifact_dir": str(refit_dir), "onnx_path": exported.onnx_path, "train_rows": result.train_events,
                  "epochs": result.epochs, "from": "gated", "parity": {"max_score_diff": exported.max_score_diff,
                                                                       "topk_agreement": exported.topk_agreement}},
    }
    registry.record_refit(ctx.url, ctx.version, artifact_dir=str(refit_dir), onnx_path=exported.onnx_path,
                          onnx_sha256=exported.onnx_sha256, train_rows=result.train_events, lineage=lineage)
    registry.update_run(ctx.url, ctx.run_key, details={"refit": {"train": asdict(result), "export": asdict(exported)}})
    log.info("refit %s on all %d interactions (%d epochs from the gated weights)", ctx.version, result.train_events,
             result.epochs)
    return {**gated, "model_dir": str(refit_dir), "onnx_path": exported.onnx_path, "train_events": result.train_events}


def shard_of(user_ids: np.ndarray, shards: int) -> np.ndarray:
    """The scoring shard of each user: stable across runs and workers (user_id mod shards)."""
    return np.asarray(user_ids, dtype=np.int64) % shards


@beating
def step_score_users(ctx: RunContext, gated: dict[str, Any], shard: int = 0, shards: int = 1) -> dict[str, Any]:
    """Top-K for the users of one shard, written to its own Parquet file (the DAG maps this over shards)."""
    from recmodel import score
    from recmodel.train import load_vocab

    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not within 0..{shards - 1}")
    registry.update_run(ctx.url, ctx.run_key, stage="score")
    full = read_interactions(gated["dataset_path"])
    dataset = full[shard_of(full["user_id"].to_numpy(), shards) == shard]
    if gated["serve"] == "baseline":
        catalog = read_catalog(gated["catalog_path"])
        recommendations = score.baseline_recommendations(full, dataset, catalog, top_k=ctx.config.top_k)
        provider = "baseline (popularity)"
    else:
        recommendations, provider = score.recommend(Path(gated["onnx_path"]), load_vocab(Path(gated["model_dir"])),
                                                    dataset, top_k=ctx.config.top_k,
                                                    batch_size=ctx.config.score_batch_size)
    path = ctx.run_dir / RECOMMENDATIONS_FILE.replace(".parquet", f".shard-{shard}-of-{shards}.parquet")
    recommendations.to_parquet(path, index=False)
    users = int(recommendations["user_id"].nunique())
    log.info("scored shard %d of %d: %d users on %s", shard + 1, shards, users, provider)
    return {"shard": shard, "shards": shards, "path": str(path), "provider": provider, "users": users,
            "rows": len(recommendations)}


@beating
def step_score_items(ctx: RunContext, gated: dict[str, Any]) -> dict[str, Any]:
    """The item tables, which every user shares: similar items and popular items (the fallback).

    A model's similar items are its item vectors' nearest neighbours; a baseline's are the nearest
    by item text (the MiniLM embeddings training already cached).
    """
    from recmodel import score
    from recmodel.data import Vocab, vocab_text_matrix
    from recmodel.export import inactive_mask
    from recmodel.train import load_vocab

    dataset = read_interactions(gated["dataset_path"])
    catalog = read_catalog(gated["catalog_path"])
    if gated["serve"] == "baseline":
        vocab = Vocab.from_catalog(catalog["item_id"].to_numpy())
        vectors = vocab_text_matrix(vocab, catalog, ctx.home / "cache")
    else:
        vocab = load_vocab(Path(gated["model_dir"]))
        vectors = np.load(Path(gated["model_dir"]) / "item_vectors.npy")
    similar = score.similar_items(vectors, vocab, inactive_mask(vocab, catalog), k=ctx.config.similar_k)
    popular = score.popular_items(dataset, catalog, k=ctx.config.popular_k,
                                  window_days=ctx.config.popular_window_days)
    paths = {"version": gated["publish_version"]}
    for name, frame in ((SIMILAR_FILE, similar), (POPULAR_FILE, popular)):
        path = ctx.run_dir / name
        frame.to_parquet(path, index=False)
        paths[name.removesuffix(".parquet")] = str(path)
    return paths


def step_score(ctx: RunContext, gated: dict[str, Any]) -> dict[str, Any]:
    """Every shard of `score_shards` in turn, then the item tables: what the DAG's mapped tasks do."""
    shards = ctx.config.score_shards
    user_shards = [step_score_users(ctx, gated, shard, shards) for shard in range(shards)]
    return scored_tables(ctx, user_shards, step_score_items(ctx, gated))


def scored_tables(ctx: RunContext, user_shards: list[dict[str, Any]], item_tables: dict[str, str]) -> dict[str, Any]:
    """What publish loads: every shard's file for user_recommendations, one file per item table."""
    found = sorted(s["shard"] for s in user_shards)
    expected = list(range(user_shards[0]["shards"])) if user_shards else []
    if not user_shards or found != expected:
        raise ValueError(f"scoring shards {found} do not cover 0..{len(expected) - 1}: refusing to publish a partial table")
    registry.update_run(ctx.url, ctx.run_key, details={"score": {
        "provider": user_shards[0]["provider"], "shards": len(user_shards),
        "users": sum(s["users"] for s in user_shards), "rows": sum(s["rows"] for s in user_shards)}})
    return {"version": item_tables["version"],
            "user_shards": [s["path"] for s in sorted(user_shards, key=lambda s: s["shard"])],
            "tables": {view: path for view, path in item_tables.items() if view != "version"}}


@beating
def step_publish(ctx: RunContext, scored: dict[str, Any]) -> dict[str, Any]:
    """Assemble every shard into one versioned table (with the item tables) and switch to it."""
    from recmodel.publish import publish

    registry.update_run(ctx.url, ctx.run_key, stage="publish")
    frames = {view: pd.read_parquet(path) for view, path in scored["tables"].items()}
    frames["user_recommendations"] = pd.concat([pd.read_parquet(path) for path in scored["user_shards"]],
                                               ignore_index=True)
    result = publish(ctx.url, scored["version"], frames, generated_at=ctx.as_of,
                     keep_versions=ctx.config.keep_versions)
    kind = "the popularity baseline " if result.version.endswith("-baseline") else ""
    registry.update_run(ctx.url, ctx.run_key, status="success", model_version=result.version,
                        message=f"published {kind}{result.version}", details={"publish": asdict(result)})
    return asdict(result)


def run_all(ctx: RunContext) -> dict[str, Any]:
    """Every step in order without Airflow (benchmarks and stage tests); the DAG is the real entry point."""
    validated = step_validate(ctx, step_extract(ctx))
    if validated["dataset_path"] is None:
        return validated
    try:
        trained = step_train(ctx, validated)
    except SupersededRun as exc:
        return {**validated, "superseded": str(exc)}
    gated = step_refit(ctx, step_gate(ctx, step_export(ctx, trained)))
    if gated["serve"] is None:
        return gated
    return step_publish(ctx, step_score(ctx, gated))
