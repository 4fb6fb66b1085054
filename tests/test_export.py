"""`amad export`: ONNX export, the parity and int8 gates, and the MLflow Model Registry (real SQLite store).

The student is the tiny teacher's shape shrunk to 2 heads x 1 layer and trained in-process for a few
dozen steps (no Ray needed to make a checkpoint; `tests/test_distill.py` covers that). Most tests
use the TorchScript exporter, which takes a second; one test covers the default dynamo exporter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.text import TOKENIZER_FILE, load_tokenizer
from amad.models import StudentSpec, ViltAdapter
from amad.training import make_optimizer
from pipeline import export, names, onnx_tools
from pipeline.config import ConfigError, parse_config
from pipeline.export_config import ExportJobConfig
from pipeline.registry import CHALLENGER, CHAMPION, Registry

ROOT = Path(__file__).resolve().parents[1]


def train_tiny_student(teacher_dir: Path, directory: Path, steps: int = 40, seed: int = 0) -> Path:
    """A 2-head, 1-layer student of the tiny teacher, trained on the task loss, saved as a checkpoint."""
    torch.manual_seed(seed)
    teacher_config = ViltAdapter.load(teacher_dir).config
    model = ViltAdapter.build(ViltAdapter.student_config(teacher_config, StudentSpec(2, 1)), seed=seed).train()
    spec = BenchmarkSpec.from_dict(json.loads((teacher_dir / names.BENCHMARK_FILE).read_text()))
    train = make_split(spec, "train", load_tokenizer(teacher_dir))
    optimizer = make_optimizer(model, 3e-3, 0.0)
    batches = train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _, batch in zip(range(steps), batches):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=None).logits
        loss = torch.nn.functional.cross_entropy(loss, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(directory)
    shutil.copy(teacher_dir / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    shutil.copy(teacher_dir / names.BENCHMARK_FILE, directory / names.BENCHMARK_FILE)
    return directory


@pytest.fixture(scope="module")
def student_checkpoint(tiny_teacher, tmp_path_factory) -> Path:
    return train_tiny_student(tiny_teacher, tmp_path_factory.mktemp("run") / "epoch_0002")


def export_config(checkpoint: Path, teacher: Path | None = None, **changes) -> ExportJobConfig:
    values = {"checkpoint": str(checkpoint), "exporter": "torchscript", "latency_repeats": 5, "threads": 1,
              "gates": {"parity_examples": 64}}
    if teacher is not None:
        values["teacher"] = str(teacher)
    for key, value in changes.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return parse_config(values, ExportJobConfig, "test export")


def tamper_first_initializer(path: Path, scale: float = 1.5) -> None:
    """Scale the largest float weight of an ONNX file in place (as a corrupted deployment would be)."""
    model = onnx.load(str(path))
    target = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(target) * scale + 0.05
    target.CopyFrom(numpy_helper.from_array(array.astype(np.float32), target.name))
    onnx.save(model, str(path))


def registry_state(uri: str, name: str = "amad-student") -> dict:
    registry = Registry(uri)
    champion = registry.alias_version(name, CHAMPION)
    return {
        "versions": sorted((str(v.version), v.tags.get("weights_sha256")) for v in registry.versions(name)),
        "champion": str(champion.version) if champion else None,
    }


LOAD_BACK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import mlflow, mlflow.pyfunc, onnxruntime as ort
    uri, feed_file, out_file = sys.argv[1:4]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    feed = {k: np.asarray(v, dtype=np.int64 if k != "pixel_values" else np.float32)
            for k, v in json.loads(open(feed_file).read()).items()}
    pyfunc = mlflow.pyfunc.load_model("models:/amad-student@champion")
    logits_pyfunc = np.asarray(pyfunc.predict(feed)["logits"])
    local = mlflow.artifacts.download_artifacts("models:/amad-student@champion")
    import glob
    onnx_file = glob.glob(local + "/*.onnx")[0]
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    logits_ort = session.run(["logits"], feed)[0]
    json.dump({"pyfunc": logits_pyfunc.tolist(), "ort": logits_ort.tolist()}, open(out_file, "w"))
    """
)


@pytest.mark.integration
def test_export_gates_registers_and_a_separate_process_gets_the_same_answers(student_checkpoint, tiny_teacher, tmp_path):
    workdir = tmp_path / "work"
    report = export.main(export_config(student_checkpoint, tiny_teacher), workdir)

    assert report["passed"] is True
    parity = report["gates"]["parity_fp32"]
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0 and parity["examples"] == 64
    assert json.loads((workdir / "exports" / report["name"] / "report.json").read_text()) == json.loads(json.dumps(report))
    registered = report["registry"]
    assert (registered["model"], registered["version"], registered["alias"]) == ("amad-student", "1", CHAMPION)
    assert registered["teacher"] == {"name": "amad-teacher", "version": "1", "new": True}

    registry = Registry(registered["tracking_uri"])
    version = registry.alias_version("amad-student", CHAMPION)
    for key in ("teacher.model", "teacher.version", "parity.max_abs_logit_diff", "parity.top1_agreement",
                "latency.p50_ms_b1", "heads", "layers", "val_accuracy", "weights_sha256"):
        assert key in version.tags, key
    assert version.tags["heads"] == "2" and version.tags["layers"] == "1" and version.tags["teacher.version"] == "1"
    assert str(registry.alias_version("amad-teacher", CHAMPION).version) == "1"

    # A separate process: pyfunc from the registry alias and a plain ORT session on the downloaded file.
    student = ViltAdapter.load(student_checkpoint).eval()
    val = export.load_model_and_val(student_checkpoint).val
    batch = val.batch(torch.arange(9))
    feed = onnx_tools.model_inputs(batch)
    (tmp_path / "feed.json").write_text(json.dumps({k: v.tolist() for k, v in feed.items()}))
    (tmp_path / "load_back.py").write_text(LOAD_BACK)
    subprocess.run([sys.executable, str(tmp_path / "load_back.py"), registered["tracking_uri"], str(tmp_path / "feed.json"),
                    str(tmp_path / "out.json")], check=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = json.loads((tmp_path / "out.json").read_text())
    expected = onnx_tools.torch_logits(student, [batch])
    for name in ("pyfunc", "ort"):
        got = np.asarray(out[name], dtype=np.float32)
        assert np.abs(got - expected).max() <= 1e-4, name
        assert (got.argmax(-1) == expected.argmax(-1)).all(), name


@pytest.mark.integration
def test_second_registration_is_version_2_and_version_1_stays_intact(student_checkpoint, tiny_teacher, tmp_path):
    workdir = tmp_path / "work"
    first = export.main(export_config(student_checkpoint, tiny_teacher), workdir)
    registry = Registry(first["registry"]["tracking_uri"])
    v1 = registry.client.get_model_version("amad-student", "1")

    second = export.main(export_config(student_checkpoint, tiny_teacher), workdir)

    assert second["gates"]["parity_fp32"]["reused_export"] is True  # same checkpoint bytes: no re-export
    assert (second["registry"]["version"], second["registry"]["alias"]) == ("2", CHAMPION)
    assert second["registry"]["teacher"] == {"name": "amad-teacher", "version": "1", "new": False}
    again = registry.client.get_model_version("amad-student", "1")
    assert (again.source, again.tags) == (v1.source, v1.tags)
    assert [str(v.version) for v in registry.versions("amad-teacher")] == ["1"]


@pytest.mark.integration
def test_a_worse_student_is_registered_as_challenger_and_champion_stays(student_checkpoint, tiny_teacher, tmp_path):
    workdir = tmp_path / "work"
    first = export.main(export_config(student_checkpoint, tiny_teacher), workdir)
    untrained = train_tiny_student(tiny_teacher, tmp_path / "untrained" / "epoch_0001", steps=0, seed=1)
    report = export.main(export_config(untrained, tiny_teacher), workdir)
    # The premise, checked rather than assumed: 40 training steps beat none on this split (34 % vs ~21 % here).
    assert report["val_accuracy"] < first["val_accuracy"], (report["val_accuracy"], first["val_accuracy"])
    assert (report["registry"]["version"], report["registry"]["alias"]) == ("2", CHALLENGER)
    assert registry_state(report["registry"]["tracking_uri"])["champion"] == "1"


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["perturbed weight", "truncated file"])
def test_a_tampered_export_fails_the_gate_and_leaves_the_registry_alone(student_checkpoint, tiny_teacher, tmp_path, damage):
    workdir = tmp_path / "work"
    first = export.main(export_config(student_checkpoint, tiny_teacher), workdir)
    uri = first["registry"]["tracking_uri"]
    before = registry_state(uri)
    onnx_file = workdir / "exports" / first["name"] / "student.onnx"
    if damage == "perturbed weight":
        tamper_first_initializer(onnx_file)
    else:
        onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])

    with pytest.raises(export.GateFailed) as failure:
        export.main(export_config(student_checkpoint, tiny_teacher), workdir)

    message = str(failure.value)
    assert "parity gate failed" in message and str(onnx_file) in message and "--force-export" in message
    if damage == "perturbed weight":
        assert "max |logit diff|" in message and "top-1 agreement" in message
    else:
        assert "cannot load" in message
    assert registry_state(uri) == before == {"versions": [("1", first["weights_sha256"])], "champion": "1"}
    report = json.loads((onnx_file.parent / "report.json").read_text())
    assert report["passed"] is False and report["failure"] == message

    # --force-export makes a good file again, which passes and registers version 2.
    fixed = export.main(export_config(student_checkpoint, tiny_teacher, force_export=True), workdir)
    assert fixed["registry"]["version"] == "2" and fixed["gates"]["parity_fp32"]["reused_export"] is False


@pytest.mark.integration
def test_int8_is_gated_on_accuracy_and_reported(student_checkpoint, tiny_teacher, tmp_path):
    workdir = tmp_path / "work"
    report = export.main(export_config(student_checkpoint, tiny_teacher, int8=True, gates={"int8_max_accuracy_drop": 0.05}), workdir)
    gate = report["gates"]["int8_accuracy"]
    assert gate["drop"] == pytest.approx(gate["val_accuracy_fp32"] - gate["val_accuracy_int8"])
    assert gate["drop"] <= 0.05 and gate["examples"] == len(export.load_model_and_val(student_checkpoint).val)
    assert report["shipped"]["precision"] == "int8" and report["shipped"]["file"].endswith("student.int8.onnx")
    version = Registry(report["registry"]["tracking_uri"]).alias_version("amad-student", CHAMPION)
    assert version.tags["precision"] == "int8" and "int8.accuracy_drop" in version.tags



@pytest.mark.integration
def test_an_optimised_graph_that_fails_the_parity_gate_is_not_shipped(student_checkpoint, tiny_teacher, tmp_path, monkeypatch):
    import hashlib

    import mlflow

    real_optimize = onnx_tools.optimize_graph
    optimized_files = []

    def optimize_then_damage(src, dst, **kwargs):  # the optimiser's output, with one weight off
        how = real_optimize(src, dst, **kwargs)
        tamper_first_initializer(Path(dst))
        optimized_files.append(Path(dst))
        return how

    monkeypatch.setattr(onnx_tools, "optimize_graph", optimize_then_damage)
    workdir = tmp_path / "work"
    report = export.main(export_config(student_checkpoint, tiny_teacher, optimize=True), workdir)

    directory = workdir / "exports" / report["name"]
    plain, optimized = directory / "student.onnx", directory / "student.opt.onnx"
    assert optimized_files == [optimized] and optimized.is_file()  # the optimiser really ran
    gate = report["gates"]["parity_optimized"]
    assert gate["kept"] is False
    assert gate["max_abs_logit_diff"] > 1e-4 or gate["top1_agreement"] < 1.0
    assert gate["reason"].startswith("not kept: failed the parity gate") and "max |logit diff|" in gate["reason"]
    assert "p50_ms_optimized" not in gate  # a graph that failed parity is not even timed
    # The plain graph, which passed, ships and is the registered artefact; the job as a whole passed.
    assert report["passed"] is True and report["gates"]["parity_fp32"]["max_abs_logit_diff"] <= 1e-4
    assert report["shipped"]["file"] == str(plain) and report["shipped"]["precision"] == "fp32"
    assert json.loads((directory / "report.json").read_text())["gates"]["parity_optimized"] == gate

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    uri, registered = report["registry"]["tracking_uri"], report["registry"]
    source = Registry(uri).client.get_model_version_download_uri(registered["model"], registered["version"])
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "download"), tracking_uri=uri))
    shipped = [sha(f) for f in local.rglob("*.onnx")]
    assert shipped == [sha(plain)] and sha(optimized) not in shipped


@pytest.mark.parametrize(("fp32", "int8", "allowed", "passes"), [
    (0.80, 0.795, 0.01, True), (0.80, 0.79, 0.01, True), (0.80, 0.785, 0.01, False), (0.80, 0.81, 0.0, True), (0.5, 0.49, 0.0, False),
])
def test_int8_gate_allows_at_most_the_configured_accuracy_drop(fp32, int8, allowed, passes):
    gate = export.int8_gate(fp32, int8, allowed, examples=200)
    assert gate["drop"] == pytest.approx(fp32 - int8) and gate["examples"] == 200
    if passes:
        assert export.int8_failure(gate) is None
    else:
        message = export.int8_failure(gate)
        assert message.startswith("int8 gate failed: validation accuracy") and f"allowed {allowed * 100:.2f}" in message


@pytest.mark.integration
def test_dynamo_export_matches_pytorch_for_other_batch_sizes_and_text_lengths(student_checkpoint, tmp_path):
    student = ViltAdapter.load(student_checkpoint).eval()
    val = export.load_model_and_val(student_checkpoint).val
    path = onnx_tools.export_onnx(student, tmp_path / "s.onnx", val.batch(torch.arange(2)), exporter="dynamo")
    session = onnx_tools.open_session(path, threads=1)
    for rows, length in ((1, 16), (5, 16), (3, 9)):
        batch = val.batch(torch.arange(rows))
        batch = {**batch, "input_ids": batch["input_ids"][:, :length], "attention_mask": batch["attention_mask"][:, :length]}
        got = onnx_tools.ort_logits(session, [batch])
        expected = onnx_tools.torch_logits(student, [batch])
        assert got.shape == (rows, student.config.num_labels)
        assert np.abs(got - expected).max() <= 1e-4


TENSORRT, OPENVINO = "TensorrtExecutionProvider", "OpenVINOExecutionProvider"


@pytest.mark.parametrize(("available", "gpu", "chosen"), [
    # plain onnxruntime: CPU whether or not a GPU is there
    ([onnx_tools.CPU], False, [onnx_tools.CPU]),
    ([onnx_tools.CPU], True, [onnx_tools.CPU]),
    # onnxruntime-gpu lists CUDA and TensorRT even without a GPU: asking for CUDA there would fail
    ([TENSORRT, onnx_tools.CUDA, onnx_tools.CPU], False, [onnx_tools.CPU]),
    # ...and with one, CUDA first with CPU as the fallback; TensorRT is never asked for
    ([TENSORRT, onnx_tools.CUDA, onnx_tools.CPU], True, [onnx_tools.CUDA, onnx_tools.CPU]),
    ([onnx_tools.CUDA, onnx_tools.CPU], True, [onnx_tools.CUDA, onnx_tools.CPU]),
    # other accelerators' providers are not used
    ([OPENVINO, onnx_tools.CPU], True, [onnx_tools.CPU]),
    ([TENSORRT, onnx_tools.CPU], True, [onnx_tools.CPU]),
    (["AzureExecutionProvider", onnx_tools.CPU], False, [onnx_tools.CPU]),  # what onnxruntime 1.32 lists here
], ids=["cpu-build", "cpu-build-gpu", "gpu-build-no-gpu", "gpu-build-gpu", "cuda-only-gpu", "openvino", "tensorrt-only", "azure"])
def test_providers_are_chosen_from_what_onnxruntime_offers_and_the_machine_has(monkeypatch, available, gpu, chosen):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert onnx_tools.machine_providers() == chosen


def test_a_session_opened_without_providers_uses_the_chosen_ones(monkeypatch, tmp_path):
    # The real machine's session: whatever this build of onnxruntime lists, a machine without a GPU
    # gets a CPU-only session (and no failed CUDA load on the way).
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert onnx_tools.CPU in onnxruntime.get_available_providers()
    assert onnx_tools.open_session(tmp_path / "m.onnx").get_providers() == [onnx_tools.CPU]


def test_bad_sources_are_clear_errors_before_anything_is_written(student_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="nothing to export: give a checkpoint"):
        export.main(parse_config({}, ExportJobConfig, "x"), tmp_path / "work")
    with pytest.raises(ConfigError, match="only one of checkpoint"):
        parse_config({"checkpoint": "a", "sweep": "b"}, ExportJobConfig, "x")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"checkpoint": "a", "gates": {"parity": 3}}, ExportJobConfig, "x")
    with pytest.raises(ConfigError, match="is not a directory"):
        export.main(export_config(tmp_path / "nope"), tmp_path / "work")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"missing model.safetensors, tokenizer.json or preprocessor_config.json / processor_config.json, benchmark.json"):
        export.main(export_config(partial), tmp_path / "work")
    sweep = parse_config({"sweep": "nosuch"}, ExportJobConfig, "x")
    with pytest.raises(ConfigError, match=r"sweep: no .*sweeps/nosuch/best.json"):
        export.main(sweep, tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.integration
def test_cli_exports_with_the_tiny_preset_and_exits_1_on_a_failing_gate(student_checkpoint, tiny_teacher, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "pipeline.cli", "export", "--config", str(ROOT / "tune_configs" / "tiny" / "export.yaml"),
               "--checkpoint", str(student_checkpoint), "--teacher", str(tiny_teacher), "--workdir", str(tmp_path),
               "--register", "tiny-student"]
    ok = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "amad export: tiny-student v1 @champion (first champion)" in ok.stdout

    # the export's directory is named after the checkpoint's run and epoch (run<N>: pytest numbers the fixture's directory)
    tamper_first_initializer(tmp_path / "exports" / f"{student_checkpoint.parent.name}-{student_checkpoint.name}" / "student.onnx")
    failed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert failed.returncode == 1
    assert "amad export: parity gate failed" in failed.stderr and "nothing was registered" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert registry_state(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny-student")["versions"][-1][0] == "1"


@pytest.mark.integration
def test_export_from_a_sweep_tags_the_parent_run_and_the_trial(student_checkpoint, tiny_teacher, tmp_path):
    """`--sweep NAME` reads the checkpoint from best.json in the layout `amad sweep` writes (pipeline/sweep.py)."""
    workdir = tmp_path / "work"
    sweep_dir = workdir / "sweeps" / "s1"
    sweep_dir.mkdir(parents=True)
    best = {"sweep": "s1", "mlflow": {"run_id": "parent123"}, "interrupted": False,
            "best": {"trial_id": "t0002", "run_id": "child456", "checkpoint": str(student_checkpoint),
                     "params": {"student.heads": 2, "objective.attention_weight": 0.5}}}
    (sweep_dir / "best.json").write_text(json.dumps(best))
    report = export.main(parse_config({"sweep": "s1", "teacher": str(tiny_teacher), "exporter": "torchscript",
                                       "latency_repeats": 3, "threads": 1}, ExportJobConfig, "x"), workdir)
    tags = Registry(report["registry"]["tracking_uri"]).alias_version("amad-student", CHAMPION).tags
    assert tags["sweep.parent_run_id"] == "parent123" and tags["sweep.trial_id"] == "t0002"
    assert tags["trial.student.heads"] == "2" and tags["trial.objective.attention_weight"] == "0.5"
    assert tags["checkpoint"] == str(student_checkpoint)

    (sweep_dir / "best.json").write_text(json.dumps({"sweep": "s1", "best": None, "reason": "no trial within the budget"}))
    with pytest.raises(ConfigError, match=r"names no checkpoint \(no trial within the budget\)"):
        export.main(parse_config({"sweep": "s1"}, ExportJobConfig, "x"), workdir)


def test_interleaved_latency_calls_every_model_alike_in_rotating_order():
    """Same-runtime comparisons time the models round-robin: each model gets the same number of
    calls, and no model is always first after another one (the order rotates every round)."""
    from pipeline.onnx_tools import interleaved_latency_ms

    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("teacher", "student", "third")}
    times = interleaved_latency_ms(runs, repeats=6, warmup=2)
    assert set(times) == set(runs) and all(0 <= t["p50"] <= t["p99"] for t in times.values())
    timed = calls[3 * 2:]
    assert [timed.count(name) for name in runs] == [6, 6, 6]
    rounds = [tuple(timed[i:i + 3]) for i in range(0, 18, 3)]
    assert [r[0] for r in rounds] == ["teacher", "student", "third", "teacher", "student", "third"]
