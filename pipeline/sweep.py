"""``amad sweep``: a Ray Tune search over a distillation job, ASHA early stopping, Pareto selection.

setup (validate every combination against the teacher, before Ray) -> tune (one trial = one
``TorchTrainer`` fit of :func:`pipeline.train_distill.train_loop`) -> report (per-trial outcome,
measured size and CPU latency, Pareto front, selection, CSV + plots, ``best.json``).

Layout under ``<workdir>/sweeps/<name>/`` (the driver's files)::

    sweep_job.json        the validated config (a resumed sweep must match it)
    mlflow_run.json       the parent MLflow run (re-opened on --resume)
    trials/<trial_id>/    each trial's child mlflow_run.json (kept by the driver)
    measurements.json     params and latency per checkpoint (measured once, reused on re-selection)
    trials.csv, plots/, best.json

and under ``<storage>/sweeps/<name>/`` (``storage.path`` / ``--storage-path``, default the workdir, so
the same directory; any ``pyarrow.fs`` URI every node sees, see :mod:`pipeline.storage`)::

    tune/                 Ray Tune's experiment (Tuner.restore reads it)
    trials/<trial_id>/    each trial's Ray Train run: epoch_NNNN checkpoints, job.json,
                          trial_error.txt when it crashed

Train V2 inside Tune (Ray 2.60): the Tune trainable is a plain function that builds and fits a
``TorchTrainer`` whose ``RunConfig`` carries ``TuneReportCallback``; the workers' per-epoch
``ray.train.report`` reaches Tune through it (the callback adds ``checkpoint_path``). The trial
function itself holds no CPU (``{"cpu": 0, "memory": ...}``: an all-zero bundle is refused), so
``max_concurrent_trials`` and the Train workers' own resources (``job.scaling``) decide how many
trials run at once. Tune cannot restore a Train-in-Tune trial from a Tune checkpoint (there is
none): a trial interrupted mid-way starts its function again, and its ``TorchTrainer`` -- same
``storage_path`` and ``name`` -- resumes from the trial's latest Train checkpoint.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback  # Progress subclasses it; importers of this module use Ray anyway

from pipeline import names, storage, sweep_report
from pipeline.config import ConfigError, DistillJobConfig, parse_config
from pipeline.local_cluster import connected, started_here
from pipeline.sweep_config import SweepConfig
from pipeline.tracking import RunTracker, flatten, open_run, resolve_tracking_uri

TUNE_DIR, TRIALS_DIR, PLOTS_DIR = "tune", "trials", "plots"
TRIAL_ERROR_FILE = "trial_error.txt"  # in trials/<trial_id>/: the exception that ended the trial
TRIAL_MEMORY_BYTES = 64 * 2**20  # the trial function's own bundle (it only waits on its TorchTrainer)
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster started here moves only small objects


def _log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- setup: checks before Ray starts


def check_sweep(cfg: SweepConfig):
    """Every combination of the space's values must make a valid distill job for this teacher.

    Returns the base job's :class:`pipeline.train_distill.Teacher`. ConfigError names the space key(s)
    and value(s) that a trial would fail on (e.g. a head count the student spec rejects).
    """
    from pipeline import train_distill

    if cfg.search.algorithm == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search.algorithm=optuna: optuna is not installed (pip install optuna), or use algorithm: random")
    teacher = train_distill.check_job(cfg.job)
    for sampled in cfg.combinations():
        where = ", ".join(f"space.{key}={value!r}" for key, value in sampled.items())
        job = parse_config(cfg.trial_job(sampled), DistillJobConfig, f"sweep {cfg.name!r} trial with {where}")
        try:
            train_distill.check_job(job)
        except ConfigError as err:
            raise ConfigError(f"sweep {cfg.name!r} trial with {where}: {err}") from None
    return teacher


def check_resumable(cfg: SweepConfig, sweep_dir: Path, resume: bool, results: str | None = None) -> None:
    """--resume needs a sweep started by the same settings; a new sweep needs a free name.

    ``results``: the sweep's directory in the storage (default: ``sweep_dir``), where Tune's experiment is.
    """
    from ray.tune import Tuner

    job_file = sweep_dir / names.SWEEP_JOB_FILE
    tune_dir = storage.join(results or sweep_dir, TUNE_DIR)
    if not resume:
        if job_file.exists():
            raise ConfigError(f"sweep {cfg.name!r} already exists in {sweep_dir}: pass --resume to continue it, or choose another name")
        return
    if not job_file.is_file() or not Tuner.can_restore(tune_dir):
        raise ConfigError(f"--resume: no sweep {cfg.name!r} to resume in {sweep_dir} (Tune's experiment: {tune_dir})")
    recorded = storage.without_default_storage(json.loads(job_file.read_text()))
    previous = {k: v for k, v in recorded.items() if k not in SweepConfig.RESUMABLE_CHANGES}
    current = {k: v for k, v in storage.without_default_storage(cfg.model_dump(mode="json")).items() if k not in SweepConfig.RESUMABLE_CHANGES}
    changed = [key for key in sorted(set(previous) | set(current)) if previous.get(key) != current.get(key)]
    if changed:
        raise ConfigError(
            f"--resume: sweep {cfg.name!r} in {sweep_dir} was started with different settings ({', '.join(changed)}); "
            f"only {', '.join(sorted(SweepConfig.RESUMABLE_CHANGES))} may change"
        )


# ---------------------------------------------------------------- the driver


def main(cfg: SweepConfig, workdir: str | Path, address: str | None = None, tracking_uri: str | None = None, resume: bool = False) -> dict:
    """Run (or with ``resume`` continue) the sweep; returns the summary written to ``best.json``.

    Joins the Ray cluster already initialised in this process, else ``address`` / ``$RAY_ADDRESS``,
    else starts a local one (shut down at the end). A bad config raises :class:`ConfigError` before
    anything is written (a storage no filesystem opens included). ``summary["interrupted"]`` is True
    when the driver was stopped (Ctrl-C) before every trial ended: nothing is selected, and ``--resume``
    continues.
    """
    workdir = Path(workdir).resolve()
    sweep_dir = workdir / "sweeps" / cfg.name
    store = storage.resolve(cfg.storage.path, workdir)
    teacher = check_sweep(cfg)
    # trials run in Tune's trial directories (Ray changes the working directory): absolute paths only
    cfg = SweepConfig.model_validate({
        **cfg.model_dump(mode="json"), "job": {**cfg.job.with_absolute_paths(), "teacher": str(teacher.path)},
        "storage": {"path": store.root if cfg.storage.path is not None else None},
    })
    check_resumable(cfg, sweep_dir, resume, store.location("sweeps", cfg.name))
    importance = sweep_importance(cfg, teacher, workdir)
    with connected(address, object_store_memory=LOCAL_OBJECT_STORE_BYTES):
        return _run(cfg, sweep_dir, workdir, teacher, tracking_uri, resume, importance, store)


def sweep_importance(cfg: SweepConfig, teacher, workdir: Path) -> dict | None:
    """The teacher's importance scores, once for every trial, when any trial prunes its student from it."""
    from pipeline import train_distill

    pruned = cfg.job.student.init == "pruned" or "pruned" in cfg.possible_values("student.init")
    if not pruned:
        return None
    job = cfg.job.model_copy(update={"student": cfg.job.student.model_copy(update={"init": "pruned"})})
    return train_distill.pruning_importance(job, teacher, workdir)


def _run(cfg: SweepConfig, sweep_dir: Path, workdir: Path, teacher, tracking_uri: str | None, resume: bool, importance: dict | None = None,
         store: storage.Storage | None = None) -> dict:
    """:func:`main` once Ray is connected."""
    from pipeline import train_distill

    store = store or storage.resolve(cfg.storage.path, workdir)
    results = store.location("sweeps", cfg.name)  # Tune's experiment and the trials' runs (sweep_dir itself by default)
    storage.warn_if_not_shared(store)
    use_gpu = train_distill.check_placement(cfg.job)
    # -- nothing above writes; from here on the sweep exists
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(workdir, tracking_uri)
    parent = open_run(tracking_uri=uri, experiment=names.SWEEP_EXPERIMENT, run_name=cfg.name, run_dir=sweep_dir, workdir=workdir)
    parent.log_params(flatten(cfg.model_dump(mode="json")))
    parent.set_tags({names.TAG_TEACHER_PATH: str(teacher.path), names.TAG_RUN_DIR: str(sweep_dir)})
    # written once MLflow took the run: a tracking failure above leaves no half-made sweep to --resume
    (sweep_dir / names.SWEEP_JOB_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    _log(f"[sweep {cfg.name}] {'resuming' if resume else 'starting'}: {_describe(cfg)}; MLflow run {parent.run_id} ({uri})")
    started = time.perf_counter()
    metric = names.selection_metric(teacher.family, cfg.job.selection_metric)  # ranks epochs, trials and the best
    try:
        _tune(cfg, sweep_dir, workdir, parent, use_gpu, resume, importance, results, metric)
        rows = collect(cfg, sweep_dir, workdir, parent, store, metric)
    except BaseException:
        parent.finish("KILLED")
        raise
    summary = report(cfg, sweep_dir, parent, rows, time.perf_counter() - started, store, metric)
    parent.finish("KILLED" if summary["interrupted"] else "FINISHED")
    return summary


def _describe(cfg: SweepConfig) -> str:
    space = ", ".join(f"{key} {entry.kind} {list(entry.values)}" for key, entry in cfg.space.items())
    scheduler = cfg.scheduler
    stop = f"ASHA (grace {scheduler.grace_period}, reduction {scheduler.reduction_factor:g})" if scheduler.type == "asha" else "no early stopping"
    return (
        f"{space}; {cfg.search.algorithm} search x{cfg.search.num_samples}; {cfg.max_epochs} epochs max, {stop}; "
        f"{cfg.max_concurrent_trials} trials at a time, {cfg.job.scaling.num_workers} workers each"
    )


def _tune(cfg: SweepConfig, sweep_dir: Path, workdir: Path, parent: RunTracker, use_gpu: bool, resume: bool, importance: dict | None = None,
          results: str | None = None, metric: str = names.VAL_ACCURACY) -> None:
    """Run Tune; ``results``: the sweep's directory in the storage (a path or a URI; default ``sweep_dir``)."""
    from ray import tune

    results = results or str(sweep_dir)
    context = {
        "sweep": cfg.model_dump(mode="json"), "results": results, "workdir": str(workdir), "parent": parent, "use_gpu": use_gpu,
        "local_cluster": started_here(),  # the trial actors cannot tell: they only joined it
        "importance": importance,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": 0, "memory": TRIAL_MEMORY_BYTES})
    if resume:
        # finished and failed trials stay as they are; interrupted ones start again (their Train run resumes)
        tuner = tune.Tuner.restore(storage.join(results, TUNE_DIR), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: entry.to_tune() for key, entry in cfg.space.items()},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=names.SELECTION_MODE,
                search_alg=_search_algorithm(cfg),
                scheduler=_scheduler(cfg),
                num_samples=cfg.search.num_samples,
                # a search-algorithm *instance* of the basic kind ignores this (Tune only warns): it gets
                # the limit itself in _search_algorithm
                max_concurrent_trials=cfg.max_concurrent_trials if cfg.search.algorithm == "optuna" else None,
                time_budget_s=cfg.time_budget_s,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=results,
                failure_config=tune.FailureConfig(max_failures=0),  # a crashed trial is recorded, not retried
                callbacks=[Progress(cfg.name, cfg.max_epochs, metric), TrialRuns(cfg, parent, sweep_dir, workdir)],
                verbose=0,  # Progress prints one line per event instead of Tune's tables
            ),
        )
    tuner.fit()  # a failed trial does not raise; Ctrl-C returns after Tune saved its state


def _trial_dirname(trial) -> str:
    return trial.trial_id  # short: Tune's default name holds every sampled value


def _search_algorithm(cfg: SweepConfig):
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials, random_state=cfg.search.seed)


def _scheduler(cfg: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=names.EPOCH,  # epochs, not Tune's training_iteration: a restarted trial resumes mid-way
        max_t=cfg.max_epochs,
        grace_period=cfg.scheduler.grace_period,
        reduction_factor=cfg.scheduler.reduction_factor,
    )


class Progress(Callback):
    """One line per trial event on the driver: done / running / stopped / failed and the best so far.

    Stateless between events (it reads the trials' status), so a restored sweep counts the trials
    finished before the interruption too.
    """

    def __init__(self, sweep: str, max_epochs: int, metric: str = names.VAL_ACCURACY):
        self.sweep, self.max_epochs, self.metric = sweep, max_epochs, metric

    def _line(self, trials, event: str, latest: tuple[str, float] | None = None) -> None:
        completed = stopped = failed = running = 0
        best = latest  # Tune updates a trial's metric_analysis only after the callbacks saw the result
        for trial in trials:
            epoch = (trial.last_result or {}).get(names.EPOCH, 0)
            if trial.status == "TERMINATED":
                completed, stopped = (completed + 1, stopped) if epoch >= self.max_epochs else (completed, stopped + 1)
            failed += trial.status == "ERROR"
            running += trial.status == "RUNNING"
            top = (trial.metric_analysis.get(self.metric) or {}).get("max")
            if top is not None and (best is None or top > best[1]):
                best = (trial.trial_id, top)
        best_text = f"best so far {best[0]} {self._name} {best[1]:.4f}" if best else "no result yet"
        _log(
            f"[sweep {self.sweep}] {event} | {completed} completed, {stopped} stopped early, {failed} failed, "
            f"{running} running, {len(trials)} created | {best_text}"
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trials, f"trial {trial.trial_id} started {_short(trial.config)}")

    @property
    def _name(self) -> str:
        return "val_acc" if self.metric == names.VAL_ACCURACY else self.metric

    def on_trial_result(self, iteration, trials, trial, result, **info):
        score = result.get(self.metric)
        self._line(
            trials,
            f"trial {trial.trial_id} epoch {result.get(names.EPOCH)}/{self.max_epochs} {self._name} {score if score is not None else float('nan'):.4f}",
            latest=(trial.trial_id, score) if score is not None else None,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = (trial.last_result or {}).get(names.EPOCH, 0)
        outcome = "completed" if epoch >= self.max_epochs else f"stopped after epoch {epoch}"
        self._line(trials, f"trial {trial.trial_id} {outcome}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, f"trial {trial.trial_id} FAILED")


def _short(config: dict) -> str:
    return " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in config.items())


# ---------------------------------------------------------------- one trial (runs in a Tune trial actor)


def run_trial(params: dict[str, Any], context: dict) -> None:
    """Tune trainable: one distillation (TorchTrainer) with ``params`` applied to the sweep's job.

    No MLflow here: the driver keeps the trial's child run (:class:`TrialRuns`). A crash is written to
    the trial's ``trial_error.txt`` for it and re-raised, so that Tune marks the trial ERROR and the
    sweep goes on.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline import train_distill

    cfg = SweepConfig.model_validate(context["sweep"])
    trial_id = tune.get_context().get_trial_id()
    job = trial_job(cfg, params, trial_id)
    # in the storage (a path or a URI): this actor may run on any node
    run_dir = storage.join(context["results"], TRIALS_DIR, trial_id)
    storage.write_text(storage.join(run_dir, names.JOB_FILE), json.dumps(job.model_dump(mode="json"), indent=2))
    storage.delete_file(storage.join(run_dir, TRIAL_ERROR_FILE))  # a restarted trial starts without its old error
    try:
        teacher = train_distill.read_teacher(job)  # the driver's check_sweep checked the job against the teacher
        importance = context.get("importance") if job.student.init == "pruned" else None
        train_distill._fit(job, teacher, run_dir, None, context["use_gpu"], callbacks=[TuneReportCallback()],
                           local_cluster=context["local_cluster"], importance=importance)
    except Exception as err:
        storage.write_text(storage.join(run_dir, TRIAL_ERROR_FILE), _error_text(err))
        raise


def trial_job(cfg: SweepConfig, params: dict[str, Any], trial_id: str) -> DistillJobConfig:
    """The distill job that trial ``trial_id`` runs: the sweep's job with the trial's ``params`` applied."""
    values = cfg.trial_job(params)
    values["run_name"] = f"{cfg.name}-{trial_id}"
    if cfg.fail_when and all(params.get(key) == value for key, value in cfg.fail_when.items()):
        values.update(fail_at_step=1, max_failures=0)  # TEST-ONLY: rank 0 exits at the first step
    return DistillJobConfig.model_validate(values)


class TrialRuns(Callback):
    """Each trial's MLflow child run, kept by the driver: opened with the trial's params when it starts,
    one metrics step per epoch that Tune receives, FAILED with the trial's error when it crashes.

    The driver does it rather than the trial: MLflow's import and its SQL store cost a trial actor and
    its rank-0 Train worker a few CPU-seconds each, on the critical path of every trial's start-up.
    :func:`collect` closes every run with its outcome after Tune (and logs any epoch missed here).
    """

    def __init__(self, cfg: SweepConfig, parent: RunTracker, sweep_dir: Path, workdir: Path):
        self.cfg, self.parent, self.sweep_dir, self.workdir = cfg, parent, sweep_dir, workdir
        self._runs: dict[str, tuple[RunTracker, set[int]]] = {}  # trial id -> (child run, epochs logged)

    def _child(self, trial) -> tuple[RunTracker, set[int]]:
        if trial.trial_id not in self._runs:  # re-opens the trial's own run after a --resume
            child = open_child(self.parent, self.cfg.name, trial.trial_id, self.sweep_dir / TRIALS_DIR / trial.trial_id, self.workdir)
            self._runs[trial.trial_id] = (child, child.logged_steps(names.VAL_LOSS))  # every family reports it
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        child, _ = self._child(trial)
        job = trial_job(self.cfg, trial.config, trial.trial_id)
        child.log_params({**flatten(job.model_dump(mode="json")), **{f"trial.{key}": str(value) for key, value in trial.config.items()}})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(names.EPOCH) is None:
            return
        child, logged = self._child(trial)
        epoch = int(result[names.EPOCH])
        if epoch not in logged:  # a restarted trial may report an epoch again
            child.log_metrics(_epoch_metrics(result), step=epoch)
            logged.add(epoch)

    def on_trial_error(self, iteration, trials, trial, **info):
        child, _ = self._child(trial)
        configured = getattr(getattr(self.cfg, "storage", None), "path", None)  # a callback pickled by an older sweep has none
        store = storage.resolve(configured, self.workdir)
        error = _trial_error(trial, store.location("sweeps", self.cfg.name), store)
        child.set_tags({names.TAG_TRIAL_STATUS: sweep_report.FAILED, names.TAG_TRIAL_ERROR: _error_text(error)})
        child.finish("FAILED")


def open_child(parent: RunTracker, sweep: str, trial_id: str, run_dir: Path, workdir: Path) -> RunTracker:
    """The trial's MLflow run, nested under the sweep's (same experiment, ``mlflow.parentRunId``)."""
    child = open_run(
        tracking_uri=parent.tracking_uri, experiment=names.SWEEP_EXPERIMENT, run_name=f"{sweep}/{trial_id}", run_dir=run_dir, workdir=workdir
    )
    child.set_tags({names.TAG_PARENT_RUN: parent.run_id, names.TAG_TRIAL_ID: trial_id, names.TAG_RUN_DIR: str(run_dir)})
    return child


def _error_text(err: BaseException | str, limit: int = 4000) -> str:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return text.strip()[-limit:]


# ---------------------------------------------------------------- after Tune: one row per trial


def collect(cfg: SweepConfig, sweep_dir: Path, workdir: Path, parent: RunTracker, store: storage.Storage | None = None,
            metric: str = names.VAL_ACCURACY) -> list[dict]:
    """Read every trial back from Tune's saved experiment (in the storage, default the workdir); close
    each child MLflow run with its outcome. A trial's best epoch is the best by ``metric``."""
    from ray.tune import ExperimentAnalysis

    store = store or storage.resolve(cfg.storage.path, workdir)
    results = store.location("sweeps", cfg.name)
    analysis = ExperimentAnalysis(storage.join(results, TUNE_DIR))
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = analysis.trial_dataframes.get(trial.trial_id)  # keyed by trial id (its docstring says path)
        run_dir = sweep_dir / TRIALS_DIR / trial.trial_id  # the child MLflow run's record
        history = fill_history_holes(_history(frame), storage.join(results, TRIALS_DIR, trial.trial_id))
        row = {
            "trial_id": trial.trial_id,
            "config": dict(trial.config),
            "epochs": history[-1][names.EPOCH] if history else 0,
            "status": _outcome(trial.status, history, cfg.max_epochs),
        }
        row.update(_best_epoch(history, store, metric))
        child = open_child(parent, cfg.name, trial.trial_id, run_dir, workdir)  # re-opens the trial's own run
        row["run_id"] = child.run_id
        row["error"] = _trial_error(trial, results, store) if trial.status == "ERROR" else None
        _backfill(child, history)
        tags = {names.TAG_TRIAL_STATUS: row["status"]}
        if row["error"]:
            tags[names.TAG_TRIAL_ERROR] = _error_text(row["error"])
        child.set_tags(tags)
        child.finish({sweep_report.COMPLETED: "FINISHED", sweep_report.FAILED: "FAILED"}.get(row["status"], "KILLED"))
        rows.append(row)
    return rows


def _history(frame) -> list[dict]:
    """Per-epoch rows, last report per epoch (a restarted trial may report an epoch twice)."""
    if frame is None or frame.empty or names.EPOCH not in frame:
        return []
    by_epoch = {}
    for record in frame.to_dict("records"):
        if record.get(names.EPOCH) == record.get(names.EPOCH):  # not NaN
            by_epoch[int(record[names.EPOCH])] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def fill_history_holes(history: list[dict], run_dir: str | Path) -> list[dict]:
    """Tune's per-epoch history with any missing epoch up to its last taken from the trial's checkpoint.

    A trial that reported an epoch while an interrupted driver was stopping resumes from that epoch's
    checkpoint, and Tune's history of the resumed trial can start after it (seen in CI: progress.csv held
    epoch 2 only); the checkpoint's ``train_state.pt`` ``history`` still has every epoch it trained.
    Only holes are filled: epochs after Tune's last are not, since a trial ASHA stopped may have
    checkpointed one more epoch that Tune never saw. Contiguous histories are returned untouched
    without reading any checkpoint. ``run_dir``: the trial's run in the storage (a path or a URI)."""
    if not history:
        return history
    last = int(history[-1][names.EPOCH])
    known = {int(metrics[names.EPOCH]) for metrics in history}
    if len(known) >= last:  # epochs 1..last all there
        return history
    holes = {
        int(metrics[names.EPOCH]): metrics
        for metrics in _checkpoint_history(run_dir)
        if int(metrics[names.EPOCH]) <= last and int(metrics[names.EPOCH]) not in known
    }
    return sorted(history + list(holes.values()), key=lambda metrics: int(metrics[names.EPOCH]))


def _checkpoint_history(run_dir: str | Path) -> list[dict]:
    """Per-epoch metrics in the trial's newest readable checkpoint (``train_state.pt``), or none."""
    import io

    import torch

    epochs = [entry for entry in storage.list_names(run_dir) if entry.startswith("epoch_")]
    for epoch in sorted(epochs, reverse=True):
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, epoch, names.TRAIN_STATE_FILE))),
                               map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 -- a source for holes only: Tune's own history stands
            continue
        history = state.get("history") if isinstance(state, dict) else None
        if isinstance(history, list):
            return [m for m in history if isinstance(m, dict) and isinstance(m.get(names.EPOCH), int)]
    return []


EPOCH_METRICS = (
    names.EPOCH, names.STEP, names.LR, names.TRAIN_LOSS, names.TRAIN_TASK_LOSS, names.TRAIN_LOGIT_KD_LOSS,
    names.TRAIN_ATTENTION_LOSS, names.VAL_ACCURACY, names.VAL_RELATIONAL_ACCURACY, names.VAL_VQA_ACCURACY, names.VAL_CIDER_D, names.VAL_BLEU_4,
    names.VAL_LOSS, names.SAMPLES_PER_S, names.EPOCH_SECONDS,
)


def _backfill(child: RunTracker, history: list[dict]) -> None:
    """Log to the child run the epochs Tune saved but :class:`TrialRuns` did not log (e.g. results
    that reached Tune's saved state while an interrupted driver was stopping)."""
    logged = child.logged_steps(names.VAL_LOSS)
    for metrics in history:
        epoch = int(metrics[names.EPOCH])
        if epoch not in logged:
            child.log_metrics(_epoch_metrics(metrics), step=epoch)


def _epoch_metrics(result: dict) -> dict[str, float]:
    return {key: float(result[key]) for key in EPOCH_METRICS if result.get(key) is not None}


def _outcome(status: str, history: list[dict], max_epochs: int) -> str:
    if status == "ERROR":
        return sweep_report.FAILED
    if status != "TERMINATED":
        return sweep_report.UNFINISHED
    if not history:
        return sweep_report.NOT_STARTED
    return sweep_report.COMPLETED if history[-1][names.EPOCH] >= max_epochs else sweep_report.STOPPED_EARLY


def _best_epoch(history: list[dict], store: storage.Storage, metric: str = names.VAL_ACCURACY) -> dict:
    """The best epoch by ``metric`` whose checkpoint Ray Train kept (it keeps the best by the same metric). Its
    ``checkpoint`` is a location in the storage: Tune's ``checkpoint_path`` is a path on the storage's
    filesystem (without a URI's scheme)."""
    located = [{**m, "checkpoint_path": store.location_of(m["checkpoint_path"])} for m in history
               if isinstance(m.get("checkpoint_path"), str) and m["checkpoint_path"]]
    kept = [m for m in located if storage.is_dir(m["checkpoint_path"])]
    if not kept:
        return {"checkpoint": None}
    best = max(kept, key=lambda m: (m[metric], -m[names.VAL_LOSS], -m[names.EPOCH]))
    return {
        "checkpoint": best["checkpoint_path"],
        "best_epoch": int(best[names.EPOCH]),
        metric: float(best[metric]),
        names.VAL_LOSS: float(best[names.VAL_LOSS]),
        "metrics": {key: best[key] for key in best if key.startswith(("val_", "train_")) or key in (names.EPOCH, names.STEP, names.SAMPLES_PER_S)},
    }


def _trial_error(trial, results: str | Path, store: storage.Storage | None = None) -> str:
    """The trial's error: what the trial wrote (``trial_error.txt`` in its run, in the storage), else
    Tune's error file (under the trial's storage path: ``trial.error_file`` points at the driver's local
    staging copy, which is gone once the driver that ran the trial has exited)."""
    recorded = storage.read_text_or_none(storage.join(results, TRIALS_DIR, trial.trial_id, TRIAL_ERROR_FILE))
    if recorded is not None:  # "<ExceptionType>: <message>", written by the trial itself
        return recorded
    name = getattr(trial.run_metadata, "error_filename", None)
    in_storage = store.location_of(trial.path) if store is not None and trial.path else trial.path
    for base in (in_storage, trial.local_path):
        text = storage.read_text_or_none(storage.join(base, name)) if base and name else None
        if text is not None:
            return text
    return "the trial failed (Tune kept no error file)"


# ---------------------------------------------------------------- measurement, selection, report


def measure(rows: list[dict], sweep_dir: Path, cfg: SweepConfig, workdir: Path | None = None) -> None:
    """Add ``params`` and ``latency_ms_per_example`` to every row with a checkpoint (cached per checkpoint).

    A checkpoint in a storage given by a URI is copied to ``<workdir>/checkpoint_cache`` first
    (default workdir: the one holding ``sweep_dir``).

    Latency: the driver, after the sweep, one torch thread, a batch of ``latency_batch_size``
    validation examples, ``latency_repeats`` timed passes after 3 warm-up passes; the median per
    example. A VQA student's pass is a forward pass; a captioner's is greedy decoding of a caption for
    each image (what serving it costs). Measured here rather than in trials so that every model is
    timed under the same load (no training running beside it).
    """
    import torch

    cache_file = sweep_dir / names.MEASUREMENTS_FILE
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    inputs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in rows:
            path = row.get("checkpoint")
            if not path:
                continue
            if path not in cache:
                directory = storage.local_checkpoint(path, workdir or sweep_dir.parent.parent, f"trial {row['trial_id']}'s checkpoint")
                cache[path] = _measure_checkpoint(directory, cfg, inputs)
            row.update(cache[path])
    finally:
        torch.set_num_threads(threads)
    cache_file.write_text(json.dumps(cache, indent=2))


def _measure_checkpoint(directory: Path, cfg: SweepConfig, inputs: dict) -> dict:
    """``params``, ``latency_ms_per_example``, ``heads`` (most per layer) and ``layers`` of one checkpoint.

    ``inputs``: the timed batches by data spec, shared by the checkpoints of one sweep.
    """
    import torch

    from amad.models import get_adapter

    adapter = get_adapter(json.loads((directory / "config.json").read_text())["model_type"])
    model = adapter.load(directory).eval()
    size = cfg.selection.latency_batch_size
    if adapter.family == "ved":
        from amad.data.captions import CaptionSpec, make_caption_split
        from amad.data.images import pixels_from_uint8
        from amad.pruning_ved import recorded_origins
        from pipeline.distill_tasks import CAPTIONS_FILE

        spec_text = (directory / CAPTIONS_FILE).read_text()
        spec = CaptionSpec.from_dict(json.loads(spec_text))
        if spec_text not in inputs:
            inputs[spec_text] = pixels_from_uint8(make_caption_split(spec, "val").images[:size])

        def run() -> None:
            adapter.generate(model, inputs[spec_text], max_length=spec.max_caption_length)

        count = len(inputs[spec_text])
        if getattr(model.config, "amad_pruning", None):
            heads = max(len(layer) for layers in recorded_origins(model).values() for layer in layers)
        else:
            heads = max(adapter.heads(model).values())
        layers = max(adapter.layers(model).values())
    else:
        from amad.data.sources import split_for_model
        from amad.models import head_counts

        spec_text = (directory / names.BENCHMARK_FILE).read_text()
        if spec_text not in inputs:
            val = split_for_model(directory, "val")
            inputs[spec_text] = val.batch(torch.arange(min(size, len(val))))

        def run() -> None:
            adapter.forward(model, inputs[spec_text], need_attentions=False)

        count = len(inputs[spec_text]["labels"])
        heads, layers = max(head_counts(model.config)), model.config.num_hidden_layers
    seconds = []
    with torch.no_grad():
        for index in range(3 + cfg.selection.latency_repeats):
            tick = time.perf_counter()
            run()
            if index >= 3:
                seconds.append(time.perf_counter() - tick)
    return {
        names.PARAMS: sum(p.numel() for p in model.parameters()),
        names.LATENCY_MS: statistics.median(seconds) * 1000 / count,
        "heads": heads,
        "layers": layers,
    }


def report(cfg: SweepConfig, sweep_dir: Path, parent: RunTracker, rows: list[dict], seconds: float, store: storage.Storage | None = None,
           metric: str = names.VAL_ACCURACY) -> dict:
    """Pareto front, selection by ``metric``, ``trials.csv``, plots and ``best.json``; all logged to the parent run."""
    counts = {status: sum(r["status"] == status for r in rows) for status in (
        sweep_report.COMPLETED, sweep_report.STOPPED_EARLY, sweep_report.FAILED, sweep_report.NOT_STARTED, sweep_report.UNFINISHED)}
    interrupted = counts[sweep_report.UNFINISHED] > 0
    summary = {"sweep": cfg.name, "sweep_dir": str(sweep_dir), "trials": len(rows), "counts": counts, "interrupted": interrupted,
               "selection_metric": metric,
               "seconds": seconds, "mlflow": {"tracking_uri": parent.tracking_uri, "experiment_id": parent.experiment_id, "run_id": parent.run_id}}
    if interrupted:
        _log(f"[sweep {cfg.name}] interrupted with {counts[sweep_report.UNFINISHED]} trials unfinished: re-run with --resume to continue")
        summary["best"] = None
        return summary

    workdir = sweep_dir.parent.parent
    store = store or storage.resolve(cfg.storage.path, workdir)
    measure(rows, sweep_dir, cfg, workdir)
    front = sweep_report.pareto_front(rows, metric)
    budget = cfg.selection
    best = sweep_report.select_best(rows, budget.max_params, budget.max_latency_ms, metric)
    for row in rows:
        row["pareto"] = row["trial_id"] in front
        row["within_budget"] = sweep_report.within_budget(row, budget.max_params, budget.max_latency_ms)
        row["selected"] = best is not None and row["trial_id"] == best["trial_id"]

    space_keys = list(cfg.space)
    sweep_report.write_csv(rows, space_keys, sweep_dir / names.TRIALS_CSV, metric)
    shapes = {r["trial_id"]: {"heads": r.get("heads"), "layers": r.get("layers")} for r in rows}
    plots = sweep_report.plot(rows, sweep_dir / PLOTS_DIR, shapes, metric)
    summary.update(
        budget={"max_params": budget.max_params, "max_latency_ms": budget.max_latency_ms},
        pareto_front=sorted(front),
        best=_best_record(best, store.location("sweeps", cfg.name)) if best else None,
        rows=[{k: v for k, v in r.items() if k != "metrics"} for r in rows],
    )
    if best is None:
        summary["reason"] = f"no trial reported a {metric} within the budget"
    best_file = sweep_dir / names.BEST_FILE
    best_file.write_text(json.dumps(summary, indent=2, default=str))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    for path in (sweep_dir / names.TRIALS_CSV, best_file, *plots):
        client.log_artifact(parent.run_id, str(path), PLOTS_DIR if path in plots else None)
    parent.log_metrics({f"trials_{status}": count for status, count in counts.items()}, step=0)
    if best:
        parent.set_tags({
            names.TAG_BEST_TRIAL: best["trial_id"], names.TAG_BEST_RUN: best["run_id"],
            names.TAG_BEST_CHECKPOINT: best["checkpoint"], f"best.{metric}": f"{best[metric]:.6f}",
        })
        _log(
            f"[sweep {cfg.name}] done in {seconds:.0f} s: {counts[sweep_report.COMPLETED]} completed, "
            f"{counts[sweep_report.STOPPED_EARLY]} stopped early, {counts[sweep_report.FAILED]} failed; best {best['trial_id']} "
            f"{'val_acc' if metric == names.VAL_ACCURACY else metric} {best[metric]:.4f}, {best[names.PARAMS]} params, {best[names.LATENCY_MS]:.3f} ms/example "
            f"-> {best_file}"
        )
    else:
        parent.set_tags({names.TAG_BEST_TRIAL: "none"})
        _log(f"[sweep {cfg.name}] done in {seconds:.0f} s: {summary['reason']} -> {best_file}")
    return summary


def _best_record(best: dict, results: str) -> dict:
    job = storage.read_text_or_none(storage.join(results, TRIALS_DIR, best["trial_id"], names.JOB_FILE))
    return {
        "trial_id": best["trial_id"],
        "run_id": best["run_id"],
        "checkpoint": best["checkpoint"],
        "params": best["config"],
        "config": json.loads(job) if job is not None else None,
        "metrics": {**best.get("metrics", {}), names.PARAMS: best[names.PARAMS], names.LATENCY_MS: best[names.LATENCY_MS]},
        "best_epoch": best["best_epoch"],
        "status": best["status"],
    }
