"""``amad distill`` under faults (issue 3): a worker process that dies mid-run, a driver killed mid-run,
the same seed run twice, and an interrupted run that must end with an uninterrupted run's weights.

Runs use the tiny preset against the session's two-node loopback cluster, except the driver test,
which runs the real CLI as a subprocess that starts its own local Ray (as a user's ``amad distill``
does) under a private ``RAY_TMPDIR``, with the loopback environment of ``pipeline.local_cluster``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from amad.models import ViltAdapter
from pipeline import names, train_distill
from pipeline.config import DistillJobConfig, parse_config
from pipeline.local_cluster import LOOPBACK, apply_loopback_env
from distill_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "distill.yaml"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's committed checkpoints
TAG_VARIABLE = "AMAD_TEST_PROCESS_TAG"  # marks every process a CLI subprocess starts (Ray's inherit it)




def steps_per_epoch(cfg: DistillJobConfig, teacher: Path) -> int:
    """As the worker loop counts them: (train questions // workers) // per-worker batch."""
    spec = train_distill.data_spec(json.loads((teacher / names.BENCHMARK_FILE).read_text()), cfg)
    return spec.train_scenes * spec.questions_per_scene // cfg.scaling.num_workers // cfg.train.batch_size


def committed(run_dir: Path) -> list[str]:
    """Checkpoint directory names Ray Train has committed for the run, in report order ([] if none yet)."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    return [result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]]


def assert_checkpoints_intact(run_dir: Path, epochs: int, per_epoch: int) -> None:
    """Every directory of the run is a committed, complete checkpoint that loads, with a consistent state."""
    directories = sorted(path.name for path in run_dir.iterdir() if path.is_dir())
    assert directories == sorted(committed(run_dir)), (directories, committed(run_dir))  # no stray/partial dirs
    assert directories, "no checkpoint"
    for name in directories:
        directory = run_dir / name
        model = ViltAdapter.load(directory)
        assert all(torch.isfinite(p).all() for p in model.parameters()), name
        state = torch.load(directory / names.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
        epoch = int(name.removeprefix("epoch_"))
        assert (state["epoch"], state["step"]) == (epoch, epoch * per_epoch), name
        assert [m[names.EPOCH] for m in state["history"]] == list(range(1, epoch + 1)), name
    assert max(int(name.removeprefix("epoch_")) for name in directories) == epochs


def mlflow_epochs(summary: dict, key: str = names.VAL_ACCURACY) -> list[int]:
    """The steps (= epochs) at which ``key`` was logged to the run's MLflow run, with repeats."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    return sorted(m.step for m in client.get_metric_history(summary["mlflow"]["run_id"], key))


# ---------------------------------------------------------------- a worker process dies


@pytest.mark.integration
def test_a_worker_that_dies_mid_run_restarts_from_the_last_checkpoint_and_finishes(ray_cluster, tiny_teacher, tmp_path, monkeypatch):
    """Rank 0 calls os._exit(1) four steps into epoch 2 (once: a marker file stops the retry from failing).

    ``max_failures=1``: Ray Train restarts the worker group, ``get_checkpoint()`` gives epoch 1's
    checkpoint, and the loop goes on from step 9 to the configured 3 x 9 steps. The fault hook waits for
    epoch 1's checkpoint to be committed before exiting (see ``distill_worker._fail_once``). The student
    is pruned from the teacher (2 of 6 heads, half of each FFN) and learns by one-to-one by origin: the
    restarted workers must rebuild its pruned shapes (and origins) from the checkpoint, not start a new
    pruned student from the teacher.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = tiny_config(tiny_teacher, **{"scaling.cpus_per_worker": 1})  # one worker per node
    per_epoch = steps_per_epoch(base, tiny_teacher)
    fail_at = per_epoch + 4
    cfg = tiny_config(tiny_teacher, **{
        "scaling.cpus_per_worker": 1, "train.epochs": 3, "max_failures": 1, "checkpoints_to_keep": 3,
        "fail_at_step": fail_at, "run_name": "worker-dies",
        "student.init": "pruned", "student.ffn_keep": 0.5, "student.importance_examples": 64,
        # one-to-one by origin reads the pruning record: from the new student, then from the checkpoint after the restart
        "objective.method": "one_to_one", "objective.one_to_one_pairing": "origin", "objective.attention_normalization": "per_head",
    })
    summary = train_distill.main(cfg, tmp_path)

    run_dir = Path(summary["run_dir"])
    marker = run_dir / f".fail_at_step_{fail_at}"
    assert marker.is_file(), "the fault was not injected"
    total = cfg.train.epochs * per_epoch
    history = summary["history"]
    assert [(m[names.EPOCH], m[names.STEP]) for m in history] == [(e, e * per_epoch) for e in (1, 2, 3)]
    assert summary["latest"][names.STEP] == total and summary["latest"][names.EPOCH] == cfg.train.epochs
    # Restarted from epoch 1's checkpoint, not from scratch: that checkpoint was written before the
    # fault and never again, later ones after it; MLflow got every epoch exactly once.
    fault_time = marker.stat().st_mtime
    written = {path.name: (path / names.TRAIN_STATE_FILE).stat().st_mtime for path in run_dir.glob("epoch_*")}
    assert written["epoch_0001"] < fault_time < min(written["epoch_0002"], written["epoch_0003"]), written
    assert mlflow_epochs(summary) == [1, 2, 3]
    assert_checkpoints_intact(run_dir, cfg.train.epochs, per_epoch)
    final = torch.load(run_dir / "epoch_0003" / names.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    assert final["history"] == history and final["world_size"] == 2
    from amad.models import ViltAdapter, head_counts

    for epoch in (1, 3):  # pruned before the fault and after the restart alike
        student = ViltAdapter.load(run_dir / f"epoch_{epoch:04d}")
        assert head_counts(student.config) == [2] and student.config.amad_pruning["intermediate_sizes"] == [student.config.intermediate_size // 2]


# ---------------------------------------------------------------- the driver is killed


def tagged_processes(tag: str) -> dict[int, str]:
    """This user's processes whose environment holds ``TAG_VARIABLE=tag``: pid -> command line."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or another user's
            continue
    return found


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6} (hex, 32-bit words in host order) as text."""
    host = bytes.fromhex(hex_address.split(":")[0])
    host = b"".join(host[i : i + 4][::-1] for i in range(0, len(host), 4))
    if len(host) == 16 and host[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        host = host[12:]
    return socket.inet_ntop(socket.AF_INET if len(host) == 4 else socket.AF_INET6, host)


def tcp_sockets(pids) -> list[tuple[int, bool, str, str]]:
    """(pid, listening, local address, remote address) of every TCP socket the processes hold."""
    table = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            table[fields[9]] = (fields[3] == "0A", _address(fields[1]), _address(fields[2]))  # 0A: LISTEN
    found = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in table:
                found.append((pid, *table[link[8:-1]]))
    return found


def end_tagged_processes(tag: str, grace_s: float) -> dict[int, str]:
    """Wait up to ``grace_s`` for the tagged processes to exit on their own, then SIGKILL those left (by pid)."""
    deadline = time.monotonic() + grace_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.integration
def test_a_killed_driver_is_resumed_by_running_the_same_command_again(tiny_teacher, tmp_path):
    """``amad distill`` (its own local Ray, on loopback) is SIGKILLed with its process group once epoch 1's
    checkpoint is committed; the same command then resumes after the last epoch committed (1, or the one in
    flight at the kill) and finishes all epochs, keeping epoch 1 as it was (not retrained) and logging to
    the same MLflow run."""
    values = yaml.safe_load(TINY.read_text())
    values.update(teacher=str(tiny_teacher), run_name="driver-killed")
    values["train"]["epochs"] = 6  # room for the epoch in flight at the kill to be committed, and more to resume
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(values))
    cfg = parse_config(values, DistillJobConfig, str(config))
    per_epoch = steps_per_epoch(cfg, tiny_teacher)
    workdir = tmp_path / "work"
    run_dir = workdir / "ray" / cfg.run_name
    command = [sys.executable, "-m", "pipeline.cli", "distill", "--config", str(config), "--workdir", str(workdir),
               "--name", cfg.run_name]

    tag = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="amad-cli-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    apply_loopback_env(env)
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", **{TAG_VARIABLE: tag})
    first_log = tmp_path / "first.log"
    driver = None
    try:
        with first_log.open("w") as log:
            driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while "epoch_0001" not in committed(run_dir):
            assert driver.poll() is None, f"the driver exited ({driver.returncode}) before epoch 1:\n{first_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no epoch-1 checkpoint after 300 s:\n{first_log.read_text()[-3000:]}"
            time.sleep(0.1)
        epoch1 = torch.load(run_dir / "epoch_0001" / names.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)

        # The driver's own Ray (GCS, raylet, dashboard, workers) is on loopback only.
        running = tagged_processes(tag)
        assert any("raylet" in line for line in running.values()) and any("RayTrainWorker" in line for line in running.values()), running
        sockets = tcp_sockets(running)
        assert sockets
        connected = [(running[pid][:60], local, remote) for pid, listening, local, remote in sockets if not listening]
        assert connected and all((local, remote) == (LOOPBACK, LOOPBACK) for _, local, remote in connected), connected
        # Listening: all on 127.0.0.1 but torch's c10d TCPStore (the DDP rendezvous) in the rank-0 worker,
        # which binds the wildcard address (torch has no setting for it); every worker reaches it at
        # MASTER_ADDR = 127.0.0.1 (test_distill.py checks that address).
        wildcard = [(pid, local) for pid, listening, local, _ in sockets if listening and local != LOOPBACK]
        assert all(local in ("0.0.0.0", "::") and "RayTrainWorker" in running[pid] for pid, local in wildcard), wildcard
        assert len(wildcard) <= 1, wildcard

        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        # Ray's workers and Train's controller are in process groups of their own; they exit once their
        # raylet is gone, and until then the controller may still commit the epoch in flight.
        left = end_tagged_processes(tag, grace_s=60)
        if left:
            warnings.warn(f"{len(left)} Ray processes of the killed driver outlived it by 60 s and were killed: {sorted(left.values())}")
        assert not tagged_processes(tag)
        killed_after = committed(run_dir)  # read once nothing of the killed run is left to commit more
        assert f"epoch_{cfg.train.epochs:04d}" not in killed_after, "the run finished before the driver was killed"

        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-5000:]
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        end_tagged_processes(tag, grace_s=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not tagged_processes(tag), "processes of the killed or resumed driver are left"

    resumed_at = int(killed_after[-1].removeprefix("epoch_"))
    assert f"resumed after epoch {resumed_at} (step {resumed_at * per_epoch})" in output, output[-5000:]
    summary = json.loads((run_dir / names.SUMMARY_FILE).read_text())
    history = summary["history"]
    assert [(m[names.EPOCH], m[names.STEP]) for m in history] == [(e, e * per_epoch) for e in range(1, cfg.train.epochs + 1)]
    # epoch 1 exactly as measured before the kill (its epoch_seconds and samples_per_s would differ if
    # retrained); its checkpoint may since have been pruned (checkpoints_to_keep: 2)
    assert history[0] == epoch1["history"][0]
    mlflow_record = json.loads((run_dir / names.MLFLOW_RUN_FILE).read_text())
    assert summary["mlflow"]["run_id"] == mlflow_record["run_id"]
    logged = mlflow_epochs(summary)
    assert logged.count(1) == 1 and set(logged) == set(range(1, cfg.train.epochs + 1)), logged
    assert_checkpoints_intact(run_dir, cfg.train.epochs, per_epoch)


# ---------------------------------------------------------------- reproducibility

ONE_WORKER = {"scaling.num_workers": 1, "scaling.cpus_per_worker": 1, "seed": 3}
TIMING = {names.SAMPLES_PER_S, names.EPOCH_SECONDS}  # wall-clock figures: differ between any two runs


@pytest.fixture(scope="module")
def uninterrupted_one_worker(ray_cluster, tiny_teacher, tmp_path_factory) -> dict:
    """The reference: the tiny preset on one worker, seed 3, run straight through (its summary)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return train_distill.main(tiny_config(tiny_teacher, run_name="seed-a", **ONE_WORKER), tmp_path_factory.mktemp("straight"))


def final_weights(summary: dict, epochs: int) -> dict[str, torch.Tensor]:
    return load_file(Path(summary["run_dir"]) / f"epoch_{epochs:04d}" / "model.safetensors")


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


@pytest.mark.integration
def test_the_same_seed_on_one_worker_gives_identical_losses_and_weights_twice(uninterrupted_one_worker, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = uninterrupted_one_worker
    second = train_distill.main(tiny_config(tiny_teacher, run_name="seed-b", **ONE_WORKER), tmp_path)

    assert first["run_dir"] != second["run_dir"] and first["mlflow"]["run_id"] != second["mlflow"]["run_id"]
    assert len(first["history"]) == 2
    for key in (names.TRAIN_LOSS, names.TRAIN_TASK_LOSS, names.TRAIN_LOGIT_KD_LOSS, names.TRAIN_ATTENTION_LOSS,
                names.VAL_LOSS, names.VAL_ACCURACY, names.STEP):
        assert [m[key] for m in first["history"]] == [m[key] for m in second["history"]], key  # exact
    weights = [final_weights(run, 2) for run in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.integration
@pytest.mark.parametrize("interruption", ["worker dies", "driver run again"])
def test_an_interrupted_run_ends_with_the_weights_of_an_uninterrupted_one(uninterrupted_one_worker, tiny_teacher, tmp_path, monkeypatch, interruption):
    """README: "Data order and seeds depend only on (seed, epoch), so resumed steps are the ones an
    uninterrupted run takes."

    Rank 0 exits four steps into epoch 2, after epoch 1's checkpoint is committed. "worker dies":
    ``max_failures=1``, Ray Train restarts the worker from that checkpoint within the same ``fit``.
    "driver run again": ``max_failures=0``, the run fails, and the same job is run again and resumes
    it. Either way the final weights must equal the uninterrupted run's *exactly*: one worker, fp32,
    one thread, so an uninterrupted run is bitwise reproducible (the test above), and any difference
    is the resume's (optimizer or schedule state lost, a step repeated or skipped, another data order).
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    straight = uninterrupted_one_worker
    base = tiny_config(tiny_teacher, **ONE_WORKER)
    per_epoch = steps_per_epoch(base, tiny_teacher)
    fail_at = per_epoch + 4
    retries = 1 if interruption == "worker dies" else 0
    cfg = tiny_config(tiny_teacher, run_name="interrupted", fail_at_step=fail_at, max_failures=retries, **ONE_WORKER)
    run_dir = tmp_path / "ray" / cfg.run_name
    if retries:
        summary = train_distill.main(cfg, tmp_path)
    else:
        from ray.train import TrainingFailedError

        with pytest.raises(TrainingFailedError):
            train_distill.main(cfg, tmp_path)
        assert committed(run_dir) == ["epoch_0001"]  # interrupted, not finished
        summary = train_distill.main(cfg, tmp_path)

    marker = run_dir / f".fail_at_step_{fail_at}"
    assert marker.is_file(), "the fault was not injected"
    # Continued from epoch 1's checkpoint (written before the fault and never again), and finished.
    written = {path.name: (path / names.TRAIN_STATE_FILE).stat().st_mtime for path in run_dir.glob("epoch_*")}
    assert written["epoch_0001"] < marker.stat().st_mtime < written["epoch_0002"], written
    assert summary["latest"][names.STEP] == cfg.train.epochs * per_epoch
    got, want = final_weights(summary, cfg.train.epochs), final_weights(straight, cfg.train.epochs)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"
    assert untimed(summary["history"]) == untimed(straight["history"])  # exact: losses, accuracies, lr, steps
