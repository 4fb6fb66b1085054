"""``amad distill`` on a two-node local Ray cluster: checkpoints, MLflow, a student that reproduces its
reported accuracy, resuming by name; and bad configs refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.text import load_tokenizer
from amad.models import ViltAdapter
from amad.training import evaluate
from pipeline import names, train_distill
from pipeline.config import ConfigError, DistillJobConfig, load_config
from distill_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "distill.yaml"




@pytest.mark.integration
def test_a_local_cluster_whose_dashboard_cannot_start_is_refused(monkeypatch):
    """Without its dashboard Ray Train cannot release stopped trials' CPUs: refuse at start, not stall later."""
    import socket

    from pipeline import local_cluster

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(local_cluster, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="without its dashboard"):
            with local_cluster.local_cluster(nodes=1, num_cpus=1, connect=False):
                pass


@pytest.mark.integration
def test_the_test_cluster_is_on_loopback_only(ray_cluster):
    """Every node, the GCS address and the DDP rendezvous address Ray Train gives workers are 127.0.0.1.

    TorchTrainer's gloo/nccl MASTER_ADDR is ``get_address_and_port()`` run on the rank-0 worker, i.e.
    that worker's node IP: asked here on each node, it must be loopback too.
    """
    import ray
    from ray.train._internal.utils import get_address_and_port
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    assert ray_cluster.address.startswith("127.0.0.1:"), ray_cluster.address
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    nodes = [node for node in ray.nodes() if node["Alive"]]
    assert len(nodes) == 2
    assert [(node["NodeManagerAddress"], node["NodeName"]) for node in nodes] == [("127.0.0.1", "127.0.0.1")] * 2, nodes
    master = ray.remote(num_cpus=0)(get_address_and_port)
    per_node = ray.get([
        master.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote() for node in nodes
    ])
    assert [address for address, _ in per_node] == ["127.0.0.1"] * 2, per_node


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tiny_teacher, tmp_path_factory, monkeypatch_module):
    workdir = tmp_path_factory.mktemp("distill")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    # 1 CPU per worker on two 1-CPU nodes: one worker per node, so DDP really crosses nodes
    cfg = tiny_config(tiny_teacher, **{"scaling.cpus_per_worker": 1})
    summary = train_distill.main(cfg, workdir)
    return cfg, workdir, summary


@pytest.mark.integration
def test_two_workers_on_two_nodes_write_checkpoints_and_report_every_epoch(tiny_run):
    cfg, workdir, summary = tiny_run
    best = Path(summary["best_checkpoint"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", names.BENCHMARK_FILE, names.TRAIN_STATE_FILE):
        assert (best / name).is_file(), name
    assert best.parent == workdir.resolve() / "ray" / cfg.run_name
    history = summary["history"]
    assert [m[names.EPOCH] for m in history] == [1, 2]
    steps_per_epoch = history[0][names.STEP]
    assert steps_per_epoch >= 1 and history[1][names.STEP] == 2 * steps_per_epoch
    for metrics in history:
        assert 0.0 <= metrics[names.VAL_ACCURACY] <= 1.0
        assert metrics[names.TRAIN_LOSS] > 0 and metrics[names.SAMPLES_PER_S] > 0
    assert summary["best"][names.VAL_ACCURACY] == max(m[names.VAL_ACCURACY] for m in history)
    state = torch.load(best / names.TRAIN_STATE_FILE, weights_only=False)
    assert state["epoch"] == summary["best"][names.EPOCH] and state["world_size"] == 2
    assert json.loads((Path(summary["run_dir"]) / names.SUMMARY_FILE).read_text())["best_checkpoint"] == str(best)


@pytest.mark.integration
def test_a_fit_on_a_cluster_started_here_starts_no_dataset_manager_and_no_preemption_watcher(tiny_run):
    """pipeline.lean_trainer: each helper actor is a Python process; these two never do anything here."""
    import ray
    from ray.util.state import list_actors

    from pipeline.local_cluster import started_here

    assert started_here()  # the session's cluster was started by this process
    job = ray.get_runtime_context().get_job_id()
    started = {actor.class_name for actor in list_actors(filters=[("job_id", "=", job)], limit=10_000, raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker", "PlacementGroupCleaner"} <= started, started  # the query sees this run's actors
    assert not started & {"DatasetManager", "PreemptionWatcher"}, started


@pytest.mark.integration
def test_best_checkpoint_reproduces_its_reported_validation_accuracy(tiny_run):
    """The all-reduced validation over both workers' shards equals a single-process evaluation of the whole split."""
    cfg, _, summary = tiny_run
    best = Path(summary["best_checkpoint"])
    student = ViltAdapter.load(best)
    assert (student.config.num_attention_heads, student.config.num_hidden_layers) == (cfg.student.heads, cfg.student.layers)
    spec = BenchmarkSpec.from_dict(json.loads((best / names.BENCHMARK_FILE).read_text()))
    assert spec.val_scenes == cfg.data.val_scenes
    val = make_split(spec, "val", load_tokenizer(best))
    report = evaluate(student, ViltAdapter, val)
    assert report["accuracy"] == pytest.approx(summary["best"][names.VAL_ACCURACY], abs=1e-6)
    assert report["loss"] == pytest.approx(summary["best"][names.VAL_LOSS], rel=1e-5)
    assert report["relational_accuracy"] == pytest.approx(summary["best"][names.VAL_RELATIONAL_ACCURACY], abs=1e-6)


@pytest.mark.integration
def test_mlflow_holds_params_metrics_teacher_tags_and_the_best_checkpoint(tiny_run):
    from mlflow.tracking import MlflowClient

    cfg, workdir, summary = tiny_run
    uri = summary["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == names.DISTILL_EXPERIMENT
    assert run.data.params["student.heads"] == str(cfg.student.heads)
    assert run.data.params["objective.method"] == cfg.objective.method
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags[names.TAG_TEACHER_PATH] == str(Path(cfg.teacher).resolve())
    assert float(run.data.tags[names.TAG_TEACHER_TEST_ACCURACY]) >= 0
    for key in (names.VAL_ACCURACY, names.TRAIN_LOSS, names.SAMPLES_PER_S):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(m[names.EPOCH], pytest.approx(m[key])) for m in summary["history"]], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, names.BEST_CHECKPOINT_ARTIFACT)}
    assert f"{names.BEST_CHECKPOINT_ARTIFACT}/model.safetensors" in artifacts
    assert f"{names.BEST_CHECKPOINT_ARTIFACT}/{names.TRAIN_STATE_FILE}" not in artifacts


@pytest.mark.integration
def test_rerunning_a_finished_run_resumes_it_instead_of_training_again(tiny_run):
    """Ray Train V2 reloads the run's checkpoint snapshot from storage_path/name: nothing is retrained."""
    cfg, workdir, summary = tiny_run
    again = train_distill.main(cfg, workdir)
    assert again["history"] == summary["history"]
    assert again["best_checkpoint"] == summary["best_checkpoint"]
    assert again["mlflow"]["run_id"] == summary["mlflow"]["run_id"]
    changed = tiny_config(Path(cfg.teacher), **{"scaling.cpus_per_worker": 1, "train.epochs": 3})
    with pytest.raises(ConfigError, match="different settings \\(train\\)"):
        train_distill.main(changed, workdir)


# ---------------------------------------------------------------- bad configs: refused before anything is written


def _refused(tmp_path: Path, values: dict, message: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(values))
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError, match=message):
        train_distill.main(load_config(config, DistillJobConfig), workdir)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"student": {"heads": 3, "layers": 1, "hidden_size": 16}}, "student.heads=3 does not divide student.hidden_size=16"),
        ({"student": {"heads": 2, "layers": 1, "head_dim": 4, "hidden_size": 8}}, "give head_dim=4 or hidden_size=8, not both"),
        ({"objective": {"layer_map": [[0, 1], [1, 1]]}}, r"objective.layer_map: pair \[1, 1\] is out of range: the student has 1 layers"),
        ({"objective": {"layer_map": [[0, 2]]}}, r"pair \[0, 2\] is out of range: .* the teacher 2"),
        ({"objective": {"method": "amad", "amad_temperature": 0}}, "objective: amad_temperature must be a finite number > 0"),
        ({"train": {"epochs": 1, "learning_rate": 0.1}}, "train.learning_rate: unknown key"),
        ({"scaling": {"num_wokers": 2}}, "scaling.num_wokers: unknown key"),
        ({"teacher": "no/such/teacher"}, "is not a teacher directory saved by `amad teacher`"),
        ({"data": {"train_scenes": 1}}, "leave fewer than one batch per worker"),
        ({"student": {"heads": 2, "layers": 1, "init": "teacher"}}, r"student.init: .* teacher's hidden size \(\d+\); the student has"),
        ({"student": {"heads": 2, "layers": 1, "init": "pretrained"}}, "student.init: Input should be 'random', 'teacher' or 'pruned'"),
        ({"student": {"heads": 7, "layers": 1, "init": "pruned"}}, r"student.heads=7: a pruned student keeps at most the teacher's 6 heads per layer \(.*config.json\)"),
        ({"student": {"heads": 2, "layers": 3, "init": "pruned"}}, r"student.layers=3: a pruned student keeps at most the teacher's 2 layers"),
        ({"student": {"heads": 2, "layers": 1, "init": "pruned", "ffn_keep": 0}}, r"student.ffn_keep: Input should be greater than 0"),
        ({"student": {"heads": 2, "layers": 1, "init": "pruned", "ffn_keep": 1.5}}, r"student.ffn_keep: Input should be less than or equal to 1"),
        ({"student": {"heads": 2, "layers": 1, "init": "pruned", "hidden_size": 16}}, r"init=pruned keeps the teacher's head size.*remove hidden_size"),
        ({"student": {"heads": 2, "layers": 1, "ffn_keep": 0.5}}, r"ffn_keep=0.5 applies only to init=pruned"),
        ({"objective": {"method": "one_to_one", "one_to_one_pairing": "origin"}},
         r"objective.one_to_one_pairing: origin needs a student pruned from the teacher \(student.init: pruned\): a student with init 'random'"),
        ({"objective": {"method": "amad", "one_to_one_pairing": "origin"}}, r"objective: .*one_to_one_pairing: origin applies to method: one_to_one only"),
        ({"objective": {"attention_normalization": "mean"}}, r"objective.attention_normalization: Input should be 'sum' or 'per_head'"),
    ],
)
def test_bad_configs_name_the_field_and_write_nothing(tmp_path, tiny_teacher, change, message):
    values = yaml.safe_load(TINY.read_text())
    values["teacher"] = str(tiny_teacher)
    values.update(change)
    _refused(tmp_path, values, message)


@pytest.mark.integration
def test_more_workers_than_the_cluster_can_place_is_refused_before_fit(ray_cluster, tiny_teacher, tmp_path):
    values = yaml.safe_load(TINY.read_text())
    values.update(teacher=str(tiny_teacher), scaling={"num_workers": 3, "cpus_per_worker": 1, "use_gpu": False})
    _refused(tmp_path, values, r"scaling.num_workers=3: the cluster can place at most 2 workers of 1 CPU each \(CPUs per node: 1, 1\)")


def test_cli_refuses_a_bad_distill_config_with_exit_2_and_no_traceback(tmp_path, tiny_teacher):
    values = yaml.safe_load(TINY.read_text())
    values.update(teacher=str(tiny_teacher), student={"heads": 5, "layers": 1, "hidden_size": 48})
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(values))
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "distill", "--config", str(config), "--workdir", str(workdir), "--workers", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "student.heads=5 does not divide student.hidden_size=48" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
