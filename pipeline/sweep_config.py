"""The ``amad sweep`` config: a distillation job, a search space over its fields, and how to search it.

Validated with pydantic like every job config (unknown keys are errors). What needs the teacher's
files -- whether a student spec the space can produce is buildable -- is checked by
:func:`pipeline.sweep.check_sweep`, still before Ray starts.

Search-space entries, one per searchable field of the distill job (dotted path, e.g.
``student.heads``), each exactly one of::

    {choice: [v1, v2, ...]}      # sampled uniformly
    {grid: [v1, v2, ...]}        # every value (crossed with the other grid entries)
    {uniform: [low, high]}       # float in [low, high]
    {loguniform: [low, high]}    # float, log-uniform, 0 < low
    {randint: [low, high]}       # integer in [low, high], both ends included

and, under a key that *names* the cases rather than a field (e.g. ``arm``)::

    {cases: {label: {field: value, ...}, ...}}   # every case, like a grid of labels

A case sets several fields together: the listed combinations and no others, which crossing grid
entries cannot express (e.g. "one-to-one at weights 1 and 4, AMAD at weight 1 with tau 1 and 0.3":
each method gets its own candidates). The trial's sampled value is the label (it is what the trials
table, MLflow and ``fail_when`` see); its job gets the case's fields. A field set by a case may not
also be a key of the space or be set by another cases entry.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from pipeline.config import DistillJobConfig, StorageConfig, Strict

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "cases")
CASE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # part of MLflow param names (space.<key>.cases.<label>.<field>)
MLFLOW_PARAM_KEY_MAX = 250  # MLflow's limit on a param name
# The trials table's own columns (pipeline.sweep_report.CSV_COLUMNS): a cases key of that name would overwrite one.
RESERVED_CASE_KEYS = frozenset({"trial_id", "status", "epochs", "val_accuracy", "val_cider_d", "val_bleu_4", "val_relational_accuracy",
                                "val_vqa_accuracy", "val_loss", "best_epoch", "params", "latency_ms_per_example",
                                "pareto", "within_budget", "selected", "checkpoint", "run_id", "error"})
# Top-level parts of the distill job a sweep may search (scaling is per-trial resources, not a
# hyperparameter; train.epochs is the scheduler's max_epochs).
SEARCHABLE_ROOTS = ("student", "objective", "train", "data", "seed")
NOT_SEARCHABLE = {
    "train.epochs": "set scheduler.max_epochs instead",
    "student.importance_examples": "set job.student.importance_examples (the sweep scores the teacher once for every trial)",
}
MAX_CHECKED_COMBINATIONS = 512  # discrete combinations validated one by one before Ray starts


def searchable_fields(model: type[BaseModel] = DistillJobConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf setting of the distill job a sweep may search."""
    found = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if not prefix and name not in SEARCHABLE_ROOTS:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += searchable_fields(annotation, f"{path}.")
        elif path not in NOT_SEARCHABLE:
            found.append(path)
    return found


class SpaceEntry(Strict):
    """One searchable field (exactly one of the five value kinds), or a named set of ``cases``."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    cases: dict[str, dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SpaceEntry":
        given = [kind for kind in KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("choice", "grid", "cases") and not values:
            raise ValueError(f"{kind} is empty: list at least one {'case' if kind == 'cases' else 'value'}")
        if kind == "cases":
            for label in values:
                if not CASE_LABEL.match(label):
                    raise ValueError(f"case label {label!r}: use letters, digits, '.', '_' and '-' (it names trials in tables and MLflow params)")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = values
            if low > high:
                raise ValueError(f"{kind}: low={low} > high={high}")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low={low} must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) is not None)

    @property
    def values(self):
        return getattr(self, self.kind)

    def probes(self) -> list[Any]:
        """Values that stand for this entry when checking the space: every listed value, a range's
        ends and (for float ranges) its middle, which catches a float range over an integer field."""
        if self.kind in ("choice", "grid", "cases"):
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return [low, high] if low != high else [low]
        middle = (low * high) ** 0.5 if self.kind == "loguniform" else (low + high) / 2
        return sorted({low, middle, high})

    def to_tune(self):
        """The Ray Tune search-space object (imported here: validating a config never imports Ray)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind in ("grid", "cases"):
            return tune.grid_search(list(self.values))  # cases: the labels; trial_job expands them
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive; ours is included


class SearchConfig(Strict):
    algorithm: Literal["random", "optuna"] = Field(
        "random", description="random: Tune's variant generator (grid entries crossed, others sampled); optuna: TPE (needs optuna installed, no grid entries)"
    )
    num_samples: int = Field(1, ge=1, description="random: samples per grid point; optuna: trials")
    seed: int | None = Field(0, description="seeds the sampler, so the same config draws the same trials")


class SchedulerConfig(Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early; fifo: run every trial to max_epochs")
    grace_period: int = Field(1, ge=1, description="epochs a trial runs before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the top 1/reduction_factor at each rung")
    max_epochs: int | None = Field(None, ge=1, description="epochs per trial; default job.train.epochs")


class SelectionConfig(Strict):
    """Which trial wins: the best selection metric (``job.selection_metric``; by default ``val_accuracy`` for
    VQA students, ``val_cider_d`` for captioners) within the budgets; ties go to the smaller model."""

    max_params: int | None = Field(None, ge=1, description="student parameters")
    max_latency_ms: float | None = Field(None, gt=0, description="measured CPU latency per example, ms (a captioner's: greedy decoding per image)")
    latency_batch_size: int = Field(32, ge=1, description="validation examples per timed pass")
    latency_repeats: int = Field(20, ge=1, description="timed passes; the median is kept")


class SweepConfig(Strict):
    """``amad sweep``: a Ray Tune search over a distillation job's hyperparameters."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=60, description="<workdir>/sweeps/<name>/")
    job: DistillJobConfig = Field(..., description="the distillation every trial runs; job.scaling is per trial")
    space: dict[str, SpaceEntry] = Field(..., min_length=1)
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    max_concurrent_trials: int = Field(2, ge=1)
    time_budget_s: float | None = Field(None, gt=0, description="no new trials after this; running ones are stopped")
    selection: SelectionConfig = SelectionConfig()
    storage: StorageConfig = Field(
        StorageConfig(), description="Tune's experiment and the trials' checkpoints go to <storage.path>/sweeps/<name>/ (default: the --workdir)"
    )
    fail_when: dict[str, Any] | None = Field(
        None, description="TEST-ONLY fault injection: a trial whose sampled values include all of these crashes at its first step"
    )

    # May change when an interrupted sweep is resumed: they do not change what a trial learns.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({"selection", "max_concurrent_trials", "time_budget_s"})

    @field_validator("space")
    @classmethod
    def _known_fields(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        allowed = searchable_fields()

        def check_field(key: str, where: str) -> None:
            if key in NOT_SEARCHABLE:
                raise ValueError(f"{where}{key} cannot be searched: {NOT_SEARCHABLE[key]}")
            if key not in allowed:
                raise ValueError(f"{where}{key} is not a searchable field of the distill job (searchable: {', '.join(allowed)})")

        set_by_cases: dict[str, str] = {}
        for key, entry in space.items():
            if entry.kind != "cases":
                check_field(key, "")
                continue
            if key in allowed or "." in key:
                raise ValueError(f"{key}: a cases entry's key names the cases (e.g. arm), not a field; its cases set the fields")
            if key in RESERVED_CASE_KEYS or not CASE_LABEL.match(key):
                raise ValueError(f"{key}: name the cases with letters, digits, '.', '_' and '-', and not as a column of the trials table "
                                 f"({', '.join(sorted(RESERVED_CASE_KEYS))})")
            for label, fields in entry.cases.items():
                for field in fields:
                    check_field(field, f"{key}.cases.{label}: ")
                    name = f"space.{key}.cases.{label}.{field}"
                    if len(name) > MLFLOW_PARAM_KEY_MAX:
                        raise ValueError(f"{key}.cases.{label}: the MLflow param {name[:60]}... is {len(name)} characters, over MLflow's "
                                         f"{MLFLOW_PARAM_KEY_MAX}: shorten the label")
                    if field in space:
                        raise ValueError(f"{key}.cases.{label} sets {field}, which is also a key of space: set it in one place")
                    if set_by_cases.setdefault(field, key) != key:
                        raise ValueError(f"{field} is set by the cases of both {set_by_cases[field]} and {key}: merge them into one cases entry")
        return space

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.max_epochs:
            raise ValueError(f"scheduler.grace_period={self.scheduler.grace_period} > max_epochs={self.max_epochs}")
        if self.search.algorithm == "optuna":
            grids = [key for key, entry in self.space.items() if entry.kind in ("grid", "cases")]
            if grids:
                raise ValueError(f"search.algorithm=optuna takes no grid or cases entries (space.{grids[0]}): use choice, or search: random")
        if self.job.storage.path is not None:
            raise ValueError(
                f"job.storage.path={self.job.storage.path!r}: a sweep's storage is set once for all its trials: "
                "move it to the top level (storage: {path: ...})"
            )
        for key in self.fail_when or {}:
            if key not in self.space:
                raise ValueError(f"fail_when.{key}: not a key of space")
        return self

    @property
    def max_epochs(self) -> int:
        return self.scheduler.max_epochs or self.job.train.epochs

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of the entries' probe values (at most MAX_CHECKED_COMBINATIONS), for checking."""
        keys = list(self.space)
        product = itertools.product(*(self.space[key].probes() for key in keys))
        return [dict(zip(keys, values)) for values in itertools.islice(product, MAX_CHECKED_COMBINATIONS)]

    def field_changes(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """The dotted-field changes of one trial: its sampled values, each case label replaced by its case's fields."""
        changes: dict[str, Any] = {}
        for key, value in sampled.items():
            entry = self.space.get(key)
            if entry is not None and entry.kind == "cases":
                if value not in entry.cases:
                    raise ValueError(f"space.{key}: no case named {value!r} (cases: {', '.join(entry.cases)})")
                changes.update(entry.cases[value])
            else:
                changes[key] = value
        return changes

    def possible_values(self, field: str) -> list[Any]:
        """The values the space lists for ``field`` (its choice or grid, or the cases that set it); not the job's own."""
        found = []
        for key, entry in self.space.items():
            if key == field and entry.kind in ("choice", "grid"):
                found += list(entry.values)
            elif entry.kind == "cases":
                found += [fields[field] for fields in entry.cases.values() if field in fields]
        return found

    def trial_job(self, sampled: dict[str, Any]) -> dict:
        """The distill job values of one trial (plain dict, not yet validated)."""
        from pipeline.config import with_overrides

        values = self.job.model_dump(mode="json")
        values["train"]["epochs"] = self.max_epochs
        return with_overrides(values, self.field_changes(sampled))
