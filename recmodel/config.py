"""Configuration: where things live (environment) and how a run behaves (PipelineConfig).

Environment variables are read once per call of `settings()`; the pipeline configuration is a
frozen dataclass so a run's behaviour is one value that can be logged, hashed and overridden
from the DAG's `conf` (`retrain --conf '{"epochs": 2}'`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any

from recmodel.errors import PermanentError


class ConfigError(PermanentError, ValueError):
    """A setting or override that cannot be used; the message names it."""


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values; NaN and infinities are never within one."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def number(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        return f"{'(' if self.low_open else '['}{number(self.low)}, {number(self.high)}{')' if self.high_open else ']'}"


LOSSES = ("auto", "softmax", "sampled")
LR_SCHEDULES = ("warmup_cosine", "constant")
GATE_METRICS = ("ndcg@10", "recall@10", "hr@10", "mrr@10")  # per-user metrics the gate can compare (gate.K = 10)
EPOCHS = Range(1, 1000)
COUNT = Range(1, 1_000_000_000)
SHARE = Range(0, 1)
# The range of every numeric setting, checked by PipelineConfig.check and listed in docs/OPERATIONS.md.
SETTING_RANGES: dict[str, Range] = {
    "value_min": Range(-1e9, 1e9), "value_max": Range(-1e9, 1e9),
    "late_data_lookback_hours": Range(0, 8760), "future_tolerance_seconds": Range(0, 86_400),
    "near_duplicate_seconds": Range(0, 86_400), "item_text_max_chars": Range(100, 100_000),
    "training_window_days": Range(0, 36_500, low_open=True),
    "max_quarantine_share": SHARE, "volume_min_ratio": SHARE, "volume_max_ratio": Range(1, 1e6),
    "volume_history_runs": Range(1, 1000), "volume_min_history": Range(1, 1000), "drift_min_rows": COUNT,
    "max_event_type_divergence": SHARE, "max_items_per_user_divergence": SHARE,
    "max_item_popularity_divergence": SHARE,
    "max_history": Range(1, 10_000), "d_model": Range(8, 4096), "n_layers": Range(1, 48), "n_heads": Range(1, 64),
    "dropout": Range(0, 1, high_open=True), "epochs": EPOCHS, "patience": EPOCHS, "batch_size": Range(1, 65_536),
    "checkpoint_window": Range(1, 20),
    "learning_rate": Range(0, 1, low_open=True), "warm_start_epochs": EPOCHS, "seed": Range(0, 2**31 - 1),
    "min_epochs": EPOCHS, "delta_max_norm": Range(0, 1e6), "train_time_budget_seconds": Range(0, 604_800, low_open=True),
    "text_finetune_steps": Range(0, 1_000_000), "text_finetune_budget_seconds": Range(0, 604_800, low_open=True),
    "text_finetune_refresh_days": Range(0, 3650),
    "sampled_loss_min_items": COUNT, "negatives": Range(1, 1_000_000),
    "holdout_days": Range(0, 3650, low_open=True), "gate_min_users": COUNT,
    "gate_max_holdout_share": Range(0, 1, low_open=True, high_open=True), "gate_min_metric": SHARE,
    "gate_champion_tolerance": SHARE, "refit_epochs": Range(0, 1000),
    "refit_learning_rate": Range(0, 1, low_open=True),
    "top_k": Range(1, 1000), "similar_k": Range(1, 1000), "popular_k": Range(1, 10_000),
    "popular_window_days": Range(0, 36_500, low_open=True), "popular_min_users": COUNT,
    "score_batch_size": Range(1, 1_000_000),
    "score_shards": Range(1, 1024), "keep_versions": Range(1, 1000), "tail_boost": Range(0, 100),
}


def _text(variable: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{variable} must not be blank")
    return raw.strip()


def _integer(variable: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{variable} must be >= {minimum}, got {raw!r}")
    return value


def _whole(variable: str, raw: str) -> int:
    return _integer(variable, raw, minimum=1)


def _days(variable: str, raw: str) -> int:
    return _integer(variable, raw, minimum=0)


def _number(variable: str, raw: str, *, positive: bool) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{variable} must be {'> 0' if positive else '>= 0'}, got {raw!r}")
    return value


def _non_negative(variable: str, raw: str) -> float:
    return _number(variable, raw, positive=False)


def _positive(variable: str, raw: str) -> float:
    return _number(variable, raw, positive=True)


def _addresses(variable: str, raw: str) -> tuple[str, ...]:
    addresses = tuple(a.strip() for a in raw.split(",") if a.strip())
    if any("@" not in a for a in addresses):
        raise ConfigError(f"{variable} must be comma-separated e-mail addresses, got {raw!r}")
    return addresses


@dataclass(frozen=True)
class EnvSetting:
    """One environment variable: the Settings field it sets, its default (as the variable would
    read) and what it means. README's table lists exactly these (a test compares them)."""

    variable: str
    field: str
    default: str
    meaning: str
    parse: Callable[[str, str], Any]


ENVIRONMENT: tuple[EnvSetting, ...] = (
    EnvSetting("RECSYS_RETRAIN_SCHEDULE", "retrain_schedule", "@daily",
               "cron/preset schedule of `recsys_retrain` (it also runs when enough fresh data arrived)", _text),
    EnvSetting("RECSYS_RETRAIN_MIN_NEW_ROWS", "retrain_min_new_rows", "10000",
               "new interactions since the last snapshot that trigger a retrain ahead of schedule", _whole),
    EnvSetting("RECSYS_FRESH_DATA_SCHEDULE", "fresh_data_schedule", "*/15 * * * *",
               "how often `recsys_fresh_data` counts them", _text),
    EnvSetting("RECSYS_TRAIN_QUEUE", "train_queue", "default",
               "Celery queue of the `train` and `refit` tasks (the GPU worker's, in docker-compose.yaml)", _text),
    EnvSetting("RECSYS_RETRY_DELAY_SECONDS", "retry_delay_seconds", "120",
               "wait before a failed `recsys_retrain` task runs again (once)",
               _non_negative),
    EnvSetting("RECSYS_LIVE_RUN_WAIT_MINUTES", "live_run_wait_minutes", "60",
               "how long a scheduled run waits for another live run on the same database before failing",
               _non_negative),
    EnvSetting("RECSYS_MAX_SERVING_AGE_HOURS", "max_serving_age_hours", "36",  # a daily schedule + half a day
               "serving tables older than this raise a `serving_stale` alert",
               _positive),
    EnvSetting("RECSYS_FRESHNESS_SCHEDULE", "freshness_schedule", "@hourly",
               "schedule of the `recsys_freshness` check", _text),
    EnvSetting("RECSYS_OUTCOMES_SCHEDULE", "outcomes_schedule", "@hourly",
               "schedule of `recsys_outcomes`, which measures what each served version's lists achieved", _text),
    EnvSetting("RECSYS_UNDERPERFORM_DAYS", "underperform_days", "3",
               "an `underperforming` alert fires when the serving version's realized hit rate@10 was below its "
               "popularity list's on each of this many last days with outcomes; 0: never", _days),
    EnvSetting("RECSYS_ALERT_EMAIL", "alert_emails", "",
               "comma-separated addresses for alert e-mails (always: log line + `recsys.pipeline_runs`); "
               "empty: no e-mail", _addresses),
    EnvSetting("RECSYS_SMTP_CONN_ID", "smtp_conn_id", "smtp_default", "Airflow SMTP connection for those e-mails",
               _text),
    EnvSetting("RECSYS_ALERT_FROM", "alert_from", "recsys-retrain@localhost", "sender of those e-mails", _text),
)
ENV_VARIABLE = {setting.field: setting.variable for setting in ENVIRONMENT}


def _default(field: str) -> Any:
    """A Settings field's default: its variable's default, parsed (one definition per setting)."""
    setting = next(s for s in ENVIRONMENT if s.field == field)
    return setting.parse(setting.variable, setting.default)


@dataclass(frozen=True)
class Settings:
    """Everything read from the environment, parsed and checked once by `settings()`."""

    home: Path
    database_url: str | None  # None: start the embedded Postgres under home/pg
    retrain_schedule: str = _default("retrain_schedule")
    retrain_min_new_rows: int = _default("retrain_min_new_rows")
    fresh_data_schedule: str = _default("fresh_data_schedule")
    train_queue: str = _default("train_queue")
    retry_delay_seconds: float = _default("retry_delay_seconds")
    live_run_wait_minutes: float = _default("live_run_wait_minutes")
    max_serving_age_hours: float = _default("max_serving_age_hours")
    freshness_schedule: str = _default("freshness_schedule")
    outcomes_schedule: str = _default("outcomes_schedule")
    underperform_days: int = _default("underperform_days")
    alert_emails: tuple[str, ...] = _default("alert_emails")
    smtp_conn_id: str = _default("smtp_conn_id")
    alert_from: str = _default("alert_from")

    @property
    def airflow_home(self) -> Path:
        return Path(os.environ.get("AIRFLOW_HOME") or self.home / "airflow")


def settings() -> Settings:
    """The environment as one checked value; a bad variable raises ConfigError naming it.

    Read on every call (cheap), so a test or a long-lived process sees the environment as it is now.
    """
    home = Path(os.environ.get("RECSYS_HOME") or ".recsys").resolve()
    values = {setting.field: setting.parse(setting.variable, os.environ.get(setting.variable, setting.default))
              for setting in ENVIRONMENT}
    return Settings(home=home, database_url=os.environ.get("RECSYS_DATABASE_URL") or None, **values)


@dataclass(frozen=True)
class PipelineConfig:
    # --- data ---------------------------------------------------------------------------
    event_types: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "rating")
    value_min: float = 0.0
    value_max: float = 5.0
    late_data_lookback_hours: float = 48.0  # re-read rows ingested this long before the watermark
    future_tolerance_seconds: float = 300.0  # clock skew allowed on occurred_at
    # Old timestamps are history, not errors: no floor unless one is set (an ISO time with a zone,
    # e.g. "2000-01-01T00:00:00+00:00", for a source whose broken clocks write 1970).
    min_occurred_at: str | None = None
    near_duplicate_seconds: float = 2.0  # same user, item and type again within this: a double click; 0 = off
    # Item text kept per field (title, description, each tag) in the catalog snapshot: MiniLM reads the first
    # 256 tokens (about 1,000 characters) of an item's text, and one unbounded title outgrew the bulk reader.
    item_text_max_chars: int = 2_000
    training_window_days: float | None = None  # None: all history
    max_quarantine_share: float = 0.2  # dataset-level: more than this quarantined fails the run
    volume_min_ratio: float = 0.1  # increment rows vs the median of the last runs' increments
    volume_max_ratio: float = 10.0
    volume_history_runs: int = 7  # how many earlier increments the median is taken over
    volume_min_history: int = 3  # fewer earlier runs than this: no volume check yet
    drift_min_rows: int = 500  # smaller clean increments are too noisy for the divergence checks
    max_event_type_divergence: float = 0.1  # Jensen-Shannon (base 2) vs the previous snapshot's recent rows
    max_items_per_user_divergence: float = 0.6  # `seed` appends (2-3 events per user) score 0.42
    max_item_popularity_divergence: float = 0.5  # a feed stuck on one item scores ~0.9 (docs/OPERATIONS.md)
    # --- model and training ---------------------------------------------------------------
    max_history: int = 200  # items the transformer reads; all of a user's history is masked at scoring
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    # Each epoch cuts histories longer than max_history into windows at a new random shift, so an item is predicted
    # from a different stretch of its past each time (False: the same cuts every epoch). docs/MODEL.md, "Shifted windows".
    shift_windows: bool = True
    # At most; early stopping on each user's last training item picks the epochs kept. 30, with shifted windows, fits
    # ml-latest-small's default retrain in 10 minutes on 2 CPU cores (docs/MODEL.md, "Shifted windows").
    epochs: int = 30
    # Epochs without a better validation NDCG before stopping: on ml-latest-small, 3 stopped at
    # epoch 17 (test NDCG@10 0.054) and 6 at epoch 28, keeping epoch 22 (0.059); 8 kept the same.
    patience: int = 6
    # Early stopping follows the mean validation NDCG@10 of this many epochs, and the kept model averages their
    # weights (1: the single best epoch). docs/MODEL.md, "Training that ends on signal".
    checkpoint_window: int = 3
    min_epochs: int = 1  # early stopping never ends training before this epoch
    batch_size: int = 64
    learning_rate: float = 2e-3  # the peak, with lr_schedule "warmup_cosine"
    # "warmup_cosine": linear warm-up over 5% of the planned steps, cosine decay to 10% of the peak at
    # the last planned step (shortened to end with the time budget); "constant": learning_rate throughout.
    lr_schedule: str = "warmup_cosine"
    warm_start_epochs: int = 10
    # Training stops once this many seconds (validation included) are spent, mid-epoch if need be, after
    # one last validation; the learning-rate schedule is shortened to end with it.
    train_time_budget_seconds: float = 900.0
    # "softmax" (exact, every item a negative), "sampled" (shared negatives with logQ correction) or
    # "auto": exact below sampled_loss_min_items catalog items, sampled from there on.
    loss: str = "auto"
    sampled_loss_min_items: int = 20_000
    negatives: int = 1024  # sampled items per batch, shared by every position in it
    item_text: bool = True  # item vectors include the text embedding (False: ids only, an ablation)
    # The largest norm of an item's id embedding, its learned delta from its text (0 = unbounded; docs/MODEL.md,
    # "New items").
    delta_max_norm: float = 0.0
    # Contrastive fine-tuning of the text encoder on consecutive items before training (recmodel.textfinetune),
    # 0 = the frozen MiniLM. Opt-in: docs/MODEL.md ("New items") has what it bought and cost. The tuned
    # encoder is reused by later runs until it is `text_finetune_refresh_days` old (0: tuned every run).
    text_finetune_steps: int = 0
    text_finetune_budget_seconds: float = 900.0
    text_finetune_refresh_days: float = 7.0
    seed: int = 13
    # --- gate -------------------------------------------------------------------------------
    holdout_days: float = 7.0  # the gate's first time window; it grows back until gate_min_users are held out
    gate_min_users: int = 100  # users with new items in the holdout needed to decide
    gate_max_holdout_share: float = 0.2  # the time window never holds out more of the interactions than this
    gate_metric: str = "ndcg@10"
    gate_min_metric: float = 0.005  # absolute floor
    gate_champion_tolerance: float = 0.05  # may be at most 5% (relative) below the champion
    # False: the gate still judges and records its decision, but the candidate is published whatever it
    # decided (`bench`, which times the model's own path; a first model an operator vouches for).
    gate_enforced: bool = True
    # After acceptance: epochs on the whole snapshot from the gated weights (0 = no refit), at a constant learning
    # rate near the end of the gated run's decay. docs/MODEL.md, "Refit", has the measurements that chose both.
    refit_epochs: int = 4
    refit_learning_rate: float = 5e-4
    # --- scoring and publishing -------------------------------------------------------------
    top_k: int = 20
    # Opt-in re-ranking towards the long tail (recmodel.longtail): 0 serves the model's own order; the
    # accuracy/coverage trade-off of each value on ml-latest-small is in docs/MODEL.md.
    tail_boost: float = 0.0
    similar_k: int = 10
    popular_k: int = 100
    popular_window_days: float = 14.0
    # ... or as much longer as it takes for this many users to be in it: the fallback list of every new
    # user should be many users' taste (ml-latest-small's last 14 days hold 12 users).
    popular_min_users: int = 100
    score_batch_size: int = 1024
    score_shards: int = 1  # user shards scored as separate (mapped) Airflow tasks, on any worker
    keep_versions: int = 3

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> PipelineConfig:
        """Build a config from defaults plus `overrides`, rejecting unknown keys and bad types."""
        overrides = dict(overrides or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ConfigError(f"unknown pipeline setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        defaults = cls()
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            default = getattr(defaults, name)
            values[name] = _coerce(name, value, default)
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Every setting within its documented range (SETTING_RANGES), before any work starts."""
        for name, allowed in SETTING_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool):  # an int to Python, so a range would take true for 1
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if value is not None and not allowed.contains(value):
                raise ConfigError(f"{name} must be within {allowed}, got {value!r}")
        if not self.event_types or not all(t.strip() for t in self.event_types):
            raise ConfigError("event_types must name at least one non-empty event type")
        repeated = sorted({t for t in self.event_types if self.event_types.count(t) > 1})
        if repeated:
            raise ConfigError(f"event_types lists {', '.join(map(repr, repeated))} more than once")
        if self.min_epochs > self.epochs:
            raise ConfigError(f"min_epochs ({self.min_epochs}) must not exceed epochs ({self.epochs})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.value_min > self.value_max:
            raise ConfigError(f"value_min ({self.value_min}) must not exceed value_max ({self.value_max})")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.gate_metric not in GATE_METRICS:
            raise ConfigError(f"gate_metric must be one of {', '.join(GATE_METRICS)}, got {self.gate_metric!r}")
        self.occurred_at_floor()

    def occurred_at_floor(self) -> datetime | None:
        """`min_occurred_at` as a time, or None when no floor is set."""
        if self.min_occurred_at is None:
            return None
        try:
            floor = datetime.fromisoformat(self.min_occurred_at)
        except ValueError:
            raise ConfigError(f"min_occurred_at must be an ISO timestamp, got {self.min_occurred_at!r}") from None
        if floor.tzinfo is None:
            raise ConfigError(f"min_occurred_at must carry a timezone, got {self.min_occurred_at!r}")
        return floor

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# Settings whose default is None: the type a given value must have.
OPTIONAL_TYPES: dict[str, type] = {"training_window_days": float, "min_occurred_at": str}


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name in OPTIONAL_TYPES and value is None:
        return None
    default = OPTIONAL_TYPES[name]() if name in OPTIONAL_TYPES else default
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, tuple):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if isinstance(default, int):
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):  # float(True) is 1.0: a JSON true is no number
                raise TypeError
            return float(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name!r} expects {type(default).__name__}, got {value!r}") from None
    return value
