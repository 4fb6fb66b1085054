"""Bring your own teacher and data, end to end: a Hugging Face ViLT VQA checkpoint (as
``save_pretrained`` writes it: BERT WordPiece tokenizer, ViLT image processor with its
aspect-preserving resize) and VQA-v2-format files with photos of several shapes go through
``amad run`` (sweep of pruned students, export with dynamic image size and pixel mask, parity gate,
registry, Serve smoke test over HTTP, report). Real Ray, MLflow (SQLite) and Serve on 127.0.0.1.

The checkpoint and the files are written here (``amad.hf_checkpoint``, ``amad data export-vqa-v2``);
nothing is downloaded. The checkpoint has random weights: this tests the path, not the accuracy
(``docs/bring-your-own.md`` measures that with a trained teacher).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image
from transformers import ViltConfig

from amad.data.scenes import ANSWERS, QUESTION_TYPES, vocabulary
from amad.hf_checkpoint import train_wordpiece, write_vilt_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny"

pytestmark = pytest.mark.integration


def _cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


def _reshape_some_photos(images: Path) -> int:
    """Every third image becomes a landscape or portrait photo (a real data set's mix of shapes), so
    batches are padded and masked and the exported graph sees several image sizes."""
    changed = 0
    for number, path in enumerate(sorted(images.iterdir())):
        if number % 3:
            continue
        with Image.open(path) as image:
            width, height = image.size
            size = (width * 3 // 2, height) if number % 2 else (width, height * 3 // 2)
            image.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(path, quality=95)
        changed += 1
    return changed


def _write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory):
    """The shipped tiny bring-your-own YAMLs, pointed at a checkpoint and files written here, run once."""
    root = tmp_path_factory.mktemp("vilt-vqa")
    texts = [template for _, template in QUESTION_TYPES.values()] + [" ".join(vocabulary())] * 3
    config = ViltConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96, image_size=32, patch_size=8,
                        max_position_embeddings=16, id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)})
    # a small vocabulary: many words split into WordPiece sub-words, as in a real BERT tokenizer
    teacher = write_vilt_checkpoint(root / "teacher", config, train_wordpiece(texts, 120))
    data = root / "data"
    written = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "export-vqa-v2", "--config", str(TINY / "teacher.yaml"),
                              "--out", str(data)], capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=300)
    assert written.returncode == 0, written.stderr[-3000:]
    reshaped = {split: _reshape_some_photos(data / f"{split}2014") for split in ("train", "val", "test")}

    sweep = yaml.safe_load((TINY / "vilt-vqa" / "sweep.yaml").read_text())
    sweep["job"]["teacher"] = str(teacher)
    for split, files in sweep["job"]["data"].items():
        if isinstance(files, dict):
            sweep["job"]["data"][split] = {key: str(data / Path(value).name) if key != "max_questions" else value for key, value in files.items()}
    run = yaml.safe_load((TINY / "vilt-vqa.yaml").read_text())
    run["teacher"]["path"] = str(teacher)
    run["sweep"] = str(_write_yaml(root / "sweep.yaml", sweep))
    run["export"] = str(TINY / "export.yaml")
    run_yaml = _write_yaml(root / "run.yaml", run)
    workdir = root / "work"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(run_yaml), "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    state = json.loads((workdir / "pipeline_state.json").read_text())
    return {"root": root, "teacher": teacher, "data": data, "workdir": workdir, "state": state, "reshaped": reshaped,
            "log": done.stdout + done.stderr}


def test_the_data_had_photos_of_several_shapes(byo_run):
    assert all(count > 0 for count in byo_run["reshaped"].values())
    sizes = {Image.open(path).size for path in (byo_run["data"] / "test2014").iterdir()}
    assert len(sizes) >= 3, sizes


def test_the_run_reads_the_files_through_the_checkpoints_own_processing(byo_run):
    log = byo_run["log"]
    assert "data.train:" in log and "questions usable" in log
    state = byo_run["state"]
    assert set(state) == {"teacher", "sweep", "export", "smoke", "report"}
    checkpoint = Path(state["sweep"]["result"]["checkpoint"])
    # the student carries the teacher's pre-processing and the data it was trained on
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (byo_run["teacher"] / name).is_file():
            assert (checkpoint / name).is_file(), name
    assert (checkpoint / "tokenizer.json").is_file()
    assert json.loads((checkpoint / "benchmark.json").read_text())["source"] == "vqa_v2"
    labels = json.loads((checkpoint / "config.json").read_text())["id2label"]
    assert [labels[str(i)] for i in range(len(labels))] == list(ANSWERS)


def test_the_exported_graph_takes_any_image_size_and_the_pixel_mask(byo_run):
    from amad.data.sources import split_for_model
    from amad.models import ViltAdapter
    from pipeline import onnx_tools

    export = byo_run["state"]["export"]["result"]
    graph = onnx.load(export["onnx"])
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert "pixel_mask" in inputs
    assert all(isinstance(d, str) for d in inputs["pixel_values"][2:]), inputs["pixel_values"]  # dynamic height and width
    checkpoint = Path(byo_run["state"]["sweep"]["result"]["checkpoint"])
    test = split_for_model(checkpoint, "test")
    model = ViltAdapter.load(checkpoint).eval()
    session = ort.InferenceSession(export["onnx"], providers=["CPUExecutionProvider"])
    shapes = set()
    for start in range(0, 48, 8):  # batches of one photo each, then mixed batches
        rows = torch.arange(start, start + 1) if start < 24 else torch.arange(start, start + 8)
        batch = test.batch(rows)
        shapes.add(tuple(batch["pixel_values"].shape[2:]))
        with torch.no_grad():
            expected = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}).logits.numpy()
        got = session.run([onnx_tools.OUTPUT_NAME], onnx_tools.model_inputs(batch))[0]
        assert np.abs(got - expected).max() <= 1e-4
    assert len(shapes) >= 2, shapes


def test_the_registered_model_serves_and_carries_the_checkpoints_processing(byo_run, tmp_path):
    from serving.model import load_bundle

    state = byo_run["state"]
    smoke = state["smoke"]["result"]
    assert smoke["questions"] == 4 and smoke["agreed"] == 4 and len(smoke["served"]) == 4
    # what a Serve replica downloads from the registry
    local = load_bundle("models:/amad-student@champion", f"sqlite:///{byo_run['workdir'] / 'mlflow.db'}", cache=tmp_path).directory
    shipped = {path.name: path for path in local.rglob("*") if path.is_file()}
    teacher_files = [name for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")
                     if (byo_run["teacher"] / name).is_file()]
    assert set(teacher_files) <= set(shipped), sorted(shipped)
    for name in teacher_files:  # the teacher's pre-processing, byte for byte
        assert shipped[name].read_bytes() == (byo_run["teacher"] / name).read_bytes(), name


def test_the_report_has_vqa_accuracy_for_teacher_and_student(byo_run):
    comparison = byo_run["state"]["report"]["result"]["comparison"]
    for label in ("teacher", "student"):
        assert 0.0 <= comparison[label]["vqa_accuracy"] <= 1.0
        assert 0.0 <= comparison[label]["accuracy"] <= 1.0
    report = Path(byo_run["state"]["report"]["result"]["markdown"]).read_text()
    assert "VQA accuracy" in report
