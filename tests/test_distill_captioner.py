"""``amad distill`` with a captioning teacher (``model.family: ved``): a student pruned per kind of head,
AMAD on all three kinds of maps, DDP on two nodes, checkpoints selected by validation CIDEr-D that
reproduce it, MLflow; and captioner configs that cannot work refused by name before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import names, train_distill
from pipeline.config import ConfigError, DistillJobConfig, parse_config
from distill_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "distill-captioner.yaml"


def _refused(tmp_path: Path, values: dict, message: str) -> None:
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError, match=message):
        train_distill.main(parse_config(values, DistillJobConfig), workdir)
    assert not workdir.exists() or not any(workdir.iterdir()), "a refused job wrote files"


@pytest.fixture(scope="module")
def captioner_run(ray_cluster, trained_tiny_captioner, tmp_path_factory, monkeypatch_module):
    workdir = tmp_path_factory.mktemp("distill-captioner")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(trained_tiny_captioner, TINY, **{"scaling.cpus_per_worker": 1})  # one worker per 1-CPU node: DDP across nodes
    summary = train_distill.main(cfg, workdir)
    return cfg, workdir, summary


@pytest.mark.integration
def test_a_pruned_captioner_trains_on_two_nodes_and_reports_caption_scores_every_epoch(captioner_run):
    cfg, _, summary = captioner_run
    assert summary["family"] == "ved" and summary["selection_metric"] == names.VAL_CIDER_D
    assert [h[names.EPOCH] for h in summary["history"]] == [1, 2]
    for epoch in summary["history"]:
        assert {names.VAL_CIDER_D, names.VAL_BLEU_4, names.VAL_LOSS, names.TRAIN_ATTENTION_LOSS} <= set(epoch)
        assert names.VAL_ACCURACY not in epoch
        assert epoch[names.TRAIN_ATTENTION_LOSS] > 0  # the three kinds of maps were aligned
        assert 0 <= epoch[names.VAL_BLEU_4] <= 1 and epoch[names.VAL_CIDER_D] >= 0
    best = summary["best"]
    assert best[names.VAL_CIDER_D] == max(h[names.VAL_CIDER_D] for h in summary["history"])


@pytest.mark.integration
def test_the_best_captioner_checkpoint_is_pruned_loads_and_reproduces_its_validation_scores(captioner_run):
    """Decoding the saved student alone, on one process, gives the CIDEr-D and loss the two workers reported together."""
    import torch

    from amad.captioning import caption_report, teacher_forced_loss
    from amad.data.captions import CaptionSpec, caption_training_set, make_caption_split
    from amad.data.text import load_tokenizer
    from amad.models_ved import VedAdapter
    from amad.pruning_ved import recorded_origins

    cfg, _, summary = captioner_run
    checkpoint = Path(summary["best_checkpoint"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "captions.json", names.TRAIN_STATE_FILE):
        assert (checkpoint / name).is_file(), name
    student = VedAdapter.load(checkpoint).eval()
    assert VedAdapter.layers(student) == {"encoder": 1, "decoder": 1}
    origins = recorded_origins(student)  # per kind: one layer of the 2 teacher heads each kept
    assert {kind: [len(heads) for heads in layers] for kind, layers in origins.items()} == {"encoder_self": [2], "decoder_self": [2], "cross": [2]}
    spec = CaptionSpec.from_dict(json.loads((checkpoint / "captions.json").read_text()))
    assert (spec.train_scenes, spec.val_scenes) == (40, 6)  # the job's overrides of the teacher's spec
    val = make_caption_split(spec, "val")
    tokenizer = load_tokenizer(checkpoint)
    torch.set_num_threads(1)
    report = caption_report(student, val, tokenizer, max_length=spec.max_caption_length)
    assert report["cider_d"] > 0.05  # the student writes captions that share n-grams with the references
    assert report["cider_d"] == pytest.approx(summary["best"][names.VAL_CIDER_D], abs=1e-9)
    assert report["bleu_4"] == pytest.approx(summary["best"][names.VAL_BLEU_4], abs=1e-9)
    loss = teacher_forced_loss(student, caption_training_set(val, tokenizer, spec.max_caption_length))
    assert loss == pytest.approx(summary["best"][names.VAL_LOSS], rel=1e-5)


@pytest.mark.integration
def test_mlflow_holds_the_caption_metrics_and_the_teacher_family(captioner_run):
    from mlflow.tracking import MlflowClient

    _, _, summary = captioner_run
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, names.VAL_CIDER_D)
    assert [m.step for m in history] == [1, 2]
    assert run.data.params["selection_metric"] == names.VAL_CIDER_D
    assert json.loads(run.data.params["objective.kinds"]) == ["encoder_self", "decoder_self", "cross"]
    teacher_cider = json.loads((Path(summary["teacher"]["path"]) / "metrics.json").read_text())["test"]["teacher_greedy"]["cider_d"]
    assert run.data.tags[names.TAG_TEACHER_TEST_ACCURACY] == f"CIDEr-D {teacher_cider:.4f}"
    assert summary["teacher"]["test_scores"]["cider_d"] == teacher_cider
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, names.BEST_CHECKPOINT_ARTIFACT)}
    assert f"{names.BEST_CHECKPOINT_ARTIFACT}/captions.json" in artifacts


@pytest.mark.parametrize(
    "change, message",
    [
        ({"objective": {"method": "amad"}},
         r"objective.kinds: \['self'\] are not attention kinds of ved \(it has \['encoder_self', 'decoder_self', 'cross'\]\) \(set objective.kinds"),
        ({"objective": {"method": "relation", "kinds": ["cross"], "relation_heads": 2}}, r"objective.method: relation \(MiniLMv2\) is implemented for ViLT only"),
        ({"objective": {"method": "amad", "kinds": ["cross"], "layer_maps": {"encoder_self": "last"}}},
         r"objective: layer_maps names \['encoder_self'\], which kinds=\['cross'\] does not align"),
        ({"objective": {"method": "amad", "kinds": ["cross"], "layer_maps": {"cross": [[0, 2]]}}},
         r"objective.layer_maps.cross: pair \[0, 2\] is out of range for cross maps: the student has 1 layers .* the teacher 2"),
        ({"selection_metric": "val_accuracy"}, r"selection_metric: 'val_accuracy' is not reported for a ved teacher \(it reports val_cider_d, val_bleu_4\)"),
        ({"student": {"heads": 5, "layers": 1, "init": "pruned"}}, r"student.heads=5: a pruned student keeps at most the teacher's 4 encoder heads per layer"),
        ({"student": {"heads": 2, "layers": 2, "init": "pruned"}}, r"student.layers=2: a pruned student keeps at most the teacher's 1 encoder layers"),
        ({"student": {"heads": 2, "layers": 1, "head_dim": 8, "init": "teacher"}}, r"student.init: teacher \(regrouped heads\) is not available for ved teachers"),
        ({"data": {"train_scenes": 4}}, r"train.batch_size=16: 8 train captions over scaling.num_workers=2 leave fewer than one batch per worker"),
    ],
)
def test_captioner_configs_that_cannot_work_name_the_key_and_write_nothing(tmp_path, tiny_captioner_dir, change, message):
    values = yaml.safe_load(TINY.read_text())
    values["teacher"] = str(tiny_captioner_dir)
    values.update(change)
    _refused(tmp_path, values, message)


def test_a_vqa_data_source_for_a_captioner_and_a_broken_captions_spec_are_named(tmp_path, tiny_captioner_dir):
    values = yaml.safe_load(TINY.read_text())
    files = {"questions": "q.json", "annotations": "a.json", "images": "img"}
    _refused(tmp_path, {**values, "teacher": str(tiny_captioner_dir), "data": {"source": "vqa_v2", "train": files, "val": files}},
             r"data.source: vqa_v2 is a VQA data source; the captioning teacher .* distils on the generated captions")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_captioner_dir, broken)
    spec = json.loads((tiny_captioner_dir / "captions.json").read_text())
    (broken / "captions.json").write_text(json.dumps({**spec, "references_per_image": 0}))
    _refused(tmp_path, {**values, "teacher": str(broken)},
             r"teacher: .*captions.json is not a captions spec `amad teacher` wrote: references_per_image=0 must be >= 1")
    (broken / "captions.json").write_text(json.dumps({**spec, "scene": {**spec["scene"], "cell": 12}}))
    _refused(tmp_path, {**values, "teacher": str(broken)},
             r"teacher: .*captions.json draws 48-pixel images but the captioner's encoder takes 32 pixels")


def test_a_vqa_model_beside_a_captions_spec_is_refused(tmp_path, tiny_teacher):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_teacher, mixed)
    (mixed / "captions.json").write_text("{}")
    values = yaml.safe_load(TINY.read_text())
    _refused(tmp_path, {**values, "teacher": str(mixed)}, r"teacher: .*mixed/config.json is a vilt model \(vilt\) but the directory holds the data of a ved teacher")


@pytest.mark.integration
def test_a_sweep_of_pruned_captioners_selects_by_validation_cider(ray_cluster, trained_tiny_captioner, tmp_path, monkeypatch):
    """`amad sweep` with a captioner: Tune ranks trials by val_cider_d, the table, the best record and the
    MLflow tags carry it, latency is greedy decoding per image, and the best checkpoint is a captioner."""
    import csv

    from mlflow.tracking import MlflowClient

    from pipeline import sweep
    from pipeline.sweep_config import SweepConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    values = yaml.safe_load((ROOT / "tune_configs" / "tiny" / "captioning-sweep.yaml").read_text())
    values["job"]["teacher"] = str(trained_tiny_captioner)
    summary = sweep.main(parse_config(values, SweepConfig), tmp_path / "work")
    assert summary["selection_metric"] == names.VAL_CIDER_D and summary["counts"]["completed"] == 2
    rows = summary["rows"]
    assert all(r[names.VAL_CIDER_D] > 0 and r[names.LATENCY_MS] > 0 and r[names.PARAMS] > 0 for r in rows)
    assert sorted(r["heads"] for r in rows) == [2, 4] and {r["layers"] for r in rows} == {1}
    assert rows[0][names.PARAMS] != rows[1][names.PARAMS]
    best = max(rows, key=lambda r: (r[names.VAL_CIDER_D], -r[names.PARAMS], -r[names.LATENCY_MS]))
    assert summary["best"]["trial_id"] == best["trial_id"]
    with (Path(summary["sweep_dir"]) / names.TRIALS_CSV).open() as handle:
        table = list(csv.DictReader(handle))
    assert names.VAL_CIDER_D in table[0] and names.VAL_ACCURACY not in table[0]
    checkpoint = Path(summary["best"]["checkpoint"])
    assert (checkpoint / "captions.json").is_file() and summary["best"]["metrics"][names.VAL_CIDER_D] == pytest.approx(best[names.VAL_CIDER_D])
    parent = MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["run_id"])
    assert parent.data.tags[f"best.{names.VAL_CIDER_D}"] == f"{best[names.VAL_CIDER_D]:.6f}"


def test_a_captioner_where_a_vqa_model_is_needed_is_refused_by_name(tiny_captioner_dir):
    from pipeline.export import check_model_dir

    with pytest.raises(ConfigError, match=r"teacher: .* is a captioner \(model.family: ved\); this needs a VQA model \(ViLT\)"):
        check_model_dir(tiny_captioner_dir, "teacher", needs_data=False)
    assert check_model_dir(tiny_captioner_dir, "checkpoint", captioner_ok=True) == tiny_captioner_dir.resolve()  # amad export takes it


def test_the_committed_captioner_loads_and_reproduces_its_recorded_validation_scores():
    """weights/captioner-default: the shipped captioning YAMLs check against it, it loads, and greedy captions of the
    200 validation images give the CIDEr-D and BLEU-4 its training recorded for the weights it kept."""
    import torch

    from amad.captioning import caption_report
    from amad.data.captions import CaptionSpec, make_caption_split
    from amad.data.text import load_tokenizer
    from amad.models_ved import VedAdapter
    from pipeline.config import load_config
    from pipeline.sweep import check_sweep
    from pipeline.sweep_config import SweepConfig

    committed = ROOT / "weights" / "captioner-default"
    teacher = train_distill.check_job(load_config(ROOT / "tune_configs" / "distill-captioner.yaml", DistillJobConfig))
    assert teacher.family == "ved" and teacher.path == committed.resolve() and teacher.test_scores["cider_d"] > 1.0
    assert check_sweep(load_config(ROOT / "tune_configs" / "captioning-sweep.yaml", SweepConfig)).path == committed.resolve()
    metrics = json.loads((committed / "metrics.json").read_text())
    model = VedAdapter.load(committed).eval()
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters"]
    spec = CaptionSpec.from_dict(json.loads((committed / "captions.json").read_text()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = caption_report(model, make_caption_split(spec, "val"), load_tokenizer(committed), max_length=spec.max_caption_length)
    finally:
        torch.set_num_threads(threads)
    # the weights saved are those of the evaluation `amad teacher` kept (keep: best), else of the last step
    kept = next((h for h in metrics["history"] if h.get("kept")), metrics["history"][-1])
    assert kept["step"] == metrics.get("kept_step", kept["step"])
    assert report["cider_d"] == pytest.approx(kept["val_cider_d"], abs=1e-6) and report["bleu_4"] == pytest.approx(kept["val_bleu_4"], abs=1e-6)
