"""``benchmarks/gpu_check.sh`` without a GPU: its plan, its JSON, and the commands it would run on one.

No Ray starts here. The script's dry run is run twice -- as on a GPU machine (``--mode gpu``) and as
on this one (``--mode auto``) -- and its JSON is checked: every step in order, which are skipped here
and why, and that each ``amad`` command it would run parses with our CLI. The recording half of
:mod:`benchmarks/gpu_check.py` (a step's figures turning into a failure, the exit status, ending what a
step left running) is checked on hand-made files. The real run is the device's: ``docs/gpu.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.config import DistillJobConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["preflight", "distill", "export", "serve", "loss_overhead", "serve_latency"]
DEVICE_RUN_S = 8 * 60  # what one device command may take, with room left to rerun it (docs/gpu.md)


def load_helper():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def dry_run(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "AMAD_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--mode", mode, "--run-dir", str(tmp_path / "run"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def has_gpu() -> bool:
    import torch

    return bool(shutil.which("nvidia-smi")) and torch.cuda.is_available()


@pytest.fixture(scope="module")
def gpu_plan(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("gpu-plan"), "gpu")


@pytest.fixture(scope="module")
def here_plan(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("here-plan"), "auto")


def by_name(result: dict) -> dict[str, dict]:
    return {step["name"]: step for step in result["steps"]}


def test_json_holds_every_step_in_order_and_the_machine(gpu_plan):
    _, result = gpu_plan
    assert result["schema"] == "amad.gpu_check/1"
    assert result["dry_run"] is True and result["passed"] is False  # a plan is not a result
    assert [step["name"] for step in result["steps"]] == STEPS
    for step in result["steps"]:
        assert {"name", "status", "reason", "seconds", "rc", "limit_s", "command", "amad", "figures"} <= set(step)
        assert step["status"] in ("ok", "failed", "skipped", "planned")
        assert step["command"], step["name"]
    machine = result["machine"]
    for key in ("gpu", "cuda_available", "torch", "onnxruntime", "ort_providers", "cpus", "commit"):
        assert key in machine
    assert machine["torch"] and machine["onnxruntime"]
    assert machine["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", machine["commit"])
    assert result["command"].startswith("benchmarks/gpu_check.sh") and "--dry-run" in result["command"]
    assert result["budget_s"] <= DEVICE_RUN_S


def test_gpu_plan_commands_parse_with_our_cli(gpu_plan):
    _, result = gpu_plan
    steps = by_name(result)
    for name in ("distill", "export", "serve"):
        assert steps[name]["status"] == "planned", steps[name]
    parser = build_parser()
    parsed = {}
    for step in result["steps"]:
        for argv in step["amad_argv"]:
            parsed[argv[0]] = parser.parse_args(argv)  # SystemExit (a failed test) if a flag is unknown
    assert set(parsed) == {"distill", "export", "serve", "loadtest"}

    distill = parsed["distill"]
    assert distill.gpu and distill.workers == 1
    cfg = load_config(distill.config, DistillJobConfig)
    assert cfg.scaling.use_gpu is True and cfg.scaling.num_workers == 1
    assert cfg.scaling.precision == "bf16"  # autocast on GPU (pipeline/distill_worker.py)
    teacher = json.loads((Path(cfg.teacher) / "benchmark.json").read_text())
    steps_per_epoch = cfg.data.train_scenes * teacher["questions_per_scene"] // cfg.train.batch_size
    assert 200 <= steps_per_epoch * cfg.train.epochs <= 1000  # "a few hundred steps"

    assert parsed["export"].config == Path("tune_configs/export.yaml") and parsed["export"].register == "gpu-check-student"
    serve = parsed["serve"]
    assert serve.replica_gpus == 1 and serve.model == "models:/gpu-check-student@champion"
    assert parsed["loadtest"].url == f"http://127.0.0.1:{serve.port}/v1/answer"
    assert "--expect CUDAExecutionProvider" in steps["serve"]["command"]


@pytest.mark.parametrize("name, flags", [("loss_overhead", ("--device", "cuda")), ("serve_latency", ("--cluster-cpus", "--replica-cpus"))])
def test_gpu_plan_benchmark_flags_exist(gpu_plan, name, flags):
    _, result = gpu_plan
    argv = by_name(result)[name]["argv"]
    assert argv[1] == f"benchmarks/{name}.py"
    for flag in flags:
        assert flag in argv
    helptext = subprocess.run([sys.executable, str(ROOT / argv[1]), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    for flag in (a for a in argv[2:] if a.startswith("--")):
        assert flag in helptext, f"{name} has no {flag}"


def test_here_the_plan_says_what_is_skipped_and_why(here_plan):
    if has_gpu():
        pytest.skip("this machine has a GPU: the CPU plan is not the one it makes")
    proc, result = here_plan
    assert result["mode"] == "cpu"
    assert "no CUDA device" in result["mode_reason"] or "nvidia-smi: none" in result["mode_reason"]
    steps = by_name(result)
    assert steps["preflight"]["status"] == "ok"  # the dry run runs the preflight only
    assert result["skipped"] == {"serve_latency": steps["serve_latency"]["reason"]}
    assert "16-core" in result["skipped"]["serve_latency"]
    assert [name for name, step in steps.items() if step["status"] == "planned"] == ["distill", "export", "serve", "loss_overhead"]
    assert "SKIPPED here: serve_latency" in proc.stdout  # and said on stdout, in the table
    argv = {step["name"]: step["amad_argv"] for step in result["steps"]}
    distill = build_parser().parse_args(argv["distill"][0])
    assert not distill.gpu and load_config(distill.config, DistillJobConfig).scaling.use_gpu is False
    assert build_parser().parse_args(argv["serve"][0]).replica_gpus == 0
    assert "--device cpu" in steps["loss_overhead"]["command"]


def test_a_failed_check_fails_the_step_and_the_exit_status(tmp_path):
    """Step outcomes from hand-made files: a step that exited 0 but ran on the CPU is a failure."""
    helper = load_helper()
    run = tmp_path / "run"
    helper.prepare(run, "gpu", dry_run=False)
    (run / "ray" / "gpu-check").mkdir(parents=True)
    (run / "ray" / "gpu-check" / "summary.json").write_text(json.dumps(
        {"use_gpu": False, "num_workers": 1, "best_checkpoint": "x", "best": {"val_accuracy": 0.4}, "latest": {"step": 312}}))
    (run / "exports" / "gpu-check").mkdir(parents=True)
    (run / "exports" / "gpu-check" / "report.json").write_text(json.dumps(
        {"shipped": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "precision": "fp32"},
         "gates": {"parity_fp32": {"max_abs_logit_diff": 2e-5}}, "passed": True}))
    common = ["--run-dir", str(run), "--mode", "gpu"]
    assert helper.main(["record", *common, "--name", "distill", "--status", "ok", "--rc", "0", "--", "python", "-m", "pipeline.cli", "distill"]) == 0
    assert helper.main(["record", *common, "--name", "export", "--status", "ok", "--rc", "0", "--", "x"]) == 0
    assert helper.main(["record", *common, "--name", "serve_latency", "--status", "skipped", "--reason", "budget spent", "--", "x"]) == 0
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["status"] for s in steps] == ["failed", "ok", "skipped"]
    assert steps[0]["reason"] == "the workers trained on CPU" and steps[0]["figures"]["steps"] == 312
    assert steps[0]["amad"] == ["amad distill"] and steps[1]["figures"]["max_abs_logit_diff"] == 2e-5

    out = tmp_path / "gpu_check.json"
    report = ["report", "--run-dir", str(run), "--out", str(out), "--mode", "gpu", "--mode-reason", "test",
              "--command", "test", "--started", str(time.time()), "--budget", "420"]
    assert helper.main(report) == 1
    result = json.loads(out.read_text())
    assert result["failed"] == ["distill"] and result["skipped"] == {"serve_latency": "budget spent"} and not result["passed"]

    (run / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in steps[1:]) + "\n")  # only ok and skipped
    assert helper.main(report) == 0 and json.loads(out.read_text())["passed"]


def test_end_session_ends_what_a_step_left_running():
    helper = load_helper()
    leader = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(helper.session_pids(leader.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(helper.session_pids(leader.pid)) == 3
        assert helper.end_session(leader.pid, grace_s=5) == 3
        assert helper.session_pids(leader.pid) == []
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
