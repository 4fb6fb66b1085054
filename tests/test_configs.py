"""Every shipped YAML loads and validates; bad configs are named before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import CaptionTeacherJobConfig, ConfigError, DistillJobConfig, TeacherJobConfig, load_config
from pipeline.export_config import ExportJobConfig
from pipeline.run_config import RunJobConfig
from pipeline.sweep_config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "tune_configs").rglob("*.yaml"))
JOB_MODELS = {"teacher.yaml": TeacherJobConfig, "distill.yaml": DistillJobConfig, "distill-from-teacher.yaml": DistillJobConfig, "sweep.yaml": SweepConfig, "export.yaml": ExportJobConfig,
              "default.yaml": RunJobConfig, "run.yaml": RunJobConfig, "quality.yaml": RunJobConfig, "vilt-vqa.yaml": RunJobConfig,
              "demo-hf.yaml": RunJobConfig, "captioning-teacher.yaml": CaptionTeacherJobConfig,
              "distill-captioner.yaml": DistillJobConfig, "captioning-sweep.yaml": SweepConfig, "captioning.yaml": RunJobConfig}
FULL_NAME_OF_TINY = {"run.yaml": "default.yaml"}  # `amad run`'s full preset is the README's tune_configs/default.yaml
FULL_ONLY = {"quality.yaml", "demo-hf.yaml"}  # default.yaml's stages, longer / from VQA-v2 files: tiny/run.yaml and tiny/vilt-vqa.yaml test them


def test_there_are_configs_and_each_has_a_known_job():
    assert CONFIGS, "no YAML under tune_configs/"
    unknown = [p.name for p in CONFIGS if p.name not in JOB_MODELS]
    assert not unknown, f"add these configs' job models to JOB_MODELS: {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates_and_shows_its_command(path):
    load_config(path, JOB_MODELS[path.name])
    header = path.read_text().splitlines()[:4]
    assert any(line.startswith("# Run:") and "amad " in line for line in header), f"{path}: header must show the command"


def test_the_tiny_sweep_runs_at_least_four_trials_two_at_a_time():
    cfg = load_config(ROOT / "tune_configs" / "tiny" / "sweep.yaml", SweepConfig)
    grid = 1
    for entry in cfg.space.values():
        grid *= len(entry.values) if entry.kind == "grid" else 1
    assert grid * cfg.search.num_samples >= 4 and cfg.max_concurrent_trials == 2


def test_each_sweep_job_matches_the_distill_preset_of_its_folder():
    """A sweep's job is the distill YAML beside it, apart from what a sweep sets per trial."""
    for folder in (ROOT / "tune_configs", ROOT / "tune_configs" / "tiny"):
        job = load_config(folder / "sweep.yaml", SweepConfig).job.model_dump()
        distill = load_config(folder / "distill.yaml", DistillJobConfig).model_dump()
        differing = sorted(key for key in distill if job[key] != distill[key])
        assert set(differing) <= {"run_name", "checkpoints_to_keep", "max_failures", "train"}, (folder, differing)


@pytest.mark.parametrize("run_yaml", ["vilt-vqa.yaml", "demo-hf.yaml", "tiny/vilt-vqa.yaml"])
def test_the_bring_your_own_configs_read_vqa_v2_files_with_the_run_teacher(run_yaml):
    """The sweep of each bring-your-own job reads VQA-v2 files (train, val and the report's test split) and
    distils the run's own teacher; the twin YAMLs differ only in scale."""
    run = load_config(ROOT / "tune_configs" / run_yaml, RunJobConfig)
    sweep = load_config(ROOT / run.sweep, SweepConfig)
    assert Path(sweep.job.teacher) == Path(run.teacher.path)
    data = sweep.job.data
    assert data.source == "vqa_v2" and data.train and data.val and data.test
    for split in (data.train, data.val, data.test):
        assert Path(split.questions).name.startswith("v2_OpenEnded_mscoco_") and Path(split.annotations).name.startswith("v2_mscoco_")


def test_the_real_vilt_job_uses_vilts_own_loss_and_the_tiny_twin_too():
    for path in ("vilt-vqa/sweep.yaml", "tiny/vilt-vqa/sweep.yaml"):
        assert load_config(ROOT / "tune_configs" / path, SweepConfig).job.objective.task_loss == "vqa_bce", path


def test_every_tiny_config_has_a_full_twin():
    tiny = {FULL_NAME_OF_TINY.get(p.name, p.name) for p in (ROOT / "tune_configs" / "tiny").glob("*.yaml")}
    full = {p.name for p in (ROOT / "tune_configs").glob("*.yaml")}
    assert tiny == full - FULL_ONLY


@pytest.mark.parametrize("run_yaml", ["default.yaml", "quality.yaml"])
def test_the_shipped_pruned_sweeps_fit_the_default_teacher_and_their_selection_budget(run_yaml):
    """Every trial of the main job's sweeps can be pruned from the committed teacher, and the sweep's
    own student (the shape it is built around) fits its ``selection.max_params``: a space whose
    students the selection would all reject fails here, not after an hour of training."""
    from amad.models import ViltAdapter
    from amad.pruning import Importance, parameter_count, plan, prune_from_plan
    from pipeline.config import DistillJobConfig, parse_config
    from pipeline.train_distill import check_pruned_student

    run = load_config(ROOT / "tune_configs" / run_yaml, RunJobConfig)
    sweep = load_config(ROOT / run.sweep, SweepConfig)
    teacher_dir = ROOT / run.teacher.path
    teacher = ViltAdapter.load(teacher_dir)
    config = teacher.config
    # any scores give the same shapes: parameter counts depend on how many heads/neurons are kept, not which
    flat = Importance(heads=torch.ones(config.num_hidden_layers, config.num_attention_heads),
                      ffn=torch.ones(config.num_hidden_layers, config.intermediate_size), examples=1)
    counts = {}
    for sampled in [{}] + sweep.combinations():
        job = parse_config(sweep.trial_job(sampled), DistillJobConfig, f"{run.sweep} {sampled}")
        assert job.student.init == "pruned"
        check_pruned_student(job, config, teacher_dir)
        shape = (job.student.heads, job.student.layers, job.student.ffn_keep)
        kept = plan(flat, job.student.heads, job.student.layers, job.student.ffn_keep)
        counts[shape] = parameter_count(prune_from_plan(ViltAdapter.load(teacher_dir), kept))
    own = sweep.job.student
    assert counts[(own.heads, own.layers, own.ffn_keep)] <= sweep.selection.max_params, counts
    assert sweep.selection.max_params <= parameter_count(teacher) / 2, "the main job ships at most half the teacher"


def _write(tmp_path, values) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"hidden_size": 64, "heads": 5}}, "model: Value error|heads=5 does not divide hidden_size=64"),
        ({"model": {"patch_size": 7}}, "model.patch_size=7 does not divide the image size 48"),
        ({"train": {"steps": 10, "learning_rate": 1}}, "train.learning_rate: unknown key"),
        ({"trian": {"steps": 10}}, "trian: unknown key"),
        ({"train": {"steps": 0}}, "train.steps: Input should be greater than or equal to 1"),
        ({"data": {"scene": {"min_objects": 5, "max_objects": 3}}}, "min_objects=5 > max_objects=3"),
    ],
)
def test_bad_values_name_the_field_and_reason(tmp_path, change, message):
    values = {"train": {"steps": 10}}
    for key, value in change.items():
        values[key] = value
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, values), TeacherJobConfig)


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", TeacherJobConfig)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, TeacherJobConfig)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing, TeacherJobConfig)


def test_cli_reports_a_bad_config_without_a_traceback_and_writes_nothing(tmp_path):
    config = _write(tmp_path, {"train": {"steps": 10}, "model": {"heads": 5}})
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "teacher", "--config", str(config), "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert "heads=5 does not divide hidden_size=192" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_every_subcommand_has_help():
    from pipeline.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps sub-parsers here
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.parametrize("port, message", [(80, "smoke.port: port 80 is privileged: give 0"), (70000, "smoke.port: Input should be less than or equal to 65535"),
                                           (-1, "smoke.port: Input should be greater than or equal to 0")])
def test_the_smoke_port_is_0_for_any_free_port_or_an_unprivileged_one(tmp_path, port, message):
    values = yaml.safe_load((ROOT / "tune_configs" / "tiny" / "run.yaml").read_text())
    values["smoke"]["port"] = port
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, values), RunJobConfig)
    for accepted in (0, 1024, 65535):
        values["smoke"]["port"] = accepted
        assert load_config(_write(tmp_path, values), RunJobConfig).smoke.port == accepted


def test_the_tiny_runs_take_any_free_port_and_the_full_ones_a_fixed_one():
    """Tests run the tiny presets beside other servers (and each other): a fixed port could be taken.
    A user's `make demo` prints a URL that stays the same from run to run."""
    for tiny in ("tiny/run.yaml", "tiny/vilt-vqa.yaml"):
        assert load_config(ROOT / "tune_configs" / tiny, RunJobConfig).smoke.port == 0, tiny
    for full in ("default.yaml", "quality.yaml", "vilt-vqa.yaml", "demo-hf.yaml"):
        assert load_config(ROOT / "tune_configs" / full, RunJobConfig).smoke.port == 8471, full
