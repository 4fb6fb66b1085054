"""Shared storage for multi-node runs (issue 21): ``storage:`` / ``--storage-path`` for distill, sweep and run.

Unit tests (no Ray): resolving a path or a URI, bad values named with their key or flag before
anything starts, the flag over the config, reading and writing through a filesystem that is not the
local one (pyarrow's in-memory ``mock://``), and when the multi-node warning is due.

Integration tests on the session's two-node loopback cluster: a tiny distill (one worker per node)
and a tiny sweep whose storage is a ``file://`` URI outside the workdir -- checkpoints land there and
only there, and export (and the registry) read them back through the same filesystem; and the CLI,
joining that cluster by address with a node-local storage, warns before it starts anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import names, storage
from pipeline.config import ConfigError, DistillJobConfig, load_config, parse_config, with_overrides
from pipeline.export_config import ExportJobConfig
from pipeline.run_config import RunJobConfig
from pipeline.sweep_config import SweepConfig
from distill_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny"


# ---------------------------------------------------------------- resolving a storage value


def test_the_default_is_the_workdir_and_a_relative_path_is_made_absolute(tmp_path, monkeypatch):
    default = storage.resolve(None, tmp_path / "work")
    assert (default.root, default.source, default.node_local) == (str((tmp_path / "work").resolve()), "--workdir", True)
    assert default.location("ray", "run") == str(tmp_path.resolve() / "work" / "ray" / "run")
    assert default.location_of(default.location("ray", "run", "epoch_0001")) == default.location("ray", "run", "epoch_0001")

    monkeypatch.chdir(tmp_path)
    relative = storage.resolve("shared/ckpt", tmp_path / "work")
    assert relative.root == str(tmp_path.resolve() / "shared" / "ckpt") and relative.node_local
    assert not (tmp_path / "shared").exists()  # resolving writes nothing


def test_a_file_uri_stays_a_uri_and_rays_paths_map_back_to_it(tmp_path):
    uri = (tmp_path / "shared").as_uri()
    shared = storage.resolve(uri, tmp_path / "work")
    assert shared.root == uri and shared.path == str(tmp_path / "shared") and shared.node_local
    assert shared.location("sweeps", "s1", "tune") == f"{uri}/sweeps/s1/tune"
    # Ray reports checkpoint paths on the filesystem, without the scheme
    assert shared.location_of(f"{tmp_path}/shared/ray/run/epoch_0002") == f"{uri}/ray/run/epoch_0002"
    with pytest.raises(ValueError, match="is not under the storage"):
        shared.location_of("/elsewhere/epoch_0001")


def test_a_remote_uri_keeps_its_bucket_and_query_on_every_location():
    remote = storage.resolve("mock://bucket-keeps/prefix?option=1", Path.cwd())
    assert not remote.node_local and remote.root == "mock://bucket-keeps/prefix?option=1"
    assert remote.location("ray", "run") == "mock://bucket-keeps/prefix/ray/run?option=1"
    assert remote.location_of(f"{remote.path}/ray/run/epoch_0001") == "mock://bucket-keeps/prefix/ray/run/epoch_0001?option=1"
    assert storage.parent("s3://b/p/run/epoch_0001?region=x") == "s3://b/p/run?region=x"
    assert storage.name("s3://b/p/run/epoch_0001?region=x") == "epoch_0001"


@pytest.mark.parametrize("value, reason", [
    ("nosuchfs://bucket/prefix", "Unrecognized filesystem type"),  # an unknown scheme
    ("file://otherhost/shared", "Unsupported hostname"),  # a file URI of another machine
])
def test_a_uri_no_filesystem_opens_is_refused_naming_the_key_and_the_value(tmp_path, value, reason):
    with pytest.raises(ConfigError) as refused:
        storage.resolve(value, tmp_path / "work", "--storage-path")
    message = str(refused.value)
    assert message.startswith(f"--storage-path={value!r}: no filesystem opens it (") and reason in message
    assert "s3://bucket/prefix" in message  # says what would work
    assert not (tmp_path / "work").exists()


def test_a_file_is_not_a_storage_directory(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"storage.path='.*taken': .*taken is a file; give a directory"):
        storage.resolve(str(tmp_path / "taken"), tmp_path / "work")


# ---------------------------------------------------------------- the configs and the command line


def _values(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("model, path", [
    (DistillJobConfig, TINY / "distill.yaml"), (SweepConfig, TINY / "sweep.yaml"), (RunJobConfig, TINY / "run.yaml"),
])
def test_storage_takes_a_path_and_unknown_keys_are_errors(model, path):
    values = _values(path)
    assert parse_config(values, model).storage.path is None  # the presets keep the default: the workdir
    assert parse_config({**values, "storage": {"path": "s3://bucket/amad"}}, model).storage.path == "s3://bucket/amad"
    with pytest.raises(ConfigError, match=r"storage.bucket: unknown key"):
        parse_config({**values, "storage": {"path": "s3://bucket/amad", "bucket": "amad"}}, model, "job")
    with pytest.raises(ConfigError, match=r"storage: Input should be a valid dictionary"):
        parse_config({**values, "storage": "s3://bucket/amad"}, model, "job")


def test_a_sweep_sets_its_storage_once_not_per_trial():
    values = with_overrides(_values(TINY / "sweep.yaml"), {"job.storage.path": "s3://bucket/amad"})
    with pytest.raises(ConfigError, match=r"job.storage.path='s3://bucket/amad': a sweep's storage is set once .* top level"):
        parse_config(values, SweepConfig, "sweep")


def test_the_flag_overrides_the_config_and_a_bad_value_names_where_it_came_from(tmp_path):
    from pipeline.cli import build_parser

    for command in ("distill", "sweep", "run"):
        assert build_parser().parse_args([command, "--storage-path", "gs://bucket/x"]).storage_path == "gs://bucket/x"
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({**_values(TINY / "distill.yaml"), "storage": {"path": str(tmp_path / "from-config")}}))
    cfg = load_config(config, DistillJobConfig)
    flagged = storage.apply_flag(cfg, (tmp_path / "from-flag").as_uri(), config)
    assert flagged.storage.path == (tmp_path / "from-flag").as_uri() and flagged.run_name == cfg.run_name
    assert storage.apply_flag(cfg, None, config).storage.path == str(tmp_path / "from-config")
    with pytest.raises(ConfigError, match=r"^--storage-path='nosuchfs://b/x': no filesystem opens it"):
        storage.apply_flag(cfg, "nosuchfs://b/x", config)
    config.write_text(yaml.safe_dump({**_values(TINY / "distill.yaml"), "storage": {"path": "nosuchfs://b/y"}}))
    with pytest.raises(ConfigError, match=rf"^{config}: storage.path='nosuchfs://b/y': no filesystem opens it"):
        storage.apply_flag(load_config(config, DistillJobConfig), None, config)


@pytest.mark.parametrize("command, config", [("distill", "distill.yaml"), ("sweep", "sweep.yaml"), ("run", "run.yaml")])
def test_cli_refuses_a_storage_no_filesystem_opens_with_exit_2_before_anything_starts(tmp_path, command, config):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "kept.txt").write_text("written before")  # nothing already written is lost
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", command, "--config", str(TINY / config), "--workdir", str(workdir),
         "--storage-path", "nosuchfs://bucket/amad"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"amad {command}: error: --storage-path='nosuchfs://bucket/amad': no filesystem opens it" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["kept.txt"] and (workdir / "kept.txt").read_text() == "written before"


def test_a_run_was_recorded_before_storage_existed_resumes_and_a_changed_storage_is_refused(tmp_path, tiny_teacher):
    from pipeline.train_distill import check_resumable

    cfg = tiny_config(tiny_teacher)
    old = cfg.model_dump(mode="json")
    del old["storage"]  # job.json written before storage was a setting
    run_dir = tmp_path / "ray" / cfg.run_name
    run_dir.mkdir(parents=True)
    (run_dir / names.JOB_FILE).write_text(json.dumps(old))
    check_resumable(cfg, run_dir)
    moved = tiny_config(tiny_teacher, **{"storage.path": "s3://bucket/amad"})
    with pytest.raises(ConfigError, match=r"different settings \(storage\)"):
        check_resumable(moved, run_dir)
    # the run's stage key in `amad run` is the same as before storage existed, while the storage is the default
    assert storage.without_default_storage({"a": 1, "storage": {"path": None}, "job": {"storage": {"path": None}}}) == {"a": 1, "job": {}}


# ---------------------------------------------------------------- reading and writing through a filesystem that is not local


def test_locations_are_read_written_and_copied_through_their_filesystem(tmp_path):
    root = "mock://bucket-rw/amad"  # pyarrow's in-memory filesystem: nothing of it is on the local disk
    checkpoint = storage.join(root, "ray", "run", "epoch_0001")
    storage.write_text(storage.join(checkpoint, "config.json"), '{"a": 1}')
    storage.write_text(storage.join(checkpoint, "sub", "b.txt"), "b")
    assert storage.list_names(storage.join(root, "ray", "run")) == ["epoch_0001"]
    assert storage.list_names(storage.join(root, "missing")) == []
    assert storage.is_dir(checkpoint) and storage.is_file(storage.join(checkpoint, "config.json"))
    assert storage.read_text(storage.join(checkpoint, "config.json")) == '{"a": 1}'
    assert storage.read_text_or_none(storage.join(checkpoint, "nope.json")) is None
    storage.delete_file(storage.join(checkpoint, "nope.json"))  # a missing file is no error

    workdir = tmp_path / "work"
    copy = storage.local_checkpoint(checkpoint, workdir)
    assert copy.parent.parent == workdir / storage.CACHE_DIR and copy.name == "epoch_0001"
    assert (copy / "config.json").read_text() == '{"a": 1}' and (copy / "sub" / "b.txt").read_text() == "b"
    assert [p.name for p in copy.parent.iterdir()] == ["epoch_0001"]  # no partial copy left beside it
    storage.write_text(storage.join(checkpoint, "config.json"), "changed")
    assert storage.local_checkpoint(checkpoint, workdir) == copy and (copy / "config.json").read_text() == '{"a": 1}'  # copied once
    with pytest.raises(ConfigError, match=r"checkpoint: mock://bucket-rw/amad/ray/run/epoch_0009 is not a directory"):
        storage.local_checkpoint(storage.join(root, "ray", "run", "epoch_0009"), workdir)

    with storage.local_directory(checkpoint, workdir) as directory:
        assert (directory / "config.json").read_text() == "changed"
    assert not directory.exists()
    assert storage.local_checkpoint(str(tmp_path / "plain"), workdir) == (tmp_path / "plain").resolve()  # a path is read in place


# ---------------------------------------------------------------- the multi-node warning


def test_the_warning_is_for_a_joined_multi_node_cluster_with_node_local_storage(tmp_path):
    local = storage.resolve(None, tmp_path / "work")
    file_uri = storage.resolve((tmp_path / "nfs").as_uri(), tmp_path / "work", "--storage-path")
    remote = storage.resolve("mock://bucket-warn/amad", tmp_path / "work")
    assert storage.shared_storage_warning(local, alive_nodes=1, cluster_started_here=False) is None  # one node sees its own disk
    assert storage.shared_storage_warning(local, alive_nodes=3, cluster_started_here=True) is None  # every node is this machine
    assert storage.shared_storage_warning(remote, alive_nodes=3, cluster_started_here=False) is None  # every node reaches a bucket
    warning = storage.shared_storage_warning(local, alive_nodes=3, cluster_started_here=False)
    assert warning.startswith("WARNING: the Ray cluster has 3 nodes") and str(tmp_path / "work") in warning
    assert "the default, under --workdir" in warning and "Every node must see this same path" in warning
    assert "s3://bucket/prefix" in warning and "NFS" in warning and "docs/storage.md" in warning
    by_flag = storage.shared_storage_warning(file_uri, alive_nodes=2, cluster_started_here=False)  # file:// is node-local too
    assert by_flag and "set by --storage-path" in by_flag and file_uri.root in by_flag


# ---------------------------------------------------------------- integration: two nodes, storage outside the workdir


@pytest.fixture(scope="module")
def distilled(ray_cluster, tiny_teacher, tmp_path_factory, monkeypatch_module):
    """The tiny distill, one worker per node, its storage a ``file://`` URI beside (not under) the workdir."""
    from pipeline import train_distill

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir, shared = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("shared")
    cfg = tiny_config(tiny_teacher, **{"scaling.cpus_per_worker": 1, "storage.path": shared.as_uri(), "run_name": "on-shared"})
    return cfg, workdir, shared, train_distill.main(cfg, workdir)


def _export(workdir: Path, **values) -> dict:
    from pipeline import export

    settings = {"exporter": "torchscript", "latency_repeats": 3, "threads": 1, "optimize": False, "gates": {"parity_examples": 32}, **values}
    return export.main(parse_config(settings, ExportJobConfig, "test export"), workdir)


@pytest.mark.integration
def test_distill_checkpoints_land_in_the_storage_only_and_export_reads_them_back(distilled, tiny_teacher, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.registry import Registry

    cfg, workdir, shared, summary = distilled
    run_uri = f"{shared.as_uri()}/ray/{cfg.run_name}"
    assert summary["storage_dir"] == run_uri and summary["best_checkpoint"].startswith(f"{run_uri}/epoch_000")
    in_storage = shared / "ray" / cfg.run_name
    assert sorted(p.name for p in in_storage.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]
    best = in_storage / storage.name(summary["best_checkpoint"])
    assert torch.load(best / names.TRAIN_STATE_FILE, weights_only=False)["world_size"] == 2  # DDP over the two nodes
    assert not list(workdir.rglob("epoch_*")) and not list(workdir.rglob(names.TRAIN_STATE_FILE))  # nothing of Ray's in the workdir
    assert (workdir / "ray" / cfg.run_name / names.SUMMARY_FILE).is_file()  # the driver's own files stay there
    assert json.loads((in_storage / names.JOB_FILE).read_text())["storage"]["path"] == shared.as_uri()
    record = json.loads((in_storage / names.MLFLOW_RUN_FILE).read_text())
    assert record["run_id"] == summary["mlflow"]["run_id"]
    artifacts = {a.path for a in MlflowClient(summary["mlflow"]["tracking_uri"]).list_artifacts(record["run_id"], names.BEST_CHECKPOINT_ARTIFACT)}
    assert f"{names.BEST_CHECKPOINT_ARTIFACT}/model.safetensors" in artifacts  # logged from a copy of the checkpoint

    # export and the registry read the checkpoint back through its URI: the teacher from job.json in the storage
    exports = tmp_path / "exports-work"
    report = _export(exports, checkpoint=summary["best_checkpoint"])
    assert report["passed"] and report["checkpoint"] == summary["best_checkpoint"]
    assert report["teacher"] == str(Path(tiny_teacher).resolve()) and report["name"] == f"{cfg.run_name}-{best.name}"
    assert (exports / storage.CACHE_DIR).is_dir()
    tags = Registry(report["registry"]["tracking_uri"]).alias_version("amad-student", "champion").tags
    assert tags["checkpoint"] == summary["best_checkpoint"] and tags["training_run_id"] == summary["mlflow"]["run_id"]


@pytest.mark.integration
def test_a_sweep_writes_tune_and_trials_to_the_storage_and_export_reads_its_choice_back(ray_cluster, tiny_teacher, tmp_path, monkeypatch):
    from pipeline import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir, shared = tmp_path / "work", tmp_path / "shared"
    values = with_overrides(_values(TINY / "sweep.yaml"), {
        "name": "stored", "job.teacher": str(tiny_teacher), "job.scaling.num_workers": 1,
        "space": {"objective.attention_weight": {"grid": [0.5, 2.0]}}, "scheduler": {"type": "fifo", "max_epochs": 1},
        "selection.latency_repeats": 3, "storage.path": shared.as_uri(),
    })
    summary = sweep.main(parse_config(values, SweepConfig, "stored sweep"), workdir)
    assert summary["counts"]["completed"] == 2 and summary["best"], summary
    results = shared / "sweeps" / "stored"
    assert (results / "tune").is_dir() and not (workdir / "sweeps" / "stored" / "tune").exists()
    for row in summary["rows"]:
        assert row["checkpoint"] == f"{results.as_uri()}/trials/{row['trial_id']}/epoch_0001", row
        assert (results / "trials" / row["trial_id"] / names.JOB_FILE).is_file()
        assert (workdir / "sweeps" / "stored" / "trials" / row["trial_id"] / names.MLFLOW_RUN_FILE).is_file()  # the driver's record
    assert not list((workdir / "sweeps").rglob("epoch_*"))
    # the size and latency measurements read each checkpoint back through its URI: one copy each, in the cache
    assert [p.name for p in (workdir / storage.CACHE_DIR).glob("*/*")] == ["epoch_0001", "epoch_0001"]
    best = summary["best"]
    assert best["config"]["objective"]["attention_weight"] == best["params"]["objective.attention_weight"]  # job.json read from the storage

    report = _export(workdir, sweep="stored", registry={"enabled": False})
    assert report["passed"] and report["checkpoint"] == best["checkpoint"]
    assert report["teacher"] == str(Path(tiny_teacher).resolve())


@pytest.mark.integration
def test_the_cli_joining_a_multi_node_cluster_warns_about_node_local_storage_before_it_starts(ray_cluster, tiny_teacher, tmp_path):
    """Joined by --address (so not a cluster it started), two nodes, a file:// storage: the warning comes
    before anything runs; the placement check then refuses 5 workers (exit 2), so nothing trains."""
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({**_values(TINY / "distill.yaml"), "teacher": str(tiny_teacher)}))
    shared, workdir = (tmp_path / "shared").as_uri(), tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "distill", "--config", str(config), "--workdir", str(workdir), "--workers", "5",
         "--address", ray_cluster.address, "--storage-path", shared],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    warning = f"WARNING: the Ray cluster has 2 nodes and checkpoints go to {shared} (set by --storage-path)"
    assert warning in result.stderr, result.stderr[-3000:]
    assert result.stderr.index(warning) < result.stderr.index("scaling.num_workers=5: the cluster can place at most 4 workers")
    assert not workdir.exists() and not (tmp_path / "shared").exists()
