"""pipeline.lean_trainer: the TorchTrainer's helper actors that a run here never uses are left out.

Unit tests (no Ray cluster). That a real fit then starts neither actor is checked on the two-node
cluster in tests/test_distill.py.
"""

from __future__ import annotations

import os

import pytest
from ray.train import ScalingConfig

from pipeline.lean_trainer import PREEMPTION_WATCHER_ENV, lean_torch_trainer, preemption_watcher_env


def _callback_names(**trainer_args) -> list[str]:
    trainer = lean_torch_trainer()(lambda: None, scaling_config=ScalingConfig(num_workers=1), **trainer_args)
    return [type(callback).__name__ for callback in trainer._create_default_callbacks()]


def test_without_datasets_the_datasets_callback_and_its_actor_are_left_out_and_the_rest_kept():
    names = _callback_names()
    assert "DatasetsCallback" not in names
    # the callbacks Train needs stay, in Ray's order
    for needed in ("BackendSetupCallback", "PlacementGroupCleanerCallback", "UserCallbackHandler"):
        assert needed in names, names


def test_with_datasets_the_trainer_is_ray_s_own():
    assert "DatasetsCallback" in _callback_names(datasets={"train": lambda: None})


def test_the_lean_trainer_is_a_torch_trainer():
    from ray.train.torch import TorchTrainer

    assert issubclass(lean_torch_trainer(), TorchTrainer)


@pytest.fixture
def no_user_setting(monkeypatch):
    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)


def test_a_local_cluster_turns_the_preemption_watcher_off_for_the_fit_only(no_user_setting):
    with preemption_watcher_env(watch=False):
        assert os.environ[PREEMPTION_WATCHER_ENV] == "0"
    assert PREEMPTION_WATCHER_ENV not in os.environ


def test_another_cluster_keeps_ray_s_default(no_user_setting):
    with preemption_watcher_env(watch=True):
        assert PREEMPTION_WATCHER_ENV not in os.environ


def test_the_user_s_own_setting_wins(monkeypatch):
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    with preemption_watcher_env(watch=False):
        assert os.environ[PREEMPTION_WATCHER_ENV] == "1"
    assert os.environ[PREEMPTION_WATCHER_ENV] == "1"


def test_the_variable_is_restored_when_the_fit_raises(no_user_setting):
    with pytest.raises(RuntimeError, match="boom"):
        with preemption_watcher_env(watch=False):
            raise RuntimeError("boom")
    assert PREEMPTION_WATCHER_ENV not in os.environ


def test_the_modules_a_sweep_trial_actor_imports_leave_out_the_model_stack():
    """A trial actor builds and fits the trainer from pipeline.sweep / pipeline.train_distill; the model
    code (transformers, ~2-3 CPU-s to import) is for the Train workers only (pipeline.distill_worker)."""
    import subprocess
    import sys

    probe = "import sys, pipeline.sweep, pipeline.train_distill; print(sorted(m for m in ('transformers', 'amad.models', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]", out
