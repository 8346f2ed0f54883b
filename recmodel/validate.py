"""Data validation of an event increment with Great Expectations (1.x).

Every rule is a GX expectation; pandas only derives helper columns GX cannot express (`duplicate_of`) and
splits the increment by the failing `event_id`s GX reports. Three checkpoints run per increment:

* ``increment_schema`` on the raw increment: the columns are exactly the expected ones. Row-level checks need
  those columns, so a missing column skips them and the run fails on the schema alone.
* ``increment_rows`` on the increment indexed by `event_id`: one expectation per quarantine reason. Indexing by
  `event_id` lets GX return failing ids as one plain list (`unexpected_index_list`) instead of looking each
  failing row up cell by cell, which is what keeps a 1M-row increment fast.
* ``increment_dataset`` on a one-row metrics frame: quarantine share and clean row count, so dataset-level
  failures also show up in Data Docs.

The GX project lives under `gx_dir` (file context), so results and Data Docs persist across runs. Suites,
assets and checkpoints have fixed names and are replaced on every run, which makes a re-run of the same
`run_key` safe; two runs sharing one `gx_dir` concurrently are not (the project file is rewritten).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.checkpoint import Checkpoint
from great_expectations.core.expectation_validation_result import (
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context import FileDataContext
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.data_context.types.resource_identifiers import ValidationResultIdentifier
from great_expectations.expectations import Expectation

from recmodel.config import PipelineConfig
from recmodel.data import INTERACTION_COLUMNS, RAW_OCCURRED_AT
from recmodel.errors import PermanentError

REASONS = ("null_user_id", "null_item_id", "non_positive_id", "unknown_item", "bad_event_type",
           "non_finite_value", "value_out_of_range", "null_occurred_at", "timestamp_out_of_range", "future_timestamp",
           "timestamp_before_floor", "duplicate", "near_duplicate")

DUPLICATE_KEY = ["user_id", "item_id", "event_type", "occurred_at"]
NEAR_DUPLICATE_KEY = ["user_id", "item_id", "event_type"]
POPULARITY_HEAD = 100  # items compared one by one in the popularity drift check; the rest are one bucket

# Per quarantine reason: the rule a row broke, and the settings that govern it (none: fix the source rows).
REASON_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "null_user_id": ("user_id is NULL", ()),
    "null_item_id": ("item_id is NULL", ()),
    "non_positive_id": ("user_id or item_id is 0 or negative", ()),
    "unknown_item": (("item_id is not in the items table (add the items, then `quarantine replay --reason "
                     "unknown_item`)"), ()),
    "bad_event_type": ("event_type is NULL or not one of event_types", ("event_types",)),
    "non_finite_value": ("value is NaN, Infinity or -Infinity (NULL means no value and is allowed)", ()),
    "value_out_of_range": ("value is outside [value_min, value_max]", ("value_min", "value_max")),
    "null_occurred_at": ("occurred_at is NULL", ()),
    "timestamp_out_of_range": (("occurred_at is infinity, -infinity, a BC date or after 9999-12-31 (its text is in "
                                f"{RAW_OCCURRED_AT})"), ()),
    "future_timestamp": ("occurred_at is later than the run's as-of time plus future_tolerance_seconds",
                         ("future_tolerance_seconds",)),
    "timestamp_before_floor": ("occurred_at is before min_occurred_at", ("min_occurred_at",)),
    "duplicate": ("same user, item, event type and occurred_at as an earlier row (the earliest is kept)", ()),
    "near_duplicate": ("same user, item and event type again within near_duplicate_seconds (a double click)",
                       ("near_duplicate_seconds",)),
}
# The settings behind each dataset-level metric, for the message of a failed check.
METRIC_SETTINGS: dict[str, tuple[str, ...]] = {
    "quarantine_share": ("max_quarantine_share",),
    "volume_ratio": ("volume_min_ratio", "volume_max_ratio"),
    "event_type_divergence": ("max_event_type_divergence",),
    "items_per_user_divergence": ("max_items_per_user_divergence",),
    "item_popularity_divergence": ("max_item_popularity_divergence",),
}

DATASOURCE = "recsys_increment"
SCHEMA, ROWS, DATASET = "increment_schema", "increment_rows", "increment_dataset"

# Failing rows come back as {"event_id": [ids]}: no per-row value lists and no pandas query string, both of
# which GX would otherwise build (and store) row by row.
ROW_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["event_id"],
    "exclude_unexpected_values": True,
    "return_unexpected_index_query": False,
}
DATASET_RESULT_FORMAT: dict[str, Any] = {"result_format": "COMPLETE"}


@dataclass(frozen=True)
class Reference:
    """What an increment is compared with at dataset level (empty for the first run)."""

    previous_volumes: tuple[int, ...] = ()  # increment rows of earlier validated runs, newest first
    previous_snapshot: pd.DataFrame | None = None  # the dataset the increment extends


class DataValidationError(PermanentError, RuntimeError):
    """The increment failed a dataset-level expectation; raised by the caller with `report.dataset_failures`."""


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    reason: str | None  # quarantine reason for row-level expectations, None for dataset-level ones
    success: bool
    unexpected_count: int
    observed: str


@dataclass(frozen=True)
class ReasonSummary:
    """One quarantine reason of a run, as an operator needs it: how many rows, which rule, one example, and
    the setting that governs it with its current value."""

    reason: str
    rows: int
    rule: str
    settings: dict[str, Any]  # setting name -> value in this run; empty: the source rows must be fixed
    example: dict[str, Any]  # the first quarantined row (lowest event_id), as read from the source

    def line(self) -> str:
        # The row in the table's column order: a summary read back from jsonb has its keys reordered.
        ordered = sorted(self.example.items(), key=lambda kv: INTERACTION_COLUMNS.index(kv[0])
                         if kv[0] in INTERACTION_COLUMNS else len(INTERACTION_COLUMNS))
        example = ", ".join(f"{key}={value}" for key, value in ordered)
        if self.settings:
            current = ", ".join(f"{name}={value!r}" for name, value in self.settings.items())
            governs = f"setting: {current} (override with retrain --conf)"
        else:
            governs = "no setting: fix the source rows"
        return f"{self.reason}: {self.rows:,} rows, {self.rule}; e.g. {example}; {governs}"


def reason_summaries(quarantined: pd.DataFrame, config: PipelineConfig) -> list[ReasonSummary]:
    """Per reason present in `quarantined` (in REASONS order): count, rule, governing settings, one example."""
    out = []
    for reason in REASONS:
        rows = quarantined[quarantined["reason"] == reason]
        if rows.empty:
            continue
        rule, names = REASON_RULES[reason]
        first = rows.sort_values("event_id", kind="stable").iloc[0].drop(labels=["reason"])
        example = {key: _plain(value) for key, value in first.items()}
        if RAW_OCCURRED_AT in first and pd.isna(first[RAW_OCCURRED_AT]):  # only an unreadable occurred_at has one
            del example[RAW_OCCURRED_AT]
        out.append(ReasonSummary(reason=reason, rows=int(rows["event_id"].nunique()), rule=rule,
                                 settings={name: _setting_value(config, name) for name in names}, example=example))
    return out


def _plain(value: Any) -> Any:
    """A cell as a JSON-safe value: None for NULL, text for times and for NaN and infinities (JSON has
    neither, and Postgres refuses the `NaN`/`Infinity` tokens Python would write)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, (int, float, str, bool)):
        return value
    return str(value)


def quarantine_json(row: dict[str, Any]) -> str:
    """One quarantined row as the `row_data` JSON; any cell is written, whatever it holds."""
    return json.dumps({key: _plain(value) for key, value in row.items()}, allow_nan=False)


def quarantine_rows(quarantined: pd.DataFrame) -> Iterator[tuple[int, str, str]]:
    """(event_id, reason, row as JSON) per quarantine entry: what `extract.write_quarantine` stores."""
    records = quarantined.drop(columns=["reason"]).astype(object).to_dict(orient="records")
    for event_id, reason, record in zip(quarantined["event_id"], quarantined["reason"], records):
        yield int(event_id), reason, quarantine_json(record)


def _setting_value(config: PipelineConfig, name: str) -> Any:
    value = getattr(config, name)
    return list(value) if isinstance(value, tuple) else value


@dataclass
class ValidationReport:
    clean: pd.DataFrame
    quarantined: pd.DataFrame  # one row per (event_id, reason): event_id, reason, then the other input columns
    outcomes: list[ExpectationOutcome]
    dataset_failures: list[str]
    docs_path: Path | None

    @property
    def passed(self) -> bool:
        return not self.dataset_failures


def validate_increment(increment: pd.DataFrame, catalog_item_ids: np.ndarray, *, as_of: datetime,
                       config: PipelineConfig, gx_dir: Path, run_key: str,
                       reference: Reference = Reference()) -> ValidationReport:
    """Validate one increment: quarantine bad rows, evaluate dataset-level rules, build Data Docs.

    Never raises for bad data: the caller decides what a failed report means (see `DataValidationError`).
    """
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware (occurred_at is UTC)")
    context = _context(gx_dir)
    run_id = RunIdentifier(run_name=run_key, run_time=datetime.now(UTC))
    result_ids: list[ValidationResultIdentifier] = []

    schema_result = _run(context, SCHEMA, [gx.expectations.ExpectTableColumnsToMatchSet(
        column_set=list(INTERACTION_COLUMNS), exact_match=True)], increment.drop(columns=[RAW_OCCURRED_AT],
                                                                                 errors="ignore"),
        DATASET_RESULT_FORMAT, run_id, result_ids)
    outcomes = [_dataset_outcome(r) for r in schema_result.results]
    dataset_failures = [_failure_message(r) for r in schema_result.results if not r.success]

    bad_ids: dict[str, set[int]] = {reason: set() for reason in REASONS}
    if set(INTERACTION_COLUMNS) <= set(increment.columns):
        rows_result = _run(context, ROWS, _row_expectations(catalog_item_ids, as_of, config),
                           _row_frame(increment, config.near_duplicate_seconds, as_of), ROW_RESULT_FORMAT, run_id, result_ids)
        for result in sorted(rows_result.results, key=lambda r: REASONS.index(r.expectation_config.meta["reason"])):
            reason = result.expectation_config.meta["reason"]
            outcomes.append(_row_outcome(result, reason))
            if _raised(result):
                dataset_failures.append(_failure_message(result))
            bad_ids[reason].update(_unexpected_event_ids(result))
        quarantined = _quarantined(increment, bad_ids)
        clean = _plain_dtypes(increment[~increment["event_id"].isin(quarantined["event_id"])]
                              .drop(columns=[RAW_OCCURRED_AT], errors="ignore"))
    else:
        quarantined = pd.DataFrame(columns=["event_id", "reason", *(c for c in increment.columns if c != "event_id")])
        clean = increment.iloc[:0]

    metrics = {"quarantine_share": quarantined["event_id"].nunique() / max(len(increment), 1),
               "clean_rows": len(clean)}
    expectations = [
        gx.expectations.ExpectColumnMaxToBeBetween(column="quarantine_share", max_value=config.max_quarantine_share),
        gx.expectations.ExpectColumnMinToBeBetween(column="clean_rows", min_value=1),
    ]
    volumes = reference.previous_volumes[:config.volume_history_runs]
    if len(volumes) >= config.volume_min_history:
        metrics["volume_ratio"] = len(increment) / max(float(np.median(volumes)), 1.0)
        expectations.append(gx.expectations.ExpectColumnMaxToBeBetween(
            column="volume_ratio", min_value=config.volume_min_ratio, max_value=config.volume_max_ratio))
    if reference.previous_snapshot is not None and len(clean) >= config.drift_min_rows:
        drift = drift_metrics(clean, reference.previous_snapshot)
        metrics.update(drift)
        expectations += [gx.expectations.ExpectColumnMaxToBeBetween(column=name, max_value=getattr(config, f"max_{name}"))
                         for name in drift]
    dataset_result = _run(context, DATASET, expectations, pd.DataFrame({k: [v] for k, v in metrics.items()}),
                          DATASET_RESULT_FORMAT, run_id, result_ids)
    outcomes += [_dataset_outcome(r) for r in dataset_result.results]
    dataset_failures += [_failure_message(r) + _settings_hint(r, config)
                         for r in dataset_result.results if not r.success]

    return ValidationReport(clean=clean, quarantined=quarantined, outcomes=outcomes,
                            dataset_failures=dataset_failures, docs_path=_build_docs(context, result_ids))


def drift_metrics(clean: pd.DataFrame, snapshot: pd.DataFrame) -> dict[str, float]:
    """Jensen-Shannon divergences (base 2: 0 same, 1 disjoint) between the clean increment and the
    previous snapshot's most recent events, as many as the increment has: matching the sample size
    keeps sampling noise alike on both sides, whatever the schedule or the traffic per day.

    Three distributions: event types; events per user, in powers-of-two buckets; and events per
    item over the recent events' POPULARITY_HEAD most popular items plus one "other" bucket. Over
    all items, a daily increment of a large catalog is too sparse: sampling noise alone gave 0.39
    at 1M events / 50k items, against 0.003 with the head (and 0.94 for a feed stuck on one item).
    """
    recent = snapshot.nlargest(len(clean), "occurred_at")

    def per_user_buckets(frame: pd.DataFrame) -> pd.Series:
        return np.floor(np.log2(frame.groupby("user_id").size())).value_counts()

    head = recent["item_id"].value_counts().index[:POPULARITY_HEAD]

    def item_shares(frame: pd.DataFrame) -> pd.Series:
        return frame["item_id"].where(frame["item_id"].isin(head), -1).value_counts()

    return {
        "event_type_divergence": jensen_shannon(clean["event_type"].value_counts(), recent["event_type"].value_counts()),
        "items_per_user_divergence": jensen_shannon(per_user_buckets(clean), per_user_buckets(recent)),
        "item_popularity_divergence": jensen_shannon(item_shares(clean), item_shares(recent)),
    }


def jensen_shannon(counts_p: pd.Series, counts_q: pd.Series) -> float:
    """Base-2 Jensen-Shannon divergence of two count vectors indexed by category."""
    p, q = counts_p.align(counts_q, fill_value=0)
    p = p.to_numpy(np.float64) / max(p.sum(), 1)
    q = q.to_numpy(np.float64) / max(q.sum(), 1)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return (kl(p) + kl(q)) / 2


def _context(gx_dir: Path) -> FileDataContext:
    """A file-backed GX project under `gx_dir`, without analytics or progress bars (task logs stay readable)."""
    context = gx.get_context(mode="file", project_root_dir=gx_dir)
    context.variables.analytics_enabled = False
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.variables.save()
    return context


def _row_expectations(catalog_item_ids: np.ndarray, as_of: datetime, config: PipelineConfig) -> list[Expectation]:
    """Row-level expectations, each carrying in `meta["reason"]` the quarantine reason of its failing rows.

    The reason travels in `meta` because GX does not return results in suite order. GX map expectations skip
    nulls, so nulls only fail the explicit not-null rules; `event_type` has one under the same reason as its
    value-set rule, because a missing event type is as unusable as a wrong one.
    """
    E = gx.expectations
    newest_allowed = (pd.Timestamp(as_of) + pd.Timedelta(seconds=config.future_tolerance_seconds)).to_pydatetime()
    expectations = [
        E.ExpectColumnValuesToNotBeNull(column="user_id", meta={"reason": "null_user_id"}),
        E.ExpectColumnValuesToNotBeNull(column="item_id", meta={"reason": "null_item_id"}),
        E.ExpectColumnValuesToBeBetween(column="user_id", min_value=1, meta={"reason": "non_positive_id"}),
        E.ExpectColumnValuesToBeBetween(column="item_id", min_value=1, meta={"reason": "non_positive_id"}),
        E.ExpectColumnValuesToBeInSet(column="item_id", value_set=np.unique(catalog_item_ids).tolist(),
                                      meta={"reason": "unknown_item"}),
        E.ExpectColumnValuesToNotBeNull(column="event_type", meta={"reason": "bad_event_type"}),
        E.ExpectColumnValuesToBeInSet(column="event_type", value_set=list(config.event_types),
                                      meta={"reason": "bad_event_type"}),
        E.ExpectColumnValuesToBeNull(column="non_finite_value", meta={"reason": "non_finite_value"}),
        E.ExpectColumnValuesToBeBetween(column="value", min_value=config.value_min, max_value=config.value_max,
                                        meta={"reason": "value_out_of_range"}),
        E.ExpectColumnValuesToNotBeNull(column="occurred_at", meta={"reason": "null_occurred_at"}),
        E.ExpectColumnValuesToBeNull(column=RAW_OCCURRED_AT, meta={"reason": "timestamp_out_of_range"}),
        E.ExpectColumnValuesToBeBetween(column="occurred_at", max_value=newest_allowed,
                                        meta={"reason": "future_timestamp"}),
        E.ExpectColumnValuesToBeNull(column="duplicate_of", meta={"reason": "duplicate"}),
        E.ExpectColumnValuesToBeNull(column="near_duplicate_of", meta={"reason": "near_duplicate"}),
    ]
    floor = config.occurred_at_floor()
    if floor is not None:  # no floor by default: old timestamps are history
        expectations.append(E.ExpectColumnValuesToBeBetween(column="occurred_at", min_value=floor,
                                                            meta={"reason": "timestamp_before_floor"}))
    return expectations


def _row_frame(increment: pd.DataFrame, near_window_seconds: float, as_of: datetime) -> pd.DataFrame:
    """The increment as GX sees it for row checks: indexed by `event_id`, plus the helper columns.

    `non_finite_value` is 1 where value is NaN or ±Infinity: pandas (and so GX) would take a NaN for a
    NULL, which is allowed, so NaN is told apart here, where the increment still keeps them apart
    (`extract.read_increment`). The value column GX range-checks then holds finite values or NaN.

    A row whose occurred_at no snapshot can hold has it NULL and its text in RAW_OCCURRED_AT; its
    occurred_at reads as `as_of` here, so it is quarantined for that alone, not also as a NULL.
    """
    raw = (increment[RAW_OCCURRED_AT] if RAW_OCCURRED_AT in increment.columns
           else pd.Series(None, index=increment.index, dtype=object))
    occurred_at = increment["occurred_at"].where(raw.isna(), pd.Timestamp(as_of))
    values = increment["value"].to_numpy(dtype=np.float64, na_value=np.nan)
    non_finite = ~np.isfinite(values) & increment["value"].notna().to_numpy()  # a NULL is no value, not a NaN
    return increment.assign(
        value=np.where(non_finite, np.nan, values), occurred_at=occurred_at, **{RAW_OCCURRED_AT: raw},
        non_finite_value=pd.arrays.IntegerArray(np.ones(len(values), dtype=np.int64), mask=~non_finite),
        duplicate_of=_duplicate_of(increment),
        near_duplicate_of=_near_duplicate_of(increment, near_window_seconds)).set_index("event_id")


def _plain_dtypes(clean: pd.DataFrame) -> pd.DataFrame:
    """Clean rows with numpy dtypes: int64 ids (no NULL is left) and float64 values (NULL as NaN)."""
    return clean.astype({"event_id": np.int64, "user_id": np.int64, "item_id": np.int64}).assign(
        value=clean["value"].to_numpy(dtype=np.float64, na_value=np.nan))


def _duplicate_of(increment: pd.DataFrame) -> pd.Series:
    """For each row repeating an earlier one by DUPLICATE_KEY, the lowest `event_id` of its group; else <NA>.

    GX's compound-uniqueness expectation flags every member of a duplicate group, but the lowest
    `event_id` must survive, so the "earlier row" is resolved here and GX checks the column is null.
    """
    ordered = increment.sort_values("event_id", kind="stable")
    first = ordered.groupby(DUPLICATE_KEY, dropna=False, sort=False)["event_id"].transform("first")
    return first.where(first != ordered["event_id"]).astype("Int64").reindex(increment.index)


def _near_duplicate_of(increment: pd.DataFrame, window_seconds: float) -> pd.Series:
    """For each row following the previous row of its (user, item, event type) by more than 0 and at most
    `window_seconds` (a double click, a retried request), that previous row's `event_id`; else <NA>.

    Rows at the very same time are exact duplicates, handled by `duplicate_of`. Within the increment only.
    """
    if window_seconds <= 0 or increment.empty:
        return pd.Series(pd.NA, index=increment.index, dtype="Int64")
    ordered = increment.sort_values([*NEAR_DUPLICATE_KEY, "occurred_at", "event_id"], kind="stable")
    same_group = (ordered[NEAR_DUPLICATE_KEY] == ordered[NEAR_DUPLICATE_KEY].shift()).all(axis=1)
    gap = (ordered["occurred_at"] - ordered["occurred_at"].shift()).dt.total_seconds()
    near = same_group & (gap > 0) & (gap <= window_seconds)
    previous = ordered["event_id"].shift().astype("Int64")
    return previous.where(near).astype("Int64").reindex(increment.index)


def _run(context: FileDataContext, name: str, expectations: list[Expectation], frame: pd.DataFrame,
         result_format: dict[str, Any], run_id: RunIdentifier,
         result_ids: list[ValidationResultIdentifier]) -> ExpectationSuiteValidationResult:
    """(Re)define suite, asset and checkpoint `name`, validate `frame` with it and record the stored result's id.

    Everything is replaced rather than reused: expectations depend on the run (as_of, catalog, config).
    """
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    source = context.data_sources.add_or_update_pandas(name=f"{DATASOURCE}_{name}")
    batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name)
    definition = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch,
                                                                                      suite=suite))
    checkpoint = context.checkpoints.add_or_update(Checkpoint(name=name, validation_definitions=[definition],
                                                              result_format=result_format))
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    [(result_id, suite_result)] = result.run_results.items()
    result_ids.append(result_id)
    return suite_result


def _unexpected_event_ids(result: ExpectationValidationResult) -> list[int]:
    """The failing rows' event_ids; ROW_RESULT_FORMAT makes GX report them as [{"event_id": [...]}]."""
    return [int(i) for entry in result.result.get("unexpected_index_list") or [] for i in entry["event_id"]]


def _raised(result: ExpectationValidationResult) -> bool:
    return bool(result.exception_info and result.exception_info.get("raised_exception"))


def _quarantined(increment: pd.DataFrame, bad_ids: dict[str, set[int]]) -> pd.DataFrame:
    """One row per (event_id, reason), in event_id then REASONS order, with the row's original columns."""
    pairs = pd.DataFrame([(event_id, reason) for reason in REASONS for event_id in bad_ids[reason]],
                         columns=["event_id", "reason"]).astype({"event_id": increment["event_id"].dtype})
    pairs["reason"] = pd.Categorical(pairs["reason"], categories=REASONS, ordered=True)
    merged = pairs.merge(increment, on="event_id", how="inner").sort_values(["event_id", "reason"], kind="stable")
    merged["reason"] = merged["reason"].astype(str)
    others = [c for c in increment.columns if c != "event_id"]
    return merged[["event_id", "reason", *others]].reset_index(drop=True)


def _row_outcome(result: ExpectationValidationResult, reason: str) -> ExpectationOutcome:
    count = int(result.result.get("unexpected_count") or 0)
    total = int(result.result.get("element_count") or 0)
    observed = _exception_text(result) if _raised(result) else f"{count} of {total} rows unexpected"
    return ExpectationOutcome(expectation=result.expectation_config.type, column=_column(result), reason=reason,
                              success=bool(result.success), unexpected_count=count, observed=observed)


def _dataset_outcome(result: ExpectationValidationResult) -> ExpectationOutcome:
    return ExpectationOutcome(expectation=result.expectation_config.type, column=_column(result), reason=None,
                              success=bool(result.success),
                              unexpected_count=int(result.result.get("unexpected_count") or 0),
                              observed=_observed(result))


def _failure_message(result: ExpectationValidationResult) -> str:
    """E.g. "expect_column_values_to_be_between(quarantine_share) failed: observed 0.43 > max 0.2"."""
    column = _column(result)
    name = result.expectation_config.type + (f"({column})" if column else "")
    if _raised(result):
        return f"{name} could not be evaluated: {_exception_text(result)}"
    kwargs = result.expectation_config.kwargs
    limits = " or ".join(f"{sign} {label} {_short(kwargs[key])}"
                         for key, label, sign in (("min_value", "min", "<"), ("max_value", "max", ">"))
                         if kwargs.get(key) is not None)
    return f"{name} failed: observed {_observed(result)}" + (f" {limits}" if limits else "")


def _settings_hint(result: ExpectationValidationResult, config: PipelineConfig) -> str:
    """E.g. " (setting max_quarantine_share=0.2; override with retrain --conf)" for a dataset-level check."""
    names = METRIC_SETTINGS.get(_column(result) or "", ())
    if not names:
        return ""
    current = ", ".join(f"{name}={_setting_value(config, name)!r}" for name in names)
    return f" (setting {current}; override with retrain --conf)"


def _observed(result: ExpectationValidationResult) -> str:
    """GX's observed value, shortened; for a column-set mismatch also the missing and unexpected columns."""
    if _raised(result):
        return _exception_text(result)
    value = result.result.get("observed_value")
    mismatched = (result.result.get("details") or {}).get("mismatched") or {}
    extra = "".join(f"; {key} {sorted(columns)}" for key, columns in sorted(mismatched.items()) if columns)
    return _short(value) + extra


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _exception_text(result: ExpectationValidationResult) -> str:
    return str((result.exception_info or {}).get("exception_message") or "exception")


def _column(result: ExpectationValidationResult) -> str | None:
    return result.expectation_config.kwargs.get("column")


def _build_docs(context: FileDataContext, result_ids: list[ValidationResultIdentifier]) -> Path | None:
    """Render this run's validation pages and refresh the site index; the index path, if the site is local."""
    sites = context.build_data_docs(resource_identifiers=result_ids)
    for url in sites.values():
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return Path(url2pathname(parsed.path))
    return None
