"""The Python half of ``benchmarks/gpu_check.sh``: detects the machine, writes the distillation config,
runs the Serve step, records each step's figures and writes ``gpu_check.json``.

The shell script is the recipe (which command runs, in which order, with which time limit); this file
only does what is awkward in bash. Its subcommands read and write files under the run directory
(``--run-dir``), never elsewhere, and import nothing heavy at the top (the dry run stays fast).

``gpu_check.json`` (:func:`report`)::

    {"schema": "amad.gpu_check/1", "command", "mode": "gpu"|"cpu", "mode_reason", "dry_run",
     "started_at", "seconds", "budget_s", "run_dir", "passed", "failed": [names], "skipped": {name: reason},
     "machine": {"gpu", "gpu_driver", "gpu_memory", "cuda_available", "torch", "torch_cuda", "onnxruntime",
                 "onnxruntime_package", "ort_providers", "ray", "mlflow", "transformers", "python",
                 "cpus", "platform", "commit", "dirty"},
     "outside": {"ray_tmpdir", "tmpdir", "new_entries"},
     "steps": [{"name", "status": "ok"|"failed"|"skipped"|"planned", "reason", "seconds", "rc",
                "limit_s", "command", "amad": ["amad ..."], "log", "log_tail", "figures": {...}}]}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "amad.gpu_check/1"
STEPS = ("preflight", "distill", "export", "serve", "loss_overhead", "serve_latency")
RUN_NAME = "gpu-check"  # the distillation run, the export directory
MODEL = "gpu-check-student"  # the registered model the Serve step answers with
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
TEACHER = ROOT / "weights" / "teacher-default"
MARKER = ".gpu_check"  # in a run directory this script made: only such a directory is cleared
LOADTEST = {"requests": 64, "concurrency": 8}

# Modules each step imports (found with importlib.util.find_spec: nothing is imported to check).
COMMON = ("torch", "transformers", "tokenizers", "safetensors", "pydantic", "yaml", "PIL")  # pipeline.config, amad
NEEDS = {
    "distill": (*COMMON, "ray", "mlflow"),
    "export": (*COMMON, "onnx", "onnxruntime", "onnxscript", "mlflow"),
    "serve": (*COMMON, "ray", "fastapi", "aiohttp", "mlflow", "onnxruntime"),
    "loss_overhead": COMMON,
    "serve_latency": (*COMMON, "ray", "fastapi", "aiohttp", "mlflow", "onnx", "onnxruntime", "onnxscript"),
}
ALL_MODULES = sorted({name for names in NEEDS.values() for name in names})

# The distillation of the check: the default teacher (12 heads x 4 layers) into a 4-head 2-layer
# student with AMAD, one Ray Train worker. GPU: 1,000 scenes (10,000 questions) / batch 64 = 156 steps
# per epoch, 2 epochs = 312 steps. CPU: 20 scenes / batch 32 = 6 steps, to prove the plumbing only.
DISTILL_SIZES = {
    "gpu": {"train_scenes": 1000, "val_scenes": 100, "epochs": 2, "batch_size": 64, "cpus_per_worker": 4, "threads": 4},
    "cpu": {"train_scenes": 20, "val_scenes": 5, "epochs": 1, "batch_size": 32, "cpus_per_worker": 1, "threads": 1},
}


def _log(message: str) -> None:
    print(f"gpu_check: {message}", flush=True)


# ---------------------------------------------------------------- the machine


def nvidia_smi() -> dict | None:
    """Name, driver and memory of the first GPU ``nvidia-smi`` lists; None without a working nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
    except (subprocess.SubprocessError, OSError, IndexError):
        return None
    name, driver, memory = (part.strip() for part in (line.split(",") + ["", ""])[:3])
    return {"gpu": name, "gpu_driver": driver, "gpu_memory": memory}


def torch_cuda() -> tuple[bool, str]:
    """``(torch sees a CUDA device, why not)`` (imports torch)."""
    if util.find_spec("torch") is None:
        return False, "torch is not installed"
    import torch

    if torch.cuda.is_available():
        return True, f"torch {torch.__version__} sees {torch.cuda.get_device_name()}"
    return False, f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device"


def detect(requested: str) -> tuple[str, str]:
    """``(mode, reason)``: gpu where nvidia-smi answers and torch sees CUDA, else cpu; ``requested`` forces one."""
    smi = nvidia_smi()
    cuda, why = torch_cuda()
    seen = f"nvidia-smi: {smi['gpu'] if smi else 'none'}; {why}"
    if requested != "auto":
        return requested, f"--mode {requested} ({seen})"
    return ("gpu" if smi and cuda else "cpu"), seen


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    facts = {"gpu": None, "gpu_driver": None, "gpu_memory": None, **(nvidia_smi() or {})}
    cuda, _ = torch_cuda()
    facts["cuda_available"] = cuda
    facts["torch"] = version("torch")
    if facts["torch"]:
        import torch

        facts["torch_cuda"] = torch.version.cuda
    ort_package = next((p for p in ("onnxruntime-gpu", "onnxruntime") if version(p)), None)
    facts["onnxruntime"], facts["onnxruntime_package"] = (version(ort_package), ort_package) if ort_package else (None, None)
    facts["ort_providers"] = None
    if ort_package:
        import onnxruntime

        facts["ort_providers"] = onnxruntime.get_available_providers()
    for package in ("ray", "mlflow", "transformers"):
        facts[package] = version(package)
    facts["python"] = platform.python_version()
    facts["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts["platform"] = platform.platform()
    facts["commit"], facts["dirty"] = commit()
    return facts


def commit() -> tuple[str | None, bool | None]:
    """HEAD and whether the tree differs from it; ``$AMAD_COMMIT`` where there is no git checkout (a copied tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
        return head, bool(status.strip())
    except (subprocess.SubprocessError, OSError):
        return os.environ.get("AMAD_COMMIT"), None


def outside_listing() -> list[str]:
    """The top level of /tmp, the home directory and its ~/.ray, ~/.cache, ~/.config: where nothing may be left."""
    home = Path.home()
    found = set()
    for directory in (Path("/tmp"), home, home / ".ray", home / ".cache", home / ".config"):
        try:
            found.update(str(entry) for entry in directory.iterdir())
        except OSError:
            pass
    return sorted(found)


# ---------------------------------------------------------------- set-up


def prepare(run_dir: Path, mode: str, dry_run: bool) -> None:
    """Make (or clear) the run directory and write the distillation config for ``mode``."""
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / MARKER).exists():
        raise SystemExit(f"gpu_check: {run_dir} holds files this script did not write ({MARKER} missing): give an empty or new --run-dir")
    if run_dir.exists() and not dry_run:  # a fresh run every time: a finished distillation of the same name would resume
        for entry in run_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (run_dir / "steps.jsonl").unlink(missing_ok=True)
    for sub in ("logs", "tmp", "cache"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("written by benchmarks/gpu_check.sh; the next run clears this directory\n")
    (run_dir / "distill.yaml").write_text(distill_yaml(mode))
    (run_dir / "outside_before.json").write_text(json.dumps(outside_listing()))


def distill_yaml(mode: str) -> str:
    size = DISTILL_SIZES[mode]
    # Precision: scaling.precision bf16 is torch.autocast("cuda", bfloat16) around the forwards and the
    # loss in each GPU worker (pipeline/distill_worker.py; no GradScaler, which only fp16 needs);
    # CPU workers always train in fp32. The backend follows use_gpu: NCCL on GPU, gloo on CPU.
    use_gpu = "true" if mode == "gpu" else "false"
    return f"""\
# Written by benchmarks/gpu_check.sh ({mode} mode): amad distill --config <this file> --workdir <run dir>
# {'GPU: ~312 optimizer steps in bf16 autocast over NCCL (1 worker, 1 GPU)' if mode == 'gpu' else 'CPU fallback: a few steps in fp32 over gloo, to prove the plumbing'}
teacher: {TEACHER}
data:
  train_scenes: {size['train_scenes']}
  val_scenes: {size['val_scenes']}
student:
  heads: 4
  layers: 2
  head_dim: 16
objective:
  method: amad
  amad_temperature: 1.0
  layer_map: uniform
train:
  epochs: {size['epochs']}
  batch_size: {size['batch_size']}
  lr: 1.0e-3
  warmup_steps: 30
scaling:
  num_workers: 1
  cpus_per_worker: {size['cpus_per_worker']}
  use_gpu: {use_gpu}
  threads_per_worker: {size['threads']}
  precision: bf16             # autocast dtype on GPU; CPU workers train in fp32
run_name: {RUN_NAME}
checkpoints_to_keep: 1
max_failures: 0
seed: 0
eval_batch_size: 256
"""


def preflight(run_dir: Path, mode: str) -> int:
    """Which modules (and, on GPU, which CUDA pieces) are missing; writes ``preflight.json``."""
    missing = [name for name in ALL_MODULES if util.find_spec(name) is None]
    facts = {"missing": missing, "mode": mode}
    problems = [f"missing modules: {', '.join(missing)}"] if missing else []
    if mode == "gpu":
        cuda, why = torch_cuda()
        facts["torch_cuda"] = why
        if not cuda:
            problems.append(why)
        if "onnxruntime" not in missing:
            import onnxruntime

            facts["ort_providers"] = onnxruntime.get_available_providers()
            if CUDA not in facts["ort_providers"]:
                problems.append(f"onnxruntime {onnxruntime.__version__} has no {CUDA} (the onnxruntime-gpu wheel has it)")
    facts["problems"] = problems
    (run_dir / "preflight.json").write_text(json.dumps(facts, indent=2))
    for line in problems or ["every module the steps import is here"]:
        _log(f"preflight: {line}")
    return 1 if problems else 0


def best_checkpoint(run_dir: Path) -> Path | None:
    summary = run_dir / "ray" / RUN_NAME / "summary.json"
    if not summary.is_file():
        return None
    return Path(json.loads(summary.read_text())["best_checkpoint"])


def export_report(run_dir: Path) -> dict | None:
    path = run_dir / "exports" / RUN_NAME / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cannot_run(run_dir: Path, step: str, dry_run: bool) -> str | None:
    """Why ``step`` cannot run here (a module missing, an earlier step's output missing), else None."""
    pre = run_dir / "preflight.json"
    missing = json.loads(pre.read_text())["missing"] if pre.is_file() else []
    lacking = [name for name in NEEDS.get(step, ()) if name in missing]
    if lacking:
        return f"needs {', '.join(lacking)} (not installed here)"
    if dry_run:
        return None
    if step == "export" and best_checkpoint(run_dir) is None:
        return "no checkpoint: the distill step did not finish"
    if step == "serve" and not (export_report(run_dir) or {}).get("registry"):
        return f"no registered model: the export step did not register {MODEL}"
    return None


# ---------------------------------------------------------------- processes


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (from /proc): what a step started, whatever its process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state ppid pgrp session ...; a zombie is gone already (only its parent's wait is left)
        if int(fields[3]) == sid and fields[0] != "Z" and int(stat.parent.name) != os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def end_session(sid: int, grace_s: float = 10.0) -> int:
    """SIGTERM what is left of session ``sid``, SIGKILL after ``grace_s``; returns how many were left."""
    left = session_pids(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            break
    return len(left)


def loadtest_argv(port: int, out: Path) -> list[str]:
    return ["loadtest", "--url", f"http://127.0.0.1:{port}/v1/answer", "--requests", str(LOADTEST["requests"]),
            "--concurrency", str(LOADTEST["concurrency"]), "--out", str(out)]


def serve_answer(run_dir: Path, expect: str, start_s: float, serve_cmd: list[str]) -> int:
    """Start ``serve_cmd`` (``... amad serve ... --port P``) in its own session, wait for its URL and
    ``/healthz``, run ``amad loadtest`` against it, read ``/v1/model``, stop it with SIGTERM.

    Writes ``serve.json``: start-up seconds, the loadtest summary, the providers the replica reports.
    Fails (1) when a request fails or the replica's first provider is not ``expect``.
    """
    import urllib.request

    port = int(serve_cmd[serve_cmd.index("--port") + 1])
    base = f"http://127.0.0.1:{port}"
    log = run_dir / "logs" / "serve.server.log"
    facts: dict = {"url": f"{base}/v1/answer", "expect_provider": expect}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    started = time.monotonic()
    with log.open("w") as output:
        server = subprocess.Popen(serve_cmd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        while time.monotonic() - started < start_s:
            if server.poll() is not None:
                raise RuntimeError(f"amad serve exited with {server.returncode} before answering (see {log})")
            if "amad serve: serving" in log.read_text(errors="replace"):
                try:
                    with opener.open(f"{base}/healthz", timeout=5) as response:
                        facts["healthz"] = json.loads(response.read())
                    break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"amad serve did not answer /healthz within {start_s:.0f} s (see {log})")
        facts["startup_s"] = time.monotonic() - started
        out = run_dir / "loadtest.json"
        loadtest = [*serve_cmd[: serve_cmd.index("serve")], *loadtest_argv(port, out)]
        _log(f"serve: up in {facts['startup_s']:.1f} s; {shlex.join(loadtest)}")
        facts["loadtest_rc"] = subprocess.run(loadtest, cwd=ROOT, timeout=60).returncode
        facts["loadtest"] = json.loads(out.read_text()) if out.is_file() else None
        with opener.open(f"{base}/v1/model", timeout=30) as response:
            model = json.loads(response.read())
        facts["model"] = {key: model.get(key) for key in ("name", "version", "alias", "heads", "layers", "val_accuracy", "providers")}
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        facts["error"] = str(err)
    finally:
        server.send_signal(signal.SIGTERM)  # amad serve shuts Serve and its Ray cluster down on SIGTERM
        try:
            facts["server_rc"] = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            facts["server_rc"] = None
        facts["left_after_sigterm"] = end_session(server.pid)
        (run_dir / "serve.json").write_text(json.dumps(facts, indent=2))
    providers = (facts.get("model") or {}).get("providers") or []
    ok = ("error" not in facts and facts.get("loadtest_rc") == 0 and providers[:1] == [expect])
    _log(f"serve: providers {providers}, expected {expect} first; {'ok' if ok else 'FAILED: ' + facts.get('error', 'see serve.json')}")
    return 0 if ok else 1


# ---------------------------------------------------------------- recording


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def figures(run_dir: Path, step: str, mode: str) -> tuple[dict, str | None]:
    """The key figures of a finished ``step`` and, where a check on them fails, why."""
    problem = None
    if step == "preflight":
        facts = read_json(run_dir / "preflight.json") or {}
        return ({k: facts.get(k) for k in ("missing", "ort_providers", "torch_cuda") if k in facts},
                "; ".join(facts.get("problems") or []) or None)
    if step == "distill":
        summary = read_json(run_dir / "ray" / RUN_NAME / "summary.json")
        job = read_json(run_dir / "ray" / RUN_NAME / "distill_job.json") or {}
        if not summary:
            return {}, "no summary.json"
        latest, best = summary.get("latest") or {}, summary.get("best") or {}
        use_gpu = summary.get("use_gpu")
        precision = job.get("scaling", {}).get("precision") if use_gpu else "fp32"
        result = {"steps": latest.get("step"), "epochs": latest.get("epoch"), "val_accuracy": best.get("val_accuracy"),
                  "samples_per_s": latest.get("samples_per_s"), "epoch_seconds": latest.get("epoch_seconds"),
                  "use_gpu": use_gpu, "backend": "nccl" if use_gpu else "gloo", "precision": precision,
                  "workers": summary.get("num_workers"), "best_checkpoint": summary.get("best_checkpoint")}
        if mode == "gpu" and not use_gpu:
            problem = "the workers trained on CPU"
        return result, problem
    if step == "export":
        report = export_report(run_dir)
        if not report:
            return {}, "no report.json"
        shipped = report.get("shipped") or {}
        parity = (report.get("gates") or {}).get("parity_fp32") or {}
        result = {"providers": shipped.get("providers"), "precision": shipped.get("precision"), "passed": report.get("passed"),
                  "max_abs_logit_diff": parity.get("max_abs_logit_diff"), "top1_agreement": parity.get("top1_agreement"),
                  "parity_examples": parity.get("examples"), "p50_ms_b1": (report.get("latency_ms_b1") or {}).get("p50"),
                  "val_accuracy": report.get("val_accuracy"), "failure": report.get("failure"),
                  "registered": {k: (report.get("registry") or {}).get(k) for k in ("model", "version", "alias")}}
        expect = CUDA if mode == "gpu" else CPU
        if report.get("failure"):
            problem = f"gate failed: {report['failure']}"
        elif (shipped.get("providers") or [None])[0] != expect:
            problem = f"parity gate ran on {shipped.get('providers')}, expected {expect} first"
        return result, problem
    if step == "serve":
        facts = read_json(run_dir / "serve.json") or {}
        load = facts.get("loadtest") or {}
        result = {"providers": (facts.get("model") or {}).get("providers"), "version": (facts.get("model") or {}).get("version"),
                  "startup_s": facts.get("startup_s"), "requests": load.get("requests"), "ok": load.get("ok"),
                  "errors_by_status": load.get("errors_by_status"), "p50_ms": load.get("p50_ms"), "p99_ms": load.get("p99_ms"),
                  "throughput_rps": load.get("throughput_rps"), "server_rc": facts.get("server_rc"),
                  "left_after_sigterm": facts.get("left_after_sigterm"), "error": facts.get("error")}
        expect = facts.get("expect_provider")
        if facts.get("error"):
            problem = facts["error"]
        elif load.get("errors_by_status") or not load.get("ok"):
            problem = f"amad loadtest: {load.get('ok')} of {load.get('requests')} answered, errors {load.get('errors_by_status')}"
        elif (result["providers"] or [None])[0] != expect:
            problem = f"the replica runs on {result['providers']}, expected {expect} first"
        return result, problem
    if step == "loss_overhead":
        out = read_json(run_dir / "loss_overhead.json")
        if not out:
            return {}, "no loss_overhead.json"
        config = out["config"]
        return {"device": config.get("device"), "gpu": config.get("gpu"), "batch_size": config["batch_size"], "steps": config["steps"],
                "step_ms_amad": out["step_ms"]["amad"], "step_ms_logit_kd": out["step_ms"]["logit_kd"],
                "ratio_amad_vs_logit_kd": out["ratio_amad_vs_logit_kd"], "meets_target": out["meets_target"]}, None
    if step == "serve_latency":
        out = read_json(run_dir / "serve_latency.json")
        if not out:
            return {}, "no serve_latency.json"
        keys = ("ort_p50_ms", "http_p50_ms", "http_p99_ms", "rps_noop_c32", "rps_batched_c32", "rps_unbatched_c32",
                "teacher_rps_batched_c32", "teacher_rps_unbatched_c32")
        return {**{k: out.get(k) for k in keys}, "settings": out.get("settings"), "targets": out.get("targets")}, None
    return {}, None


def amad_commands(argv: list[str]) -> list[list[str]]:
    """The ``amad`` argument lists inside a step's command (after ``-m pipeline.cli``)."""
    found = []
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "pipeline.cli":
            found.append(argv[i + 2 :])
    if found and found[0] and found[0][0] == "serve":  # the Serve step also runs amad loadtest
        port = int(found[0][found[0].index("--port") + 1])
        found.append(loadtest_argv(port, Path(argv[argv.index("--run-dir") + 1]) / "loadtest.json"))
    return found


def record(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    entry = {"name": args.name, "status": args.status, "reason": args.reason, "seconds": args.seconds, "rc": args.rc,
             "limit_s": args.limit, "command": shlex.join(args.argv) if args.argv else None,
             "argv": args.argv or None, "amad": [shlex.join(["amad", *a]) for a in amad_commands(args.argv)],
             "amad_argv": amad_commands(args.argv), "log": args.log, "figures": {}}
    if args.status in ("ok", "failed"):
        entry["figures"], problem = figures(run_dir, args.name, args.mode)
        if problem and not (args.status == "failed" and entry["reason"]):  # a timeout stays the reason
            entry["status"], entry["reason"] = "failed", problem
        elif args.status == "failed" and not entry["reason"]:
            entry["reason"] = f"exit status {args.rc}"
        if entry["status"] == "failed" and args.log and Path(args.log).is_file():
            entry["log_tail"] = Path(args.log).read_text(errors="replace").splitlines()[-15:]
    with (run_dir / "steps.jsonl").open("a") as steps:
        steps.write(json.dumps(entry) + "\n")
    return 0


# ---------------------------------------------------------------- the report


def describe(step: dict) -> str:
    f = step.get("figures") or {}

    def num(key, fmt="{:.3g}"):
        value = f.get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "?"

    if step["status"] == "planned":  # the command, short: amad ..., or python <script> ...
        argv = step.get("argv") or [""]
        return (step.get("amad") or [shlex.join([Path(argv[0]).name, *argv[1:]])])[0][:110]
    if step["status"] == "skipped" or (step["status"] == "failed" and not f):
        return step.get("reason") or ""
    if step["status"] == "failed":
        return f"FAILED: {step.get('reason')}"[:160]
    name = step["name"]
    if name == "preflight":
        return f"missing: {', '.join(f.get('missing') or []) or 'nothing'}" + (f"; ort {f['ort_providers']}" if f.get("ort_providers") else "")
    if name == "distill":
        return (f"{num('steps', '{}')} steps, {f.get('precision')} {f.get('backend')}, val acc {num('val_accuracy', '{:.3f}')}, "
                f"{num('samples_per_s', '{:.0f}')} samples/s")
    if name == "export":
        return f"{(f.get('providers') or ['?'])[0]}, parity {num('max_abs_logit_diff', '{:.1e}')}, p50 {num('p50_ms_b1', '{:.2f}')} ms"
    if name == "serve":
        return (f"{(f.get('providers') or ['?'])[0]}, {f.get('ok')}/{f.get('requests')} ok, p50 {num('p50_ms', '{:.1f}')} ms, "
                f"up in {num('startup_s', '{:.0f}')} s")
    if name == "loss_overhead":
        return f"{f.get('gpu') or f.get('device')}: amad {num('step_ms_amad', '{:.1f}')} ms vs logit_kd {num('step_ms_logit_kd', '{:.1f}')} ms ({num('ratio_amad_vs_logit_kd', '{:.3f}')}x)"
    if name == "serve_latency":
        return f"http p50 {num('http_p50_ms', '{:.2f}')} ms, batched c32 {num('rps_batched_c32', '{:.0f}')} req/s (no-op {num('rps_noop_c32', '{:.0f}')})"
    return ""


def report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    lines = (run_dir / "steps.jsonl").read_text().splitlines() if (run_dir / "steps.jsonl").is_file() else []
    steps = [json.loads(line) for line in lines]
    before = set(read_json(run_dir / "outside_before.json") or [])
    failed = [s["name"] for s in steps if s["status"] == "failed"]
    result = {
        "schema": SCHEMA,
        "command": args.command,
        "mode": args.mode,
        "mode_reason": args.mode_reason,
        "dry_run": args.dry_run,
        "started_at": datetime.fromtimestamp(args.started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - args.started, 1),
        "budget_s": args.budget,
        "run_dir": str(run_dir),
        "passed": not failed and not args.dry_run,
        "failed": failed,
        "skipped": {s["name"]: s["reason"] for s in steps if s["status"] == "skipped"},
        "machine": machine(),
        "outside": {"ray_tmpdir": os.environ.get("RAY_TMPDIR"), "tmpdir": os.environ.get("TMPDIR"),
                    "new_entries": sorted(set(outside_listing()) - before)},
        "steps": steps,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    gpu = result["machine"]["gpu"] or "no GPU"
    print(f"\ngpu_check ({args.mode} mode{', dry run' if args.dry_run else ''}) on {gpu}, {result['machine']['cpus']} CPUs, "
          f"commit {(result['machine']['commit'] or 'unknown')[:10]}, {result['seconds']:.0f} s of a {args.budget:.0f} s budget")
    print(f"{'step':<14} {'status':<8} {'seconds':>8}  figures / reason")
    for step in steps:
        seconds = f"{step['seconds']:.1f}" if isinstance(step.get("seconds"), (int, float)) else "-"
        print(f"{step['name']:<14} {step['status']:<8} {seconds:>8}  {describe(step)}")
    skipped = result["skipped"]
    if skipped:
        print(f"SKIPPED here: {'; '.join(f'{name}: {why}' for name, why in skipped.items())}")
    if result["outside"]["new_entries"]:
        print(f"left outside the run directory: {', '.join(result['outside']['new_entries'])}")
    print(f"wrote {out}")
    return 1 if failed and not args.dry_run else 0


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="subcommand", required=True)
    p = commands.add_parser("detect", help="print '<mode>\\t<reason>'")
    p.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    p = commands.add_parser("prepare", help="make the run directory and write distill.yaml")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--dry-run", action="store_true")
    p = commands.add_parser("preflight", help="which modules and CUDA pieces are missing (preflight.json)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p = commands.add_parser("cannot-run", help="print why a step cannot run here and exit 0; exit 1 if it can")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", choices=STEPS, required=True)
    p.add_argument("--dry-run", action="store_true")
    p = commands.add_parser("best-checkpoint", help="print the distill step's best checkpoint")
    p.add_argument("--run-dir", required=True)
    commands.add_parser("free-port", help="print a free TCP port on loopback")
    p = commands.add_parser("end-session", help="end what is left of a session (by its id)")
    p.add_argument("--sid", type=int, required=True)
    p = commands.add_parser("serve-answer", help="start amad serve, ask it, check /v1/model, stop it")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--expect", choices=(CUDA, CPU), required=True)
    p.add_argument("--start-s", type=float, default=90.0)
    p.add_argument("serve_cmd", nargs=argparse.REMAINDER, help="-- then the amad serve command")
    p = commands.add_parser("record", help="append one step's outcome and figures to steps.jsonl")
    for flag in ("--run-dir", "--name", "--status", "--mode"):
        p.add_argument(flag, required=True)
    p.add_argument("--reason", default=None)
    p.add_argument("--rc", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--log", default=None)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the step's command")
    p = commands.add_parser("report", help="write gpu_check.json, print the table; exit 1 if a step failed")
    for flag in ("--run-dir", "--out", "--mode", "--mode-reason", "--command"):
        p.add_argument(flag, required=True)
    p.add_argument("--started", type=float, required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    for name in ("argv", "serve_cmd"):
        if getattr(args, name, None) and getattr(args, name)[0] == "--":
            setattr(args, name, getattr(args, name)[1:])

    if args.subcommand == "detect":
        print("\t".join(detect(args.mode)))
    elif args.subcommand == "prepare":
        prepare(Path(args.run_dir), args.mode, args.dry_run)
    elif args.subcommand == "preflight":
        return preflight(Path(args.run_dir), args.mode)
    elif args.subcommand == "cannot-run":
        why = cannot_run(Path(args.run_dir), args.step, args.dry_run)
        if why is None:
            return 1
        print(why)
    elif args.subcommand == "best-checkpoint":
        best = best_checkpoint(Path(args.run_dir))
        if best is None:
            return 1
        print(best)
    elif args.subcommand == "free-port":
        sys.path.insert(0, str(ROOT))
        from pipeline.local_cluster import free_port

        print(free_port())
    elif args.subcommand == "end-session":
        left = end_session(args.sid)
        if left:
            _log(f"ended {left} process(es) the step left running")
    elif args.subcommand == "serve-answer":
        return serve_answer(Path(args.run_dir), args.expect, args.start_s, args.serve_cmd)
    elif args.subcommand == "record":
        return record(args)
    elif args.subcommand == "report":
        return report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
