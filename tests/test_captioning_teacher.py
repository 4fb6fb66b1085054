"""`amad teacher` with model.family: ved (issue 24): the captioning teacher job on its tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amad.captioning import caption_report
from amad.data.captions import CaptionSpec, caption_tokenizer, make_caption_split
from amad.data.text import load_tokenizer
from amad.metrics import METRIC_KEYS
from amad.models_ved import VedAdapter
from pipeline import train_captioner
from pipeline.config import CaptionTeacherJobConfig, ConfigError, load_config, teacher_job_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "captioning-teacher.yaml"


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory):
    """The tiny captioner, trained through the CLI as a user runs it."""
    workdir = tmp_path_factory.mktemp("captioner")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher", "--config", str(TINY), "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test scores:" in done.stdout and "teacher CIDEr-D" in done.stdout
    return load_config(TINY, CaptionTeacherJobConfig), workdir, json.loads((workdir / "teacher" / train_captioner.METRICS_FILE).read_text())


def test_the_saved_captioner_loads_and_reproduces_its_test_scores(tiny_captioner):
    cfg, workdir, metrics = tiny_captioner
    saved = workdir / "teacher"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "captions.json", "metrics.json", "teacher.yaml", "scores.md"):
        assert (saved / name).is_file(), name
    model = VedAdapter.load(saved)
    spec = CaptionSpec.from_dict(json.loads((saved / "captions.json").read_text()))
    assert spec == cfg.data.caption_spec()
    tokenizer = load_tokenizer(saved)
    assert tokenizer.get_vocab() == caption_tokenizer().get_vocab()
    again = caption_report(model, make_caption_split(spec, "test"), tokenizer, max_length=spec.max_caption_length)
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(metrics["test"]["teacher_greedy"][key], abs=1e-9), key
    assert not (workdir / "teacher-train").exists()


def test_metrics_hold_greedy_beam_and_the_text_only_baseline(tiny_captioner):
    cfg, _, metrics = tiny_captioner
    assert set(metrics["test"]) == {"teacher_greedy", "teacher_beam2", "text_only_greedy"}
    for row in metrics["test"].values():
        assert set(METRIC_KEYS) <= set(row) and all(0.0 <= row[k] <= 1.0 for k in METRIC_KEYS if k != "cider_d")
        assert row["cider_d"] >= 0.0 and len(row["examples"]) == 3 and row["examples"][0]["references"]
    assert isinstance(metrics["uses_image"], bool)
    assert metrics["cider_d_vs_text_only"] == pytest.approx(metrics["test"]["teacher_greedy"]["cider_d"] - metrics["test"]["text_only_greedy"]["cider_d"])
    assert [entry["step"] for entry in metrics["history"]] == [12, 24]
    assert {"val_loss", "val_cider_d", "val_bleu_4", "train_loss"} <= set(metrics["history"][0])


def test_the_teacher_config_is_chosen_by_model_family_and_an_unknown_family_is_named(tmp_path):
    assert teacher_job_model(yaml.safe_load(TINY.read_text())) is CaptionTeacherJobConfig
    with pytest.raises(ConfigError, match=r"model.family='blip': known families are 'vilt' \(VQA, ViLT\) and 'ved'"):
        teacher_job_model({"model": {"family": "blip"}})
    values = yaml.safe_load(TINY.read_text())
    values["data"]["questions_per_scene"] = 10  # a VQA key in a captioning job
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher", "--config", str(bad), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "data.questions_per_scene: unknown key" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_the_teacher_keeps_the_weights_of_its_best_evaluation_also_across_a_resume(tmp_path):
    """`keep: best`: the model ends with the weights of the evaluation that scored highest, found before or after an
    interruption (the best weights are saved beside the checkpoint). Scores are pinned per evaluation by the
    validation hook, which records the weights each evaluation saw."""
    import torch

    from amad.data.captions import caption_training_set
    from pipeline.config import parse_config, with_overrides
    from pipeline.train_teacher import BEST_FILE, train_model

    values = yaml.safe_load(TINY.read_text())
    cfg = parse_config(with_overrides(values, {"train.steps": 12, "eval_every": 4}), CaptionTeacherJobConfig)
    spec = cfg.data.caption_spec()
    train = caption_training_set(make_caption_split(spec, "train"), caption_tokenizer(), spec.max_caption_length)
    scores = iter([0.5, 0.9, 0.3])  # evaluations at steps 4, 8, 12: the second is the best
    seen: list[dict] = []

    def validate(model, blank_images, stop_at: int | None = None):
        seen.append({key: value.detach().clone() for key, value in model.state_dict().items()})
        if stop_at is not None and len(seen) == stop_at:
            raise KeyboardInterrupt  # during that evaluation: the checkpoint holds the evaluations before it
        return {"val_loss": 1.0, "val_cider_d": next(scores), "line": ""}

    def loss(model, batch):
        return torch.nn.functional.cross_entropy(VedAdapter.forward(model, batch, need_attentions=False).logits.flatten(0, 1),
                                                 batch["labels"].flatten(), ignore_index=-100)

    model = train_captioner.build_captioner(cfg, seed=0)
    history = train_model(cfg, model, train, None, steps=12, blank_images=False, checkpoint_dir=tmp_path / "a", name="t",
                          step_loss=loss, validate=validate, keep_best="val_cider_d")
    assert [h.get("kept", False) for h in history] == [False, True, False]
    assert all(torch.equal(value, seen[1][key]) for key, value in model.state_dict().items())
    assert any(not torch.equal(seen[1][key], seen[2][key]) for key in seen[1]), "training moved the weights after the best evaluation"

    # interrupted during the third evaluation: the checkpoint holds steps 4 and 8, best.pt step 8's weights
    scores, seen = iter([0.5, 0.9]), []
    model = train_captioner.build_captioner(cfg, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train_model(cfg, model, train, None, steps=12, blank_images=False, checkpoint_dir=tmp_path / "b", name="t",
                    step_loss=loss, validate=lambda m, b: validate(m, b, stop_at=3), keep_best="val_cider_d")
    best_before = seen[1]
    assert (tmp_path / "b" / BEST_FILE).is_file()
    scores, seen = iter([0.3]), []
    resumed = train_captioner.build_captioner(cfg, seed=1)
    history = train_model(cfg, resumed, train, None, steps=12, blank_images=False, checkpoint_dir=tmp_path / "b", name="t",
                          step_loss=loss, validate=validate, keep_best="val_cider_d")
    assert [h["step"] for h in history] == [4, 8, 12] and [h.get("kept", False) for h in history] == [False, True, False]
    assert all(torch.equal(value, best_before[key]) for key, value in resumed.state_dict().items())
