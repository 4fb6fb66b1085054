"""`amad run` end to end on the tiny preset: real Ray (local), real MLflow (SQLite), real Serve on 127.0.0.1.

One pipeline run per module (a few minutes on 2 cores) is shared by the tests that read its outputs;
the interrupt test runs the CLI in a subprocess of its own. Which sweep a run starts or resumes is
also tested without Ray (``sweep_plan``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import parse_config
from pipeline.run_config import RunJobConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ROOT / "tune_configs" / "tiny" / "run.yaml"


def tiny_run_config(**changes) -> RunJobConfig:
    values = yaml.safe_load(TINY_RUN.read_text())
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        if leaf:
            values.setdefault(section, {})[leaf] = value
        else:
            values[key] = value
    return parse_config(values, RunJobConfig, "tiny run")


def cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


@contextlib.contextmanager
def port_taken(port: int):
    """Something listens on 127.0.0.1:``port`` for the duration (or something already did)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen()
    except OSError:
        pass  # taken already: just as good
    try:
        yield
    finally:
        listener.close()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny pipeline run once through the CLI (as the README's command runs it), then again.

    The first run happens while Ray's default dashboard port is taken, as on a machine where another
    Ray cluster runs: with the dashboard missing, Ray Train could not release the CPUs of the trials
    ASHA stopped and the sweep's last trials waited out its 15-minute time budget.
    """
    workdir = tmp_path_factory.mktemp("run") / "work"
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(TINY_RUN), "--workdir", str(workdir)]
    with port_taken(8265):
        first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state_after_first = json.loads((workdir / "pipeline_state.json").read_text())
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"workdir": workdir, "first": first, "second": second, "state": state_after_first}


@pytest.mark.integration
def test_the_tiny_pipeline_registers_a_champion_and_writes_the_report(finished_run):
    from pipeline.registry import CHAMPION, Registry

    workdir = finished_run["workdir"]
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["export"]["alias"] == CHAMPION
    registry = Registry(f"sqlite:///{workdir / 'mlflow.db'}")
    champion = registry.alias_version("amad-student", CHAMPION)
    assert f"models:/amad-student/{champion.version}" == summary["export"]["model_uri"]
    assert summary["smoke"]["agreed"] == summary["smoke"]["questions"] == 4
    counts = summary["sweep"]["counts"]
    assert counts["completed"] + counts["stopped_early"] == 4, counts  # every trial ran: none waited for leaked CPUs

    report = workdir / "report"
    for name in ("report.md", "alignment_heatmap.png", "alignment.json", "learning_curves.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert list(report.glob("sweep_*.png")), "the sweep's plots are copied into the report"
    markdown = (report / "report.md").read_text()
    assert "| teacher |" in markdown and "| student |" in markdown and "alignment_heatmap.png" in markdown
    # same-runtime comparison with a verdict on the config's targets that follows from the measured figures
    comparison = summary["report"]["comparison"]
    assert comparison["latency_threads"] == 1
    assert comparison["latency_ratio"] == pytest.approx(comparison["student"]["p50_ms"] / comparison["teacher"]["p50_ms"])
    drop = (comparison["teacher"]["accuracy"] - comparison["student"]["accuracy"]) * 100
    assert comparison["targets"]["accuracy"] == {"max_drop_points": 5, "met": drop <= 5}
    assert comparison["targets"]["latency"] == {"max_ratio": 0.6, "met": comparison["latency_ratio"] <= 0.6}
    verdict = "met" if comparison["targets"]["latency"]["met"] else "NOT met"
    assert f"student ONNX p50 <= 0.6 x the teacher's: **{verdict}** ({comparison['latency_ratio']:.2f} x)" in markdown
    # the chosen student was pruned from the teacher (tune_configs/tiny/demo/sweep.yaml), and says where each head came from
    student_config = json.loads(Path(summary["sweep"]["checkpoint"], "config.json").read_text())
    kept = student_config["amad_pruning"]
    alignment = json.loads((report / "alignment.json").read_text())
    assert [layer["student_head_origins"] for layer in alignment] == [
        [[t, h] for h in heads] for t, heads in zip(kept["teacher_layers"], kept["heads"])
    ]
    assert list((workdir / "importance").glob("*.json")), "the teacher was scored once, before the trials"
    for stage in ("teacher", "sweep", "export", "smoke", "report"):
        assert f"[run tiny] {stage}: done" in finished_run["first"].stdout, stage

    # Everything in one MLflow pipeline run, with the report as artifacts.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["registry.alias"] == CHAMPION
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/report.md", "report/alignment_heatmap.png"}


@pytest.mark.integration
def test_running_the_finished_command_again_trains_nothing(finished_run):
    second = finished_run["second"].stdout
    for stage in ("teacher", "sweep", "export", "smoke", "report"):
        assert f"[run tiny] {stage}: reused" in second, stage
    assert "running" not in second.replace("Serve is running", "")
    state = json.loads((finished_run["workdir"] / "pipeline_state.json").read_text())
    assert {k: v["key"] for k, v in state.items()} == {k: v["key"] for k, v in finished_run["state"].items()}
    from pipeline.registry import Registry

    versions = Registry(f"sqlite:///{finished_run['workdir'] / 'mlflow.db'}").versions("amad-student")
    assert len(versions) == 1


@pytest.mark.integration
def test_the_heatmap_numbers_are_align_weights_on_the_same_data(finished_run):
    from amad.losses import align_weights
    from amad.models import ViltAdapter, head_counts
    from pipeline import export

    workdir = finished_run["workdir"]
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    alignment = json.loads((workdir / "report" / "alignment.json").read_text())
    teacher = export.load_model_and_val(Path(summary["teacher"]["path"]))
    student = ViltAdapter.load(summary["sweep"]["checkpoint"]).eval()
    batch = teacher.val.batch(torch.arange(alignment[0]["examples"]))
    with torch.no_grad():
        t_out = ViltAdapter.forward(teacher.model.eval(), batch)
        s_out = ViltAdapter.forward(student, batch)
    for layer in alignment:
        expected = align_weights(t_out.attentions["self"][layer["teacher_layer"]], s_out.attentions["self"][layer["student_layer"]],
                                 t_out.query_masks["self"], temperature=layer["temperature"]).double().mean(0)
        weights = np.asarray(layer["weights"])
        assert weights.shape == (teacher.model.config.num_attention_heads, head_counts(student.config)[layer["student_layer"]])
        np.testing.assert_allclose(weights, expected.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)


@pytest.mark.integration
def test_an_interrupted_run_resumes_at_the_sweep(tmp_path):
    workdir = tmp_path / "work"
    config = tmp_path / "run.yaml"
    values = yaml.safe_load(TINY_RUN.read_text())
    values["smoke"]["enabled"] = False  # this test is about the sweep stage: a 2-trial sweep keeps it short
    sweep = yaml.safe_load((ROOT / values["sweep"]).read_text())
    sweep["space"] = {"student.heads": {"grid": [2, 4]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    values["sweep"] = str(tmp_path / "sweep.yaml")
    values["export"] = str(ROOT / values["export"])
    values["teacher"]["train_config"] = str(ROOT / values["teacher"]["train_config"])
    config.write_text(yaml.safe_dump(values))
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config), "--workdir", str(workdir)]
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=cli_env(), start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # the sweep's first trial has reported an epoch
        trials = list((workdir / "sweeps").glob("*/trials/*/epoch_0001"))
        if trials or process.poll() is not None:
            break
        time.sleep(1)
    assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=300) != 0
    state = json.loads((workdir / "pipeline_state.json").read_text())
    assert set(state) == {"teacher"}, "only the teacher stage finished"

    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[run tiny] teacher: reused" in again.stdout
    assert "exists: resuming it" in again.stdout
    assert set(json.loads((workdir / "pipeline_state.json").read_text())) == {"teacher", "sweep", "export", "smoke", "report"}


# ---------------------------------------------------------------- a changed config starts a new sweep (README: "Reuse and resume")


def _settings(tmp_path: Path, **sweep_changes):
    """``amad run``'s settings for the tiny run with its sweep YAML changed (dotted keys)."""
    from pipeline.config import with_overrides
    from pipeline.run import Settings

    sweep = with_overrides(yaml.safe_load((ROOT / "tune_configs" / "tiny" / "demo" / "sweep.yaml").read_text()), sweep_changes)
    path = tmp_path / f"sweep-{len(list(tmp_path.glob('sweep-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    values = yaml.safe_load(TINY_RUN.read_text())
    values.update(sweep=str(path), export=str(ROOT / values["export"]))
    values["teacher"]["train_config"] = str(ROOT / values["teacher"]["train_config"])
    values["smoke"]["enabled"] = False
    return Settings(parse_config(values, RunJobConfig, "tiny run"))


def _started(plan) -> None:
    """What the sweep stage leaves once its sweep has started: the directory and the sweep's job file."""
    plan.directory.mkdir(parents=True)
    (plan.directory / "sweep_job.json").write_text(json.dumps(plan.cfg.model_dump(mode="json")))


def test_a_changed_config_starts_a_new_sweep_and_the_same_config_resumes_its_own(tmp_path):
    """No Ray: the decision itself (``pipeline.run.sweep_plan``), for each kind of change."""
    from pipeline.run import _key, sweep_plan

    workdir = tmp_path / "work"
    original = _settings(tmp_path)
    teacher = {"teacher": {"path": str(tmp_path / "teacher"), "key": _key("teacher", original, {}, serve=False)}}
    first = sweep_plan(original, workdir, teacher)
    assert first.cfg.name.startswith("tiny-demo-") and first.directory == workdir / "sweeps" / first.cfg.name
    assert not first.resume
    _started(first)

    # the same config, again (also with another job.teacher in the YAML, which the run replaces by its own teacher): resumed
    for same in (_settings(tmp_path), _settings(tmp_path, **{"job.teacher": "elsewhere/teacher"})):
        again = sweep_plan(same, workdir, teacher)
        assert (again.directory, again.resume, again.key) == (first.directory, True, first.key)

    # any change to the sweep's settings, or a new teacher: a directory of its own, not resumed
    changed = {
        "the search space": _settings(tmp_path, space={"student.heads": {"grid": [2]}}),
        "a training setting": _settings(tmp_path, **{"job.train.lr": 2.0e-3}),
        "the scheduler": _settings(tmp_path, **{"scheduler.max_epochs": 2}),
        "the search seed": _settings(tmp_path, **{"search.seed": 1}),
        "the selection budget": _settings(tmp_path, **{"selection.max_params": 1000}),
    }
    directories = {first.directory}
    for what, settings in changed.items():
        plan = sweep_plan(settings, workdir, teacher)
        assert plan.directory not in directories and not plan.resume, what
        directories.add(plan.directory)
    retrained = {"teacher": {**teacher["teacher"], "key": "another teacher"}}
    plan = sweep_plan(original, workdir, retrained)
    assert plan.directory not in directories and not plan.resume, "a new teacher"


@pytest.mark.integration
def test_the_cli_starts_a_new_sweep_beside_the_finished_one_when_the_config_changes(finished_run, tmp_path):
    """The finished run's sweep is where ``sweep_plan`` says; the CLI, given a changed sweep in a
    workdir holding that sweep, starts a new one beside it (stopped as soon as it has started: the
    decision is made by then) and leaves the finished one alone."""
    from pipeline.run import Settings, sweep_plan

    state = finished_run["state"]
    teacher = {"teacher": state["teacher"]["result"]}
    with contextlib.chdir(ROOT):  # the tiny YAML's paths are relative to the repository
        finished = sweep_plan(Settings(tiny_run_config()), finished_run["workdir"], teacher)
    assert (finished.directory.name, finished.resume) == (state["sweep"]["result"]["name"], True)

    workdir = tmp_path / "work"
    (workdir / "sweeps").mkdir(parents=True)
    shutil.copytree(finished.directory, workdir / "sweeps" / finished.directory.name, symlinks=True)
    if (finished_run["workdir"] / "importance").is_dir():  # the teacher's scores, computed once per workdir
        shutil.copytree(finished_run["workdir"] / "importance", workdir / "importance")
    (workdir / "pipeline_state.json").write_text(json.dumps({"teacher": state["teacher"]}))
    old = workdir / "sweeps" / finished.directory.name
    old_files = {path: path.stat().st_mtime_ns for path in old.rglob("*")}

    changed = _settings(tmp_path, space={"student.heads": {"grid": [2]}})
    new = sweep_plan(changed, workdir, teacher)
    assert new.directory != old and not new.resume
    config = tmp_path / "changed-run.yaml"
    config.write_text(yaml.safe_dump(changed.cfg.model_dump(mode="json")))
    log_path = tmp_path / "changed.log"
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config), "--workdir", str(workdir)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=cli_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while f"[sweep {new.cfg.name}] " not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=300)
    text = log_path.read_text()
    assert "[run tiny] teacher: reused" in text, text[-3000:]
    assert f"[sweep {new.cfg.name}] starting" in text, text[-3000:]
    assert "exists: resuming it" not in text and f"[sweep {new.cfg.name}] resuming" not in text, text[-3000:]
    assert json.loads((new.directory / "sweep_job.json").read_text())["space"]["student.heads"]["grid"] == [2]
    assert {path: path.stat().st_mtime_ns for path in old.rglob("*")} == old_files, "the finished sweep was touched"
    assert json.loads((workdir / "pipeline_state.json").read_text()) == {"teacher": state["teacher"]}
