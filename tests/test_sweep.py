"""``amad sweep`` (issue 4): Ray Tune over distillation trials on the two-node loopback cluster.

One tiny sweep (4 trials, 2 at a time, heads x attention-loss weight, ASHA) is shared by the
integration tests of this module; a second one runs through the CLI as a user's would, with a trial
forced to fail, and is interrupted after its first trial completes, then resumed. Config errors are
unit tests (no Ray).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import names, sweep_report
from pipeline.config import ConfigError, parse_config, with_overrides
from pipeline.local_cluster import apply_loopback_env
from pipeline.sweep_config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "sweep.yaml"


def tiny_values(teacher: Path, **changes) -> dict:
    values = yaml.safe_load(TINY.read_text())
    values["job"]["teacher"] = str(teacher)
    return with_overrides(values, changes)


def tiny_sweep(teacher: Path, **changes) -> SweepConfig:
    """The tiny sweep preset pointed at ``teacher``; ``changes`` are dotted keys (``"selection.max_params": 10``)."""
    return parse_config(tiny_values(teacher, **changes), SweepConfig, "tiny sweep")


def mlflow_children(uri: str, parent_run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{names.TAG_PARENT_RUN}` = '{parent_run_id}'")
    return runs


def epochs_logged(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, names.VAL_ACCURACY))


# ---------------------------------------------------------------- config errors: before Ray, naming the key


def test_the_reserved_cases_keys_are_the_trials_tables_columns():
    """The table's columns, and every selection metric (the table's metric column is the sweep's)."""
    from pipeline.sweep_config import RESERVED_CASE_KEYS

    metrics = {metric for allowed in names.SELECTION_METRICS.values() for metric in allowed}
    assert RESERVED_CASE_KEYS == set(sweep_report.CSV_COLUMNS) | metrics


@pytest.mark.parametrize(
    "change, message",
    [
        ({"space": {"student.head": {"grid": [2]}}}, r"space: student.head is not a searchable field of the distill job \(searchable: .*student.heads"),
        ({"space": {"student.heads": {"choice": []}}}, r"space.student.heads: choice is empty: list at least one value"),
        ({"space": {"train.lr": {"loguniform": [1e-2, 1e-4]}}}, r"space.train.lr: loguniform: low=0.01 > high=0.0001"),
        ({"space": {"train.lr": {"loguniform": [0, 1e-2]}}}, r"space.train.lr: loguniform: low=0.0 must be > 0"),
        ({"space": {"student.heads": {"grid": [2], "choice": [4]}}}, r"space.student.heads: give exactly one of .* \(got choice, grid\)"),
        ({"space": {"student.heads": {"range": [2, 4]}}}, r"space.student.heads.range: unknown key"),
        ({"space": {"train.epochs": {"grid": [1, 2]}}}, r"train.epochs cannot be searched: set scheduler.max_epochs instead"),
        ({"scheduler": {"grace_period": 5, "max_epochs": 3}}, r"scheduler.grace_period=5 > max_epochs=3"),
        ({"search": {"algorithm": "optuna"}}, r"search.algorithm=optuna takes no grid or cases entries"),
        # cases: a key naming them, fields that are searchable, each field set in one place only
        ({"space": {"arm": {"cases": {"a": {"objective.metod": "amad"}}}}},
         r"space: arm.cases.a: objective.metod is not a searchable field of the distill job"),
        ({"space": {"student.heads": {"cases": {"a": {"student.layers": 1}}}}}, r"student.heads: a cases entry's key names the cases \(e.g. arm\), not a field"),
        ({"space": {"student.heads": {"grid": [2]}, "arm": {"cases": {"a": {"student.heads": 4}}}}},
         r"arm.cases.a sets student.heads, which is also a key of space: set it in one place"),
        ({"space": {"arm": {"cases": {"a": {"train.lr": 0.1}}}, "more": {"cases": {"b": {"train.lr": 0.2}}}}},
         r"train.lr is set by the cases of both arm and more: merge them into one cases entry"),
        ({"space": {"arm": {"cases": {"a": {"train.epochs": 2}}}}}, r"arm.cases.a: train.epochs cannot be searched"),
        ({"space": {"arm": {"cases": {}}}}, r"space.arm: cases is empty: list at least one case"),
        ({"space": {"arm": {"cases": {"a b": {}}}}}, r"space.arm: case label 'a b': use letters, digits"),
        ({"space": {"arm": {"cases": {"w=1": {}}}}}, r"space.arm: case label 'w=1': use letters, digits, '.', '_' and '-'"),  # not an MLflow param name
        ({"space": {"status": {"cases": {"a": {}}}}}, r"status: name the cases .* not as a column of the trials table"),
        ({"space": {"arm": {"cases": {"x" * 220: {"objective.attention_weight": 1.0}}}}}, r"the MLflow param space.arm.cases.x+\.\.\. is 2\d\d characters, over MLflow's 250"),
        ({"search": {"algorithm": "optuna"}, "space": {"arm": {"cases": {"a": {}}}}}, r"takes no grid or cases entries \(space.arm\)"),
        ({"fail_when": {"student.layers": 1}}, r"fail_when.student.layers: not a key of space"),
        ({"max_concurent_trials": 2}, r"max_concurent_trials: unknown key"),
    ],
)
def test_bad_sweep_configs_name_the_key(tmp_path, change, message):
    values = yaml.safe_load(TINY.read_text())
    values.update(change)
    with pytest.raises(ConfigError, match=message):
        parse_config(values, SweepConfig, "sweep")


@pytest.mark.parametrize(
    "space, message",
    [
        # the student spec rejects heads that do not divide a fixed hidden size
        ({"student.heads": {"grid": [2, 5]}}, r"(?s)space.student.heads=5.*student.heads=5 does not divide student.hidden_size=16"),
        # the objective rejects a zero temperature: a range is checked at its ends
        ({"objective.amad_temperature": {"uniform": [0.0, 1.0]}}, r"(?s)space.objective.amad_temperature=0.0.*amad_temperature must be a finite number > 0"),
        # a float range over an integer field is caught by its middle value
        ({"student.layers": {"uniform": [1, 2]}}, r"(?s)space.student.layers=1.5.*student.layers: Input should be a valid integer"),
        # an explicit layer map out of range for a deeper student
        ({"student.layers": {"randint": [1, 3]}, "objective.layer_map": {"choice": [[[0, 1]], [[2, 1]]]}},
         r"objective.layer_map: pair \[2, 1\] is out of range: the student has 1 layers"),
        # a case is checked as the fields it sets: one-to-one by origin needs a pruned student
        ({"arm": {"cases": {"amad": {"objective.method": "amad"}, "origin": {"objective.method": "one_to_one", "objective.one_to_one_pairing": "origin"}}}},
         r"(?s)space.arm='origin'.*one_to_one_pairing"),
    ],
)
def test_values_a_trial_would_reject_are_refused_before_ray(tmp_path, tiny_teacher, space, message):
    from pipeline import sweep

    values = tiny_values(tiny_teacher)
    values["job"]["student"] = {"heads": 2, "layers": 1, "hidden_size": 16}
    values["space"] = space
    cfg = parse_config(values, SweepConfig, "sweep")
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError, match=message):
        sweep.main(cfg, workdir)
    assert not workdir.exists()


def test_optuna_is_refused_clearly_when_not_installed(tmp_path, tiny_teacher):
    import importlib.util

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here (it is not a dependency; CI never has it)")
    from pipeline import sweep

    cfg = tiny_sweep(tiny_teacher, **{"search.algorithm": "optuna", "space": {"student.heads": {"choice": [2, 4]}}})
    with pytest.raises(ConfigError, match="optuna is not installed"):
        sweep.main(cfg, tmp_path / "work")


def test_cli_refuses_a_bad_sweep_config_with_exit_2_and_no_traceback(tmp_path):
    values = yaml.safe_load(TINY.read_text())
    values["space"] = {"student.heads": {"randint": [4, 2]}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(values))
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sweep", "--config", str(config), "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "space.student.heads: randint: low=4 > high=2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


# ---------------------------------------------------------------- selection: a pure function, pinned cases


def _row(tid, acc, params, latency, status=sweep_report.COMPLETED, loss=1.0):
    return {"trial_id": tid, "status": status, names.VAL_ACCURACY: acc, names.VAL_LOSS: loss, names.PARAMS: params,
            names.LATENCY_MS: latency, "config": {}}


ROWS = [
    _row("big", 0.80, 9_000, 2.0),
    _row("mid", 0.75, 5_000, 1.0),
    _row("small", 0.75, 2_000, 0.6),  # ties "mid" on accuracy with fewer params: "mid" is off the front
    _row("tiny", 0.50, 1_000, 0.5),
    _row("early", 0.78, 5_000, 1.1, status=sweep_report.STOPPED_EARLY),
    _row("broken", None, None, None, status=sweep_report.FAILED),
]


def test_selection_takes_the_most_accurate_trial_within_the_budgets_and_ties_go_to_the_smaller_model():
    assert sweep_report.select_best(ROWS)["trial_id"] == "big"
    assert sweep_report.select_best(ROWS, max_params=8_000)["trial_id"] == "early"  # a stopped trial still counts
    assert sweep_report.select_best(ROWS, max_params=4_000)["trial_id"] == "small"  # tie with "mid": the smaller one
    assert sweep_report.select_best(ROWS, max_latency_ms=1.05)["trial_id"] == "small"
    assert sweep_report.select_best(ROWS, max_latency_ms=0.55)["trial_id"] == "tiny"
    assert sweep_report.select_best(ROWS, max_params=500) is None
    assert sweep_report.pareto_front(ROWS) == {"big", "early", "small", "tiny"}


def _write_train_state(run_dir: Path, epoch: int, val_accuracies: list[float]) -> None:
    """A ``train_state.pt`` as the distillation worker writes it: real optimizer, schedule and scaler state."""
    import torch

    from amad.training import make_optimizer

    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = [{names.EPOCH: e + 1, names.STEP: 4 * (e + 1), names.VAL_ACCURACY: acc} for e, acc in enumerate(val_accuracies)]
    state = {
        "epoch": epoch, "step": 4 * epoch, "history": history, "world_size": 1, "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(),
    }
    (run_dir / f"epoch_{epoch:04d}").mkdir(parents=True)
    torch.save(state, run_dir / f"epoch_{epoch:04d}" / names.TRAIN_STATE_FILE)


def _epochs(history):
    return [(int(m[names.EPOCH]), m[names.VAL_ACCURACY]) for m in history]


def test_a_hole_in_tunes_history_is_filled_from_the_checkpoint_but_nothing_after_its_last_epoch(tmp_path):
    from pipeline.sweep import fill_history_holes

    # resumed after an interrupt: Tune kept epochs 2 and 4 only; the newest checkpoint trained 1..4
    resumed = tmp_path / "resumed"
    _write_train_state(resumed, 3, [0.1, 0.2, 0.3])
    _write_train_state(resumed, 4, [0.1, 0.2, 0.3, 0.4])
    tune = [{names.EPOCH: 2.0, names.VAL_ACCURACY: 0.25}, {names.EPOCH: 4.0, names.VAL_ACCURACY: 0.45}]
    assert _epochs(fill_history_holes(tune, resumed)) == [(1, 0.1), (2, 0.25), (3, 0.3), (4, 0.45)]  # Tune's values stand

    # resumed, then stopped by ASHA at epoch 2 after it had checkpointed epoch 3: epoch 3 is not Tune's
    stopped = tmp_path / "stopped"
    _write_train_state(stopped, 3, [0.1, 0.2, 0.3])
    assert _epochs(fill_history_holes([{names.EPOCH: 2, names.VAL_ACCURACY: 0.2}], stopped)) == [(1, 0.1), (2, 0.2)]
    assert _epochs(fill_history_holes([{names.EPOCH: 1, names.VAL_ACCURACY: 0.1}], stopped)) == [(1, 0.1)]

    # a gap with the newest checkpoint unreadable: the next newest readable one fills it
    broken = tmp_path / "broken"
    _write_train_state(broken, 2, [0.1, 0.2])
    (broken / "epoch_0003").mkdir()
    (broken / "epoch_0003" / names.TRAIN_STATE_FILE).write_bytes(b"not a checkpoint")
    tune = [{names.EPOCH: 2, names.VAL_ACCURACY: 0.2}, {names.EPOCH: 3, names.VAL_ACCURACY: 0.3}]
    assert _epochs(fill_history_holes(tune, broken)) == [(1, 0.1), (2, 0.2), (3, 0.3)]

    # contiguous, or nothing at all: returned as is, without a checkpoint to read
    whole = [{names.EPOCH: 1, names.VAL_ACCURACY: 0.1}, {names.EPOCH: 2, names.VAL_ACCURACY: 0.2}]
    assert fill_history_holes(whole, tmp_path / "missing") is whole
    assert fill_history_holes([], resumed) == []
    assert _epochs(fill_history_holes([{names.EPOCH: 2, names.VAL_ACCURACY: 0.2}], tmp_path / "missing")) == [(2, 0.2)]


@pytest.mark.integration
def test_a_cases_sweep_runs_each_case_with_the_fields_it_sets(ray_cluster, tiny_teacher, tmp_path, monkeypatch):
    """tune_configs/tiny/claim/sweep.yaml: one trial per case; the trial's sampled value is the case's label
    (trials table, MLflow), its job the case's fields (MLflow's flattened job params)."""
    from mlflow.tracking import MlflowClient

    from pipeline import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    values = yaml.safe_load((ROOT / "tune_configs" / "tiny" / "claim" / "sweep.yaml").read_text())
    values["job"]["teacher"] = str(tiny_teacher)
    cfg = parse_config(values, SweepConfig, "tiny claim sweep")
    workdir = tmp_path / "work"
    summary = sweep.main(cfg, workdir)
    cases = cfg.space["arm"].cases
    assert sorted(row["config"]["arm"] for row in summary["rows"]) == sorted(cases)
    assert {row["status"] for row in summary["rows"]} == {sweep_report.COMPLETED}
    with open(workdir / "sweeps" / cfg.name / names.TRIALS_CSV, newline="") as handle:
        assert sorted(line["arm"] for line in csv.DictReader(handle)) == sorted(cases)
    children = mlflow_children(summary["mlflow"]["tracking_uri"], summary["mlflow"]["run_id"])
    assert len(children) == len(cases)
    for run in children:
        label = run.data.params["trial.arm"]
        for field, value in cases[label].items():
            assert run.data.params[field] == str(value), (label, field)
    pairing = {run.data.params["trial.arm"]: run.data.params["objective.one_to_one_pairing"] for run in children}
    assert pairing == {"logit_kd": "index", "one_to_one_origin-w1": "origin", "amad_t1-w4": "index"}
    assert MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["run_id"]).info.status == "FINISHED"


# ---------------------------------------------------------------- the tiny sweep (shared by the tests below)


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tiny_teacher, tmp_path_factory, monkeypatch_module):
    from pipeline import sweep

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path_factory.mktemp("sweep")
    cfg = tiny_sweep(tiny_teacher)
    summary = sweep.main(cfg, workdir)
    return cfg, workdir, summary


def arrivals(uri: str, parent_run_id: str) -> list[tuple[str, int, float]]:
    """Every trial's per-epoch ``(trial id, epoch, val_accuracy)`` in the order the driver received them.

    The driver logs each result to the trial's MLflow run as Tune hands it over, right after ASHA has
    decided on it (``TrialRuns.on_trial_result``); the log's millisecond timestamps give the order.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    logged = []
    for run in mlflow_children(uri, parent_run_id):
        for metric in client.get_metric_history(run.info.run_id, names.VAL_ACCURACY):
            logged.append((metric.timestamp, run.data.tags[names.TAG_TRIAL_ID], metric.step, metric.value))
    stamps = [stamp for stamp, *_ in logged]
    assert len(set(stamps)) == len(stamps), f"two results logged in the same millisecond: their order is unknown: {sorted(logged)}"
    return [(tid, step, value) for _, tid, step, value in sorted(logged)]


def asha_outcomes(cfg: SweepConfig, received: list[tuple[str, int, float]]) -> dict[str, tuple[str, int]]:
    """What ASHA (Ray's own scheduler, set up from the sweep's config) decides for results received in
    this order: per trial, ``(status, epochs)``."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    asha = ASHAScheduler(time_attr=names.EPOCH, metric=names.SELECTION_METRIC, mode=names.SELECTION_MODE, max_t=cfg.max_epochs,
                         grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor)
    trials: dict[str, object] = {}
    outcomes: dict[str, tuple[str, int]] = {}
    for tid, epoch, value in received:
        assert tid not in outcomes, f"trial {tid} reported epoch {epoch} after it ended: {received}"
        if tid not in trials:
            trials[tid] = type("Received", (), {"trial_id": tid})()  # all ASHA reads of a trial
            asha.on_trial_add(None, trials[tid])
        decision = asha.on_trial_result(None, trials[tid], {names.EPOCH: epoch, names.VAL_ACCURACY: value})
        if decision == TrialScheduler.STOP:
            outcomes[tid] = (sweep_report.COMPLETED if epoch >= cfg.max_epochs else sweep_report.STOPPED_EARLY, epoch)
    return outcomes


@pytest.mark.integration
def test_four_trials_two_at_a_time_and_asha_stops_the_trials_its_rule_stops(tiny_run):
    """Which trials ASHA stops depends on the order results arrive in (with two trials at a time, on
    which one reports an epoch first), so the test does not assume an order. It replays the order the
    driver received the results in through ASHA's rule and checks every trial ended as the rule says:
    a trial reaching a rung (epochs 1 and 2 here: grace period 1, reduction factor 2, 3 epochs) is
    stopped when it is below the median of the trials that reached the rung before it. Whatever the
    order, the first trial at a rung and the best one there go on, so at least one trial completes;
    whether any is stopped depends on the order (results arriving from worst to best stop none)."""
    cfg, workdir, summary = tiny_run
    assert cfg.max_concurrent_trials == 2 and len(summary["rows"]) == 4 == summary["trials"]
    assert not summary["interrupted"]
    statuses = [row["status"] for row in summary["rows"]]
    assert set(statuses) <= {sweep_report.COMPLETED, sweep_report.STOPPED_EARLY}, summary["rows"]
    assert sweep_report.COMPLETED in statuses, summary["rows"]
    expected = asha_outcomes(cfg, arrivals(summary["mlflow"]["tracking_uri"], summary["mlflow"]["run_id"]))
    assert {row["trial_id"]: (row["status"], row["epochs"]) for row in summary["rows"]} == expected
    sampled = sorted((row["config"]["student.heads"], row["config"]["objective.attention_weight"]) for row in summary["rows"])
    assert sampled == [(2, 0.5), (2, 1000.0), (4, 0.5), (4, 1000.0)]
    for row in summary["rows"]:
        expected = cfg.max_epochs if row["status"] == sweep_report.COMPLETED else None
        assert 1 <= row["epochs"] <= cfg.max_epochs and (expected is None or row["epochs"] == expected)
        assert Path(row["checkpoint"]).is_dir() and row[names.PARAMS] > 0 and row[names.LATENCY_MS] > 0
    # heads alone set the width here (hidden = heads x teacher head_dim 8): 4 heads is the bigger model
    params = {row["config"]["student.heads"]: row[names.PARAMS] for row in summary["rows"]}
    assert params[4] > params[2]


@pytest.mark.integration
def test_mlflow_holds_the_parent_and_one_child_per_trial_with_its_outcome(tiny_run):
    from mlflow.tracking import MlflowClient

    cfg, workdir, summary = tiny_run
    uri = summary["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == names.SWEEP_EXPERIMENT
    assert parent.data.params["max_concurrent_trials"] == "2"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {names.TRIALS_CSV, names.BEST_FILE, "plots/pareto.png", "plots/accuracy_vs_heads_layers.png"} <= artifacts, artifacts

    children = mlflow_children(uri, parent.info.run_id)
    rows = {row["trial_id"]: row for row in summary["rows"]}
    assert sorted(run.data.tags[names.TAG_TRIAL_ID] for run in children) == sorted(rows)
    expected_status = {sweep_report.COMPLETED: "FINISHED", sweep_report.STOPPED_EARLY: "KILLED"}
    for run in children:
        row = rows[run.data.tags[names.TAG_TRIAL_ID]]
        assert run.data.tags[names.TAG_TRIAL_STATUS] == row["status"]
        assert run.info.status == expected_status[row["status"]]
        assert run.data.params["trial.student.heads"] == str(row["config"]["student.heads"])
        assert run.data.params["student.heads"] == str(row["config"]["student.heads"])
        assert float(run.data.params["objective.attention_weight"]) == row["config"]["objective.attention_weight"]
        assert epochs_logged(uri, run.info.run_id) == list(range(1, row["epochs"] + 1))


@pytest.mark.integration
def test_best_json_names_the_most_accurate_trial_and_tags_the_parent(tiny_run):
    """Recomputed here from what MLflow logged per epoch and the CSV's parameter counts, not from the sweep's rows."""
    from mlflow.tracking import MlflowClient

    cfg, workdir, summary = tiny_run
    sweep_dir = workdir.resolve() / "sweeps" / cfg.name
    best = json.loads((sweep_dir / names.BEST_FILE).read_text())["best"]
    uri = summary["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)
    with (sweep_dir / names.TRIALS_CSV).open() as handle:
        table = {line["trial_id"]: line for line in csv.DictReader(handle)}
    assert len(table) == 4
    scores = {}
    for run in mlflow_children(uri, summary["mlflow"]["run_id"]):
        history = client.get_metric_history(run.info.run_id, names.VAL_ACCURACY)
        tid = run.data.tags[names.TAG_TRIAL_ID]
        scores[tid] = (max(m.value for m in history), -int(table[tid][names.PARAMS]), -float(table[tid][names.LATENCY_MS]))
    expected = max(scores, key=lambda tid: scores[tid])
    assert best["trial_id"] == expected, scores
    assert best["metrics"][names.VAL_ACCURACY] == pytest.approx(scores[expected][0])
    assert table[expected]["selected"] == "True" and table[expected]["pareto"] == "True"

    checkpoint = Path(best["checkpoint"])
    assert checkpoint.parent.parent == sweep_dir / "trials" and (checkpoint / "model.safetensors").is_file()
    from amad.models import ViltAdapter

    student = ViltAdapter.load(checkpoint)
    assert student.config.num_attention_heads == best["params"]["student.heads"] == best["config"]["student"]["heads"]
    assert best["config"]["objective"]["attention_weight"] == best["params"]["objective.attention_weight"]
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.data.tags[names.TAG_BEST_TRIAL] == expected
    assert parent.data.tags[names.TAG_BEST_CHECKPOINT] == best["checkpoint"]


@pytest.mark.integration
def test_a_parameter_budget_changes_the_choice_on_reselection(tiny_run):
    """--resume of a finished sweep re-runs no trial, only selection: with a budget below the best
    trial's size the choice moves to the best trial within it; below every trial, nothing is chosen."""
    from pipeline import sweep

    cfg, workdir, summary = tiny_run
    rows = summary["rows"]
    unconstrained = summary["best"]
    sizes = sorted({row[names.PARAMS] for row in rows})
    assert len(sizes) == 2
    # the largest budget that excludes the unconstrained choice, else the smallest model's size
    budget = unconstrained["metrics"][names.PARAMS] - 1 if unconstrained["metrics"][names.PARAMS] > sizes[0] else sizes[0]
    values = cfg.model_dump(mode="json")
    values["selection"]["max_params"] = budget
    again = sweep.main(SweepConfig.model_validate(values), workdir, resume=True)
    within = [row for row in rows if row[names.PARAMS] <= budget]
    expected = max(within, key=lambda r: (r[names.VAL_ACCURACY], -r[names.PARAMS], -r[names.LATENCY_MS]))
    assert again["best"]["trial_id"] == expected["trial_id"]
    assert again["best"]["metrics"][names.PARAMS] <= budget
    if unconstrained["metrics"][names.PARAMS] > budget:
        assert again["best"]["trial_id"] != unconstrained["trial_id"]
    assert [(r["trial_id"], r["epochs"]) for r in again["rows"]] == [(r["trial_id"], r["epochs"]) for r in rows]  # nothing re-ran

    values["selection"]["max_params"] = sizes[0] - 1
    none = sweep.main(SweepConfig.model_validate(values), workdir, resume=True)
    assert none["best"] is None and "within the budget" in none["reason"]


# ---------------------------------------------------------------- CLI: a failing trial, an interrupted driver, --resume


@pytest.mark.integration
def test_interrupted_sweep_resumes_and_every_trial_ends_once_and_a_crashing_trial_is_recorded(tiny_teacher, tmp_path):
    """3 trials (1 worker each, no early stopping); the 1000-weight one crashes at its first step
    (test-only hook). The driver gets SIGINT once a trial has completed; ``--resume`` finishes the
    rest without re-running the completed trial or the failed one."""
    values = tiny_values(tiny_teacher, **{
        "name": "resumed", "job.scaling.num_workers": 1, "scheduler.type": "fifo", "scheduler.max_epochs": 2,
        "space": {"objective.attention_weight": {"grid": [0.5, 1000.0, 2.0]}},
        "fail_when": {"objective.attention_weight": 1000.0},
    })
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(values))
    workdir = tmp_path / "work"
    sweep_dir = workdir / "sweeps" / "resumed"
    command = [sys.executable, "-m", "pipeline.cli", "sweep", "--config", str(config), "--workdir", str(workdir)]
    ray_tmp = tempfile.mkdtemp(prefix="amad-sw-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    apply_loopback_env(env)
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "first.log"
    driver = None
    try:
        with log_path.open("w") as log:
            driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while " completed | " not in log_path.read_text():
            assert driver.poll() is None, f"the driver exited ({driver.returncode}) early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial completed after 300 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        interrupted_at = time.time()
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and returns
        first_rc = driver.wait(timeout=180)
        first = log_path.read_text()
        second = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = second.stdout + second.stderr
    assert first_rc == 130, first[-3000:]
    assert "interrupted with" in first and "--resume" in first
    assert second.returncode == 0, output[-5000:]

    summary = json.loads((sweep_dir / names.BEST_FILE).read_text())
    rows = {row["config"]["objective.attention_weight"]: row for row in summary["rows"]}
    assert sorted(rows) == [0.5, 2.0, 1000.0] and summary["trials"] == 3
    assert rows[1000.0]["status"] == sweep_report.FAILED and "WorkerGroupError" in rows[1000.0]["error"]
    assert rows[0.5]["status"] == rows[2.0]["status"] == sweep_report.COMPLETED
    assert summary["best"]["trial_id"] in (rows[0.5]["trial_id"], rows[2.0]["trial_id"])

    # the trial that completed before the interrupt was not trained again
    completed_first = [row for row in rows.values() if f"trial {row['trial_id']} completed |" in first]
    assert completed_first, first[-3000:]
    trial_dir = sweep_dir / "trials" / completed_first[0]["trial_id"]
    assert all(path.stat().st_mtime < interrupted_at for path in trial_dir.glob("epoch_*/model.safetensors"))
    # every trial ended once: one child run each, each epoch logged once
    uri = summary["mlflow"]["tracking_uri"]
    children = mlflow_children(uri, summary["mlflow"]["run_id"])
    assert sorted(run.data.tags[names.TAG_TRIAL_ID] for run in children) == sorted(row["trial_id"] for row in rows.values())
    by_id = {run.data.tags[names.TAG_TRIAL_ID]: run for run in children}
    failed = by_id[rows[1000.0]["trial_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags[names.TAG_TRIAL_STATUS] == sweep_report.FAILED
    assert "WorkerGroupError" in failed.data.tags[names.TAG_TRIAL_ERROR]
    for weight in (0.5, 2.0):
        run = by_id[rows[weight]["trial_id"]]
        assert run.info.status == "FINISHED" and epochs_logged(uri, run.info.run_id) == [1, 2]
