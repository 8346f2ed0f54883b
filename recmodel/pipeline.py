"""One retraining run as a sequence of stages (`recmodel.stages`), each a plain function the DAG tasks
(and tests) call.

Stages hand each other small typed values (`recmodel.manifest`: paths, counts, versions), never
data: snapshots, models and score files live under ``$RECSYS_HOME/runs/<run_key>`` and
``$RECSYS_HOME/models`` (`recmodel.artifacts`). A run is keyed by its as-of time, so rerunning the
same interval rewrites the same rows, files and model version instead of adding new ones; once that
version was published it is immutable and the rerun is refused.

Every stage runs inside `recorded`, the one place that does a stage's bookkeeping: the run's
heartbeat and stage, its status and message, the stage's details, timing, output and artifacts
in the run manifest, and its alert. `step_extract` claims the run: one at a time per database.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, UTC
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import pandas as pd

from recmodel import artifacts, db, longtail, manifest, registry, stages
from recmodel.artifacts import RunFolder
from recmodel.config import ConfigError, PipelineConfig, settings
from recmodel.errors import NothingNew, NothingToPublish, PermanentError, RunEnds, SupersededRun
from recmodel.extract import (ExtractError, ExtractResult, commit_watermark, extract, mark_replayed,
                              previous_volumes, read_catalog, read_increment, read_interactions, write_quarantine)
from recmodel.logsetup import quiet_libraries
from recmodel.longtail import LongTail, TailBoost
from recmodel.manifest import (Exported, Gated, ItemTables, ModelFiles, Scored, ScoredShard, Snapshot, StageRecord,
                               Trained, Validated)
from recmodel.publish import PublishResult

log = logging.getLogger(__name__)

LIVE_RUN_POLL_SECONDS = 10.0
SERVE_MODEL, SERVE_BASELINE = "model", "baseline"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class RunContext:
    run_key: str
    as_of: datetime
    url: str
    home: Path
    config: PipelineConfig
    dag_run_id: str | None = None
    # A scheduled run (or a backfill's) that finds another retrain alive waits this long for it; the CLI
    # and tests refuse at once.
    live_run_wait_seconds: float = 0.0
    # The Airflow task context, when a task runs the stage: alert e-mails name the task from it.
    airflow: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def version(self) -> str:
        return registry.version_for(self.as_of)

    @property
    def files(self) -> RunFolder:
        return artifacts.run_folder(self.home, self.run_key)

    @property
    def run_dir(self) -> Path:
        return self.files.path

    @property
    def model_dir(self) -> Path:
        return artifacts.model_folder(self.home, self.version)


def make_context(as_of: datetime, overrides: dict[str, Any] | None = None, *, url: str | None = None,
                 dag_run_id: str | None = None, live_run_wait_seconds: float = 0.0,
                 airflow: dict[str, Any] | None = None) -> RunContext:
    """Resolve the database and settings for a run whose data ends at `as_of` (tz-aware).

    Every setting is checked here, before any work starts.
    """
    if as_of.tzinfo is None:
        raise ValueError(f"as_of must be timezone-aware, got {as_of.isoformat()}")
    as_of = as_of.astimezone(UTC).replace(microsecond=0)
    config = PipelineConfig.from_overrides(overrides)
    check_as_of(as_of, config)
    env = settings()
    url = url or db.resolve_url(env)
    db.require_tables(url)
    return RunContext(run_key=registry.run_key_for(as_of), as_of=as_of, url=url, home=env.home, config=config,
                      dag_run_id=dag_run_id, live_run_wait_seconds=live_run_wait_seconds, airflow=airflow)


def check_as_of(as_of: datetime, config: PipelineConfig, now: datetime | None = None) -> None:
    """Refuse an as-of time in the future: its watermark would hide every row ingested until then."""
    latest = (now or datetime.now(UTC)) + timedelta(seconds=config.future_tolerance_seconds)
    if as_of > latest:
        raise ConfigError(f"as-of {as_of:%Y-%m-%d %H:%M:%S} UTC is in the future (now + future_tolerance_seconds="
                          f"{config.future_tolerance_seconds:g} is {latest:%Y-%m-%d %H:%M:%S} UTC): a run can only "
                          "read data that has arrived")


def context_from_airflow(context: dict[str, Any]) -> RunContext:
    """The run's context for a task; every task starts here, so this also applies the logging policy."""
    from recmodel import taskenv

    quiet_libraries()
    as_of, overrides = taskenv.as_of_and_conf(context)
    return make_context(as_of, overrides, url=taskenv.database_url(), dag_run_id=context["run_id"],
                        live_run_wait_seconds=settings().live_run_wait_minutes * 60, airflow=context)


# --- bookkeeping -------------------------------------------------------------------------------------

@contextmanager
def recorded(ctx: RunContext, name: str, key: str | None = None,
             claim: registry.Claim | None = None) -> Iterator[StageRecord]:
    """Run one stage's work under its bookkeeping; the work fills in the `StageRecord` it is given.

    The stage works under the run's claim (`claim`, or the current one, which a run declared dead or
    claimed again by another Airflow run no longer has: `LostClaim`); `record.claim` fences its writes.
    While the block runs, the run's heartbeat names the stage. On the way out, whatever happened, the
    record goes to the run's row (status, message, counts, details) and, with the stage's outcome,
    timing, output and the sha256 of its artifacts, to the run manifest (row and manifest.json); then
    the stage's alert, if it raised one, is sent. `RunEnds` sets the run's status; other exceptions
    are recorded in the manifest and left to Airflow's retries and failure alert.
    """
    stage = stages.BY_NAME[name]
    claim = claim or registry.resume_claim(ctx.url, ctx.run_key, ctx.dag_run_id)
    record = StageRecord(name=key or name, started_at=datetime.now(UTC), claim=claim)
    started = time.monotonic()
    outcome, error = "done", None
    with registry.heartbeat(ctx.url, claim, name):
        registry.enter_stage(ctx.url, claim, stage.run_stage)
        try:
            yield record
        except RunEnds as end:
            outcome = end.outcome
            if end.records_status:
                record.end(end.outcome, str(end))
            raise
        except BaseException as exc:
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            _write_record(ctx, record, outcome, error, time.monotonic() - started)


def _write_record(ctx: RunContext, record: StageRecord, outcome: str, error: str | None, seconds: float) -> None:
    from recmodel import alerts

    try:
        registry.update_run(ctx.url, ctx.run_key, status=record.status, message=record.message,
                            details=record.details, claim=record.claim, **record.columns)
        paths = manifest.artifact_paths(record.output) if record.output is not None else {}
        entry = {"outcome": outcome, "status": record.status, "started_at": record.started_at.isoformat(),
                 "seconds": round(seconds, 3), "error": error,
                 "output": manifest.to_json(record.output) if record.output is not None else None}
        whole = registry.merge_manifest(ctx.url, ctx.run_key, run=run_header(ctx), stages={record.name: entry},
                                        artifacts={name: {"path": path, "sha256": artifacts.sha256_file(Path(path))}
                                                   for name, path in paths.items() if Path(path).is_file()},
                                        claim=record.claim)
        manifest.write_file(ctx.files.manifest, whole)
    except Exception as exc:
        if error is None:
            raise  # the stage succeeded but its record did not land: fail it rather than lose the record
        log.warning("could not record stage %s of run %s (%s); the stage's own error follows", record.name,
                    ctx.run_key, exc)
    if record.alert is not None:
        alerts.send(ctx.url, ctx.run_key, record.alert, ctx.airflow)


def run_header(ctx: RunContext) -> dict[str, Any]:
    """The manifest's run-level fields: what the run was asked to do, and with which software."""
    return {"run_key": ctx.run_key, "as_of": ctx.as_of.isoformat(), "version": ctx.version,
            "dag_run_id": ctx.dag_run_id, "config": ctx.config.as_dict(), "software": manifest.software(),
            "run_dir": str(ctx.run_dir), "model_dir": str(ctx.model_dir)}


def stage_step(name: str) -> Callable[[Callable[Concatenate[RunContext, StageRecord, P], R]],
                                      Callable[Concatenate[RunContext, P], R]]:
    """Make `work(ctx, record, ...)` the stage `name`'s step, `step(ctx, ...)`, run under `recorded`."""
    def decorate(work: Callable[Concatenate[RunContext, StageRecord, P], R]) -> Callable[Concatenate[RunContext, P], R]:
        @functools.wraps(work)
        def step(ctx: RunContext, *args: P.args, **kwargs: P.kwargs) -> R:
            with recorded(ctx, name) as record:
                record.output = work(ctx, record, *args, **kwargs)
            return record.output

        return step

    return decorate


# --- the stages --------------------------------------------------------------------------------------

def step_extract(ctx: RunContext) -> ExtractResult:
    """Claim the run (one at a time, never over a published version), then extract its increment.

    While another run is alive, waits up to `ctx.live_run_wait_seconds` for it (a scheduled run or
    backfill queues behind the run in progress; the CLI refuses at once), then refuses. The heartbeat
    starts once the run is claimed: a run waiting for its turn holds nothing.
    """
    deadline = time.monotonic() + ctx.live_run_wait_seconds
    while True:
        try:
            claim, dead = registry.claim_run(ctx.url, ctx.run_key, ctx.as_of, ctx.dag_run_id,
                                             [ctx.version, baseline_version(ctx.version)])
            break
        except registry.AnotherRunIsLive as exc:
            if time.monotonic() + LIVE_RUN_POLL_SECONDS > deadline:
                raise
            log.info("waiting for the run in progress: %s", exc)
            time.sleep(LIVE_RUN_POLL_SECONDS)
    for run_key in dead:
        log.warning("run %s had stopped without finishing (no heartbeat); marked failed", run_key)
    with recorded(ctx, "extract", claim=claim) as record:
        result = extract(ctx.url, ctx.run_key, ctx.as_of, ctx.run_dir,
                         lookback=timedelta(hours=ctx.config.late_data_lookback_hours),
                         text_max_chars=ctx.config.item_text_max_chars)
        record.columns["rows_extracted"] = result.rows
        record.note(extract={"low_watermark": result.low_watermark, "rows": result.rows,
                             "rows_already_seen": result.rows_already_seen,
                             "rows_behind_watermark": result.rows_behind_watermark,
                             "catalog_items_truncated": result.catalog_items_truncated})
        record.output = result
    return result


@stage_step("validate")
def step_validate(ctx: RunContext, record: StageRecord, extracted: ExtractResult) -> Validated:
    """Quarantine bad rows, fail on dataset-level problems, fold clean rows into a new dataset snapshot.

    When nothing new arrived, returns the previous snapshot if no model was judged on it yet (a run
    failed after validating it), else ends the run (`NothingNew`).
    """
    if extracted.rows == 0:
        return _previous_snapshot(ctx, record, extracted)
    from recmodel.data import extend_dataset
    from recmodel.validate import DataValidationError, Reference, quarantine_rows, reason_summaries, validate_increment

    increment = read_increment(extracted.increment_path)
    catalog = read_catalog(extracted.catalog_path)
    base = read_interactions(extracted.base_dataset_path) if extracted.base_dataset_path else None
    volumes = previous_volumes(ctx.url, ctx.run_key, ctx.as_of, ctx.config.volume_history_runs)
    report = validate_increment(increment, catalog["item_id"].to_numpy(), as_of=ctx.as_of, config=ctx.config,
                                gx_dir=ctx.home / "gx", run_key=ctx.run_key,
                                reference=Reference(previous_volumes=volumes, previous_snapshot=base))
    reasons = reason_summaries(report.quarantined, ctx.config)
    for reason in reasons:
        log.warning("quarantined %s", reason.line())
    quarantined = int(report.quarantined["event_id"].nunique())
    summary = {
        "clean": len(report.clean), "quarantined_rows": quarantined,
        "by_reason": report.quarantined["reason"].value_counts().to_dict(),
        "reasons": [asdict(reason) for reason in reasons],
        "docs_path": str(report.docs_path) if report.docs_path else None,
        "expectations": [asdict(o) for o in report.outcomes],
    }
    record.columns["rows_quarantined"] = quarantined
    record.note(validate=summary)
    with registry.fenced_transaction(ctx.url, record.claim) as conn:
        write_quarantine(conn, ctx.run_key, quarantine_rows(report.quarantined))
        if report.passed:
            dataset = extend_dataset(base, report.clean)
            artifacts.write_parquet(dataset, ctx.files.dataset)
            commit_watermark(conn, ctx.run_key, extracted, rows_clean=len(report.clean),
                             dataset_path=str(ctx.files.dataset), dataset_rows=len(dataset))
            replayed = mark_replayed(conn, ctx.run_key, increment["event_id"].to_numpy())
            if replayed:
                summary["replayed_entries"] = replayed
    if not report.passed:
        message = "data validation failed: " + "; ".join(report.dataset_failures)
        if reasons:
            message += ". Quarantined by reason: " + " | ".join(reason.line() for reason in reasons)
        if report.docs_path:
            message += f" (Data Docs: {report.docs_path})"
        record.end("failed", message)
        raise DataValidationError(message)
    log.info("validated %s rows: %s clean, %s quarantined%s; dataset now %s rows", f"{extracted.rows:,}",
             f"{summary['clean']:,}", f"{quarantined:,}",
             f" {summary['by_reason']}" if summary["by_reason"] else "", f"{len(dataset):,}")
    return Validated(snapshot=Snapshot(str(ctx.files.dataset), extracted.catalog_path), new_rows=len(report.clean),
                     quarantined=quarantined)


def _previous_snapshot(ctx: RunContext, record: StageRecord, extracted: ExtractResult) -> Validated:
    """No new rows: the last snapshot again when no model was judged on it yet, else the run ends."""
    if extracted.base_dataset_path is None and extracted.rows_already_seen:
        raise ExtractError(f"all {extracted.rows_already_seen:,} interactions with ingested_at <= "
                           f"{ctx.as_of:%Y-%m-%d %H:%M:%S} UTC were quarantined by earlier runs (`python -m "
                           "recmodel status` says why); once the cause is fixed or the setting changed, re-admit "
                           "them with `python -m recmodel quarantine replay --reason REASON`")
    if extracted.base_dataset_path is None:
        raise ExtractError(f"no interactions with ingested_at <= {ctx.as_of:%Y-%m-%d %H:%M:%S} UTC: "
                           "the interactions table is empty (load data with seed or import first)")
    record.columns["rows_quarantined"] = 0
    with db.connect(ctx.url) as conn:
        judged_through = registry.trained_through(conn)
    if judged_through is not None and judged_through >= extracted.low_watermark:
        raise NothingNew(f"no new interactions since the watermark {extracted.low_watermark:%Y-%m-%d %H:%M:%S} UTC; "
                         "nothing to train")
    # The snapshot was committed but no model was judged on it (training failed or was killed after
    # validation): train on it now rather than wait for new rows.
    log.info("no new interactions, but the snapshot up to %s UTC was never trained on (models were judged "
             "on data up to %s): training on it", f"{extracted.low_watermark:%Y-%m-%d %H:%M:%S}",
             f"{judged_through:%Y-%m-%d %H:%M:%S} UTC" if judged_through else "nothing yet")
    record.note(validate={"clean": 0, "untrained_snapshot": extracted.base_dataset_path})
    return Validated(snapshot=Snapshot(extracted.base_dataset_path, extracted.catalog_path), new_rows=0,
                     quarantined=0)


def _training_events(ctx: RunContext, snapshot: Snapshot) -> pd.DataFrame:
    """The snapshot as training, export and the gate see it: cut to `training_window_days` when set.

    Scoring reads the whole snapshot, so a user whose events are all older than the window is still served.
    """
    from recmodel.data import within_training_window

    return within_training_window(read_interactions(snapshot.dataset_path), ctx.config.training_window_days)


def verified_champion(url: str) -> registry.ModelRecord | None:
    """The serving model, after checking its ONNX files (served and gated) against the sha256 the
    registry recorded."""
    record = registry.champion(url)
    if record is not None:
        registry.check_artifacts(record)
    return record


@stage_step("train")
def step_train(ctx: RunContext, record: StageRecord, validated: Validated) -> Trained:
    """Plan the gate's holdout, then fine-tune from the champion on everything else.

    Ends the run (`SupersededRun`) when the serving version's data is newer than ours. That happens
    when a scheduled interval runs after a manual run of a later as-of time (e.g. the DAG is unpaused
    after `retrain`), or in a backfill: the snapshot is built (validate), but a model of older
    data would never be published over it, so it is not trained.
    """
    from recmodel.gate import held_out_mask, plan_holdout
    from recmodel.train import TrainingError, train

    serving = registry.serving_watermark(ctx.url)  # a model or a baseline
    if serving is not None and serving[1] > ctx.as_of:
        raise SupersededRun(f"superseded: {serving[0]}, which serves, was built on data up to "
                            f"{serving[1]:%Y-%m-%d %H:%M} UTC, newer than this run's {ctx.as_of:%Y-%m-%d %H:%M} UTC; "
                            "the snapshot is kept, no model is trained")
    champion = verified_champion(ctx.url)
    # A rerun of the run that produced the champion trains the same way again: no parent.
    parent = champion if champion is not None and champion.version != ctx.version else None
    dataset = _training_events(ctx, validated.snapshot)
    catalog = read_catalog(validated.snapshot.catalog_path)
    plan = plan_holdout(dataset, ctx.config)
    log.info("gate holdout: %s%s", plan.describe(), "" if plan.enough else
             f" (fewer than gate_min_users={plan.min_users}: the gate will not decide)")
    record.note(holdout=asdict(plan))
    try:
        result = train(dataset[~held_out_mask(dataset, plan)], catalog, config=ctx.config, out_dir=ctx.model_dir,
                       cache_dir=ctx.home / "cache", parent_dir=parent.gated.artifact_dir if parent else None)
    except TrainingError as exc:
        if champion is not None:
            raise  # a model serves: it keeps serving, and the failure is the news
        log.warning("no model can be trained yet (%s); the gate will publish the baseline", exc)
        return Trained(snapshot=validated.snapshot, holdout=plan, parent_version=None, model_dir=None,
                       untrainable=str(exc))
    record.note(train=asdict(result))
    return Trained(snapshot=validated.snapshot, holdout=plan, parent_version=parent.version if parent else None,
                   parent_dir=str(parent.gated.artifact_dir) if parent else None, model_dir=result.model_dir,
                   device=result.device, train_events=result.train_events, n_items=result.n_items)


@stage_step("export")
def step_export(ctx: RunContext, record: StageRecord, trained: Trained) -> Exported:
    """The candidate as ONNX (with its parity check), registered; nothing to do when nothing was trained."""
    from recmodel.export import export

    if trained.model_dir is None:
        return Exported(trained=trained, model=None)  # the gate serves the baseline
    dataset = _training_events(ctx, trained.snapshot)
    catalog = read_catalog(trained.snapshot.catalog_path)
    result = export(Path(trained.model_dir), catalog, dataset, top_k=ctx.config.top_k, seed=ctx.config.seed)
    registry.register_candidate(
        ctx.url, claim=record.claim, version=ctx.version, parent_version=trained.parent_version, run_key=ctx.run_key,
        dataset_path=trained.snapshot.dataset_path, watermark=ctx.as_of, train_rows=trained.train_events,
        n_items=trained.n_items, device=trained.device, artifact_dir=trained.model_dir,
        onnx_path=result.onnx_path, onnx_sha256=result.onnx_sha256)
    record.columns["model_version"] = ctx.version
    record.note(export=asdict(result))
    return Exported(trained=trained, provider=result.provider,
                    model=ModelFiles(model_dir=trained.model_dir, onnx_path=result.onnx_path,
                                     onnx_sha256=result.onnx_sha256, train_rows=trained.train_events))


def baseline_version(version: str) -> str:
    """The version under which a run's baseline is published when its candidate is not."""
    return version + "-baseline"


@stage_step("gate")
def step_gate(ctx: RunContext, record: StageRecord, exported: Exported) -> Gated:
    """Candidate vs champion vs popularity on the planned holdout; decides what this run publishes.

    `serve` in the result: "model" (accepted, or `gate_enforced` is off), "baseline" (not accepted and
    no model champion yet: a popularity baseline is registered and published, so every known user is
    served), or None (not accepted; the champion keeps serving).
    """
    from recmodel import alerts, gate
    from recmodel.data import is_active

    trained = exported.trained
    dataset = _training_events(ctx, trained.snapshot)
    catalog = read_catalog(trained.snapshot.catalog_path)
    plan = trained.holdout
    active_ids = catalog.loc[is_active(catalog), "item_id"].to_numpy()
    serving_model = verified_champion(ctx.url)
    # The champion to beat; none for a rerun of the run that produced it.
    champion_record = serving_model if serving_model is not None and serving_model.version != ctx.version else None

    def evaluate(model_dir: Path, onnx_path: Path, holdout: gate.Holdout, train_events: pd.DataFrame,
                 stats: gate.CatalogStats) -> dict[str, Any]:
        """What the model would serve the holdout's users, re-ranked as scoring re-ranks, scored."""
        session, _ = artifacts.open_session(onnx_path)
        vocab = artifacts.load_vocab(model_dir)
        tail = TailBoost.of(ctx.config.tail_boost, train_events, vocab)
        return gate.evaluate_lists(gate.onnx_recommendations(session, vocab, holdout, tail=tail),
                                   holdout.targets, stats, cold=gate.cold_users(holdout.histories))

    if exported.model is None:
        decision = gate.GateDecision(gate.UNDECIDED, [f"no model could be trained: {trained.untrainable}"])
    elif plan.users == 0:
        decision = gate.undecided(plan)
    else:
        held_out = gate.held_out_mask(dataset, plan)
        holdout = gate.build_holdout(dataset, held_out)
        train_events = dataset[~held_out]
        stats = gate.catalog_stats(train_events["item_id"].to_numpy(), active_ids)
        candidate = evaluate(Path(exported.model.model_dir), Path(exported.model.onnx_path), holdout, train_events,
                             stats)
        champion = (evaluate(champion_record.gated.artifact_dir, champion_record.gated.onnx_path, holdout,
                             train_events, stats) if champion_record else None)
        popularity = gate.evaluate_lists(gate.popularity_recommendations(train_events, holdout, active_ids),
                                         holdout.targets, stats, cold=gate.cold_users(holdout.histories))
        decision = gate.decide(candidate, champion, popularity, ctx.config)
        if not plan.enough:
            decision = gate.GateDecision(gate.UNDECIDED, gate.undecided(plan).reasons, decision.metrics)
    metrics = {**decision.metrics, "holdout": asdict(plan)}
    if champion_record is not None:
        metrics["holdout"]["champion_version"] = champion_record.version
    registry.record_decision(ctx.url, ctx.version, decision=decision.outcome, reasons=decision.reasons,
                             metrics=metrics, claim=record.claim)
    record.note(gate=metrics)
    gated = Gated(snapshot=trained.snapshot, decision=decision.outcome, reasons=tuple(decision.reasons),
                  serve=SERVE_MODEL if decision.accepted else None, publish_version=ctx.version, model=exported.model)
    if decision.accepted:
        log.info("gate accepted %s: %s", ctx.version, decision.reasons[0])
        return gated
    message = f"gate {decision.outcome} {ctx.version}: " + "; ".join(decision.reasons)
    if exported.model is not None and not ctx.config.gate_enforced:
        log.warning("%s; published all the same: gate_enforced is off", message)
        return dataclasses.replace(gated, serve=SERVE_MODEL,
                                   reasons=(*gated.reasons, "published all the same: gate_enforced is off"))
    if serving_model is None:
        why = (f"no model serves yet and candidate {ctx.version} was {decision.outcome}: publishing the popularity "
               "baseline so every known user gets recommendations until a model is accepted")
        gated = dataclasses.replace(gated, serve=SERVE_BASELINE, publish_version=baseline_version(ctx.version),
                                    reasons=(*gated.reasons, why))
        registry.register_baseline(
            ctx.url, version=gated.publish_version, run_key=ctx.run_key, dataset_path=trained.snapshot.dataset_path,
            watermark=ctx.as_of, train_rows=len(dataset), n_items=len(active_ids), artifact_dir=str(ctx.run_dir),
            reasons=list(gated.reasons), metrics={"baseline": metrics.get("popularity", {}), "holdout": metrics["holdout"]},
            lineage={"instead_of": ctx.version, "gate": decision.outcome}, claim=record.claim)
        record.message = f"{message}; {why}"
        log.warning("%s; %s", message, why)
    else:
        record.end("rejected", message)
        log.warning("%s; the current champion keeps serving", message)
    record.alert = alerts.gate_rejection(ctx.url, ctx.version, gated)
    return gated


@stage_step("refit")
def step_refit(ctx: RunContext, record: StageRecord, gated: Gated) -> Gated:
    """The accepted model, trained on for `refit_epochs` on the whole snapshot (within `training_window_days`;
    the holdout included), re-exported with its parity check: what serves has learned from every interaction
    up to as_of.

    Returns `gated` as it is when nothing is accepted or `refit_epochs` is 0. A refit whose ONNX
    export fails its parity check is dropped: the accepted gated model serves, and `lineage` says why.
    """
    from recmodel.export import ExportParityError, export
    from recmodel.train import train

    if gated.serve != SERVE_MODEL or gated.model is None or ctx.config.refit_epochs == 0:
        return gated
    dataset = _training_events(ctx, gated.snapshot)
    catalog = read_catalog(gated.snapshot.catalog_path)
    refit_dir = ctx.model_dir / artifacts.REFIT_FOLDER
    lineage: dict[str, Any] = {"gated": {"artifact_dir": gated.model.model_dir, "onnx_path": gated.model.onnx_path,
                                         "onnx_sha256": gated.model.onnx_sha256, "train_rows": gated.model.train_rows}}
    result = train(dataset, catalog, config=ctx.config, out_dir=refit_dir, cache_dir=ctx.home / "cache",
                   parent_dir=Path(gated.model.model_dir), refit=True)
    try:
        exported = export(refit_dir, catalog, dataset, top_k=ctx.config.top_k, seed=ctx.config.seed)
    except ExportParityError as exc:
        lineage["refit_failed"] = str(exc)
        registry.record_refit(ctx.url, ctx.version, artifact_dir=gated.model.model_dir,
                              onnx_path=gated.model.onnx_path, onnx_sha256=gated.model.onnx_sha256,
                              train_rows=gated.model.train_rows, lineage=lineage, claim=record.claim)
        log.warning("refit of %s dropped (%s); the gated model serves", ctx.version, exc)
        return gated
    lineage["refit"] = {"artifact_dir": str(refit_dir), "onnx_path": exported.onnx_path,
                        "train_rows": result.train_events, "epochs": result.epochs, "from": "gated",
                        "parity": {"max_score_diff": exported.max_score_diff, "topk_agreement": exported.topk_agreement}}
    registry.record_refit(ctx.url, ctx.version, artifact_dir=str(refit_dir), onnx_path=exported.onnx_path,
                          onnx_sha256=exported.onnx_sha256, train_rows=result.train_events, lineage=lineage,
                          claim=record.claim)
    record.note(refit={"train": asdict(result), "export": asdict(exported)})
    log.info("refit %s on all %d interactions (%d epochs from the gated weights)", ctx.version, result.train_events,
             result.epochs)
    return dataclasses.replace(gated, model=ModelFiles(model_dir=str(refit_dir), onnx_path=exported.onnx_path,
                                                       onnx_sha256=exported.onnx_sha256,
                                                       train_rows=result.train_events))


def shard_of(user_ids: np.ndarray, shards: int) -> np.ndarray:
    """The scoring shard of each user: stable across runs and workers (user_id mod shards)."""
    return np.asarray(user_ids, dtype=np.int64) % shards


def scoring_shards(ctx: RunContext, gated: Gated) -> list[int]:
    """The user shards to score (`score_shards`); ends the run when the gate left nothing to publish."""
    if gated.serve is None:
        raise NothingToPublish(f"gate {gated.decision}; nothing new to publish: " + "; ".join(gated.reasons))
    return list(range(ctx.config.score_shards))


def step_score_users(ctx: RunContext, gated: Gated, shard: int = 0, shards: int | None = None) -> ScoredShard:
    """Top-K for the users of one shard of `shards` (default `score_shards`), written to its own Parquet file
    (the DAG maps this over the shards)."""
    from recmodel import score

    shards = shards or ctx.config.score_shards
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not within 0..{shards - 1}")
    with recorded(ctx, stages.SCORE_USERS.name, key=f"{stages.SCORE_USERS.name}.{shard}") as record:
        scoring_shards(ctx, gated)
        full = read_interactions(gated.snapshot.dataset_path)
        dataset = full[shard_of(full["user_id"].to_numpy(), shards) == shard]
        if gated.serve == SERVE_BASELINE or gated.model is None:
            catalog = read_catalog(gated.snapshot.catalog_path)
            recommendations = score.baseline_recommendations(full, dataset, catalog, top_k=ctx.config.top_k)
            provider = "baseline (popularity)"
        else:
            model_dir = Path(gated.model.model_dir)
            vocab = artifacts.load_vocab(model_dir)
            recommendations, provider = score.recommend(
                Path(gated.model.onnx_path), vocab, dataset, top_k=ctx.config.top_k,
                batch_size=ctx.config.score_batch_size, tail=TailBoost.of(ctx.config.tail_boost, full, vocab),
                explain_with=artifacts.load_item_vectors(model_dir), explain_window=ctx.config.max_history)
        path = ctx.files.user_shard(shard, shards)
        artifacts.write_parquet(recommendations, path)
        users = int(recommendations["user_id"].nunique())
        log.info("scored shard %d of %d: %d users on %s", shard + 1, shards, users, provider)
        record.output = ScoredShard(shard=shard, shards=shards, path=str(path), provider=provider, users=users,
                                    rows=len(recommendations))
    return record.output


@stage_step("score_items")
def step_score_items(ctx: RunContext, record: StageRecord, gated: Gated) -> ItemTables:
    """The item tables, which every user shares: similar items and popular items (the fallback).

    A model's similar items are its item vectors' nearest neighbours; a baseline's are the nearest
    by item text (the MiniLM embeddings training already cached).
    """
    from recmodel import score
    from recmodel.data import Vocab, inactive_mask, vocab_text_matrix

    scoring_shards(ctx, gated)
    dataset = read_interactions(gated.snapshot.dataset_path)
    catalog = read_catalog(gated.snapshot.catalog_path)
    if gated.serve == SERVE_BASELINE or gated.model is None:
        vocab = Vocab.from_catalog(catalog["item_id"].to_numpy())
        vectors = vocab_text_matrix(vocab, catalog, ctx.home / "cache")
    else:
        vocab = artifacts.load_vocab(Path(gated.model.model_dir))
        vectors = artifacts.load_item_vectors(Path(gated.model.model_dir))
    similar = score.similar_items(vectors, vocab, inactive_mask(vocab, catalog), k=ctx.config.similar_k)
    popular = score.popular_items(dataset, catalog, k=ctx.config.popular_k,
                                  window_days=ctx.config.popular_window_days,
                                  min_users=ctx.config.popular_min_users)
    artifacts.write_parquet(similar, ctx.files.similar_items)
    artifacts.write_parquet(popular, ctx.files.popular_items)
    return ItemTables(version=gated.publish_version, similar_items=str(ctx.files.similar_items),
                      popular_items=str(ctx.files.popular_items), snapshot=gated.snapshot)


def score_all(ctx: RunContext, gated: Gated) -> tuple[list[ScoredShard], ItemTables]:
    """Every shard of `score_shards` in turn, then the item tables: what the DAG's mapped tasks do."""
    shards = scoring_shards(ctx, gated)
    return [step_score_users(ctx, gated, shard, len(shards)) for shard in shards], step_score_items(ctx, gated)


def scored_tables(user_shards: list[ScoredShard], item_tables: ItemTables) -> Scored:
    """What publish loads: every shard's file for user_recommendations, one file per item table."""
    found = sorted(s.shard for s in user_shards)
    expected = list(range(user_shards[0].shards)) if user_shards else []
    if not user_shards or found != expected:
        raise ValueError(f"scoring shards {found} do not cover 0..{len(expected) - 1}: refusing to publish a partial table")
    return Scored(version=item_tables.version,
                  user_shards=tuple(s.path for s in sorted(user_shards, key=lambda s: s.shard)), tables=item_tables)


@stage_step("publish")
def step_publish(ctx: RunContext, record: StageRecord, user_shards: list[ScoredShard],
                 item_tables: ItemTables) -> PublishResult:
    """Assemble every shard into one versioned table (with the item tables) and switch to it."""
    from recmodel.publish import publish

    scored = scored_tables(user_shards, item_tables)
    record.note(score={"provider": user_shards[0].provider, "shards": len(user_shards),
                       "users": sum(s.users for s in user_shards), "rows": sum(s.rows for s in user_shards)})
    frames = load_scored(scored)
    long_tail = measure_long_tail(frames["user_recommendations"], item_tables)
    registry.record_long_tail(ctx.url, scored.version, long_tail.as_dict(), claim=record.claim)
    record.note(long_tail=long_tail.as_dict())
    result = publish(ctx.url, scored.version, frames, generated_at=ctx.as_of, keep_versions=ctx.config.keep_versions,
                     claim=record.claim)
    kind = "the popularity baseline " if result.version.endswith("-baseline") else ""
    record.end("success", f"published {kind}{result.version}")
    record.columns["model_version"] = result.version
    record.note(publish=asdict(result))
    return result


def measure_long_tail(recommendations: pd.DataFrame, item_tables: ItemTables) -> LongTail:
    """Coverage, tail share and novelty of every list a version publishes, against its snapshot."""
    from recmodel.data import is_active

    snapshot = item_tables.snapshot
    catalog = read_catalog(snapshot.catalog_path)
    return longtail.measure(recommendations, read_interactions(snapshot.dataset_path),
                            catalog.loc[is_active(catalog), "item_id"].to_numpy())


def load_scored(scored: Scored) -> dict[str, pd.DataFrame]:
    """Publish's frames: every user shard as one table, and each item table."""
    return {"user_recommendations": pd.concat([pd.read_parquet(path) for path in scored.user_shards],
                                              ignore_index=True),
            "similar_items": pd.read_parquet(scored.tables.similar_items),
            "popular_items": pd.read_parquet(scored.tables.popular_items)}


# --- the whole run -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: `status` success (published `version`), skipped or rejected, and why."""

    status: str
    message: str
    version: str | None = None
    published: PublishResult | None = None


def run_chain(ctx: RunContext, on_stage: Callable[[str, Callable[[], Any]], Any] | None = None) -> Gated:
    """The `stages.CHAIN` steps in order, each fed the previous one's output; `on_stage(name, call)` may
    wrap each call (bench times them)."""
    value: Any = None
    for stage in stages.CHAIN:
        step = globals()[stage.step]
        call = functools.partial(step, ctx) if value is None else functools.partial(step, ctx, value)
        value = on_stage(stage.name, call) if on_stage else call()
    return value


def run_all(ctx: RunContext) -> RunOutcome:
    """Every stage in order without Airflow (benchmarks and stage tests); the DAG is the real entry point."""
    try:
        published = step_publish(ctx, *score_all(ctx, run_chain(ctx)))
    except RunEnds as end:
        return RunOutcome(status=end.outcome, message=str(end))
    return RunOutcome(status="success", message=f"published {published.version}", version=published.version,
                      published=published)


@dataclass(frozen=True)
class Reproduction:
    """A run's gated model trained again from its manifest, beside the original."""

    run_key: str
    model_dir: str
    original_dir: str
    max_weight_diff: float  # the largest absolute difference over every weight
    identical: bool
    stopped_by: str  # how the original's training ended: a time budget may stop a rebuild elsewhere


class ReproductionError(PermanentError):
    """The run's manifest or the files it names cannot rebuild its model."""


def reproduce(url: str, run_key: str, out_dir: Path) -> Reproduction:
    """Train run `run_key`'s gated model again into `out_dir` from what its manifest recorded: the same
    dataset and catalog snapshots (their sha256 checked first), the same resolved settings, holdout
    plan and parent weights; then compare the weights with the original's."""

    from recmodel.data import within_training_window
    from recmodel.gate import held_out_mask
    from recmodel.train import train

    record = registry.run_manifest(url, run_key)
    if not record or "train" not in record.get("stages", {}):
        raise ReproductionError(f"run {run_key} has no manifest with a train stage (runs before the manifest was "
                                "introduced, and runs that stopped before training, have nothing to rebuild)")
    trained = manifest.from_json(Trained, record["stages"]["train"]["output"])
    if trained.model_dir is None:
        raise ReproductionError(f"run {run_key} trained no model: {trained.untrainable}")
    for name in ("dataset", "catalog"):
        artifact = record["artifacts"][name]
        if artifacts.sha256_file(Path(artifact["path"])) != artifact["sha256"]:
            raise ReproductionError(f"{artifact['path']} is not the {name} run {run_key} trained on (its sha256 "
                                    "changed)")
    config = PipelineConfig.from_overrides(record["config"])
    dataset = within_training_window(read_interactions(trained.snapshot.dataset_path), config.training_window_days)
    catalog = read_catalog(trained.snapshot.catalog_path)
    result = train(dataset[~held_out_mask(dataset, trained.holdout)], catalog, config=config, out_dir=out_dir,
                   cache_dir=settings().home / "cache", parent_dir=Path(trained.parent_dir) if trained.parent_dir else None)
    original = artifacts.load_weights(Path(trained.model_dir))[1]
    rebuilt = artifacts.load_weights(out_dir)[1]
    if original.keys() != rebuilt.keys():
        diff = float("inf")
    else:
        diff = max(float((original[name].float() - rebuilt[name].float()).abs().max()) for name in original)
    summary = artifacts.training_summary(Path(trained.model_dir))
    return Reproduction(run_key=run_key, model_dir=str(out_dir), original_dir=trained.model_dir, max_weight_diff=diff,
                        identical=diff == 0.0 and result.epochs == summary["epochs"],
                        stopped_by=summary["stopped_by"])


# --- Airflow ----------------------------------------------------------------------------------------

@contextmanager
def airflow_outcomes() -> Iterator[None]:
    """`RunEnds` skips the task; a `PermanentError` fails it at once (a retry would fail the same way)."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    try:
        yield
    except RunEnds as end:
        raise AirflowSkipException(str(end)) from end
    except PermanentError as exc:
        raise AirflowFailException(str(exc)) from exc


def run_task(name: str, context: dict[str, Any], *inputs: Any) -> Any:
    """Stage `name` as an Airflow task: its inputs decoded from XCom's JSON to the types the step declares,
    its typed result returned as JSON."""
    step = globals()[stages.BY_NAME[name].step]
    hints = typing.get_type_hints(step)
    declared = [p for p in inspect.signature(step).parameters if p not in ("ctx", "record")]
    with airflow_outcomes():
        ctx = context_from_airflow(context)
        return manifest.to_json(step(ctx, *(manifest.decode(hints[param], value)
                                              for param, value in zip(declared, inputs))))


def plan_scoring_task(context: dict[str, Any], gated: dict[str, Any]) -> list[int]:
    """The user shards to map `score_users` over; skipped when there is nothing to publish."""
    with airflow_outcomes():
        return scoring_shards(context_from_airflow(context), manifest.from_json(Gated, gated))
