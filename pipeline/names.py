"""Names that cross job boundaries, defined once.

Ray Train reports these metric keys, Ray Tune (later) optimises over them, MLflow logs them and
selection reads them back: a typo in one place would silently break another, so every job imports
them from here.
"""

from __future__ import annotations

# Per-epoch metrics reported by a distillation worker (rank 0's dict is what Ray keeps).
EPOCH = "epoch"  # epochs completed, 1-based
STEP = "step"  # optimizer steps completed
LR = "lr"
TRAIN_LOSS = "train_loss"  # the objective's weighted total, mean over the epoch's steps and workers
TRAIN_TASK_LOSS = "train_task_loss"
TRAIN_LOGIT_KD_LOSS = "train_logit_kd_loss"
TRAIN_ATTENTION_LOSS = "train_attention_loss"
VAL_ACCURACY = "val_accuracy"  # over the whole validation split, combined across workers
VAL_RELATIONAL_ACCURACY = "val_relational_accuracy"
VAL_VQA_ACCURACY = "val_vqa_accuracy"  # VQA soft accuracy, for data with human answers (VQA-v2 files)
VAL_LOSS = "val_loss"  # mean cross-entropy against the labels (as amad.training.evaluate); captioners: per token
VAL_CIDER_D = "val_cider_d"  # captioners: CIDEr-D of greedy captions of every validation image (amad.metrics)
VAL_BLEU_4 = "val_bleu_4"
SAMPLES_PER_S = "samples_per_s"  # training examples per second, all workers together
EPOCH_SECONDS = "epoch_seconds"  # wall time of the epoch's training steps (validation excluded)

# Which metric picks the best checkpoint, and in which direction: a job's ``selection_metric``, by
# default its teacher's family's (every one of them is "higher is better").
SELECTION_METRIC = VAL_ACCURACY  # the VQA family's (ViLT); kept for code that only ever sees VQA students
SELECTION_MODE = "max"
SELECTION_METRICS = {  # family -> the metrics a job of that family may select by (the first is the default)
    "vilt": (VAL_ACCURACY, VAL_RELATIONAL_ACCURACY, VAL_VQA_ACCURACY),
    "ved": (VAL_CIDER_D, VAL_BLEU_4),
}


def selection_metric(family: str, chosen: str | None = None) -> str:
    """The metric that picks a job's best checkpoint: ``chosen`` (validated against the family) or the family's default."""
    allowed = SELECTION_METRICS[family]
    if chosen is None:
        return allowed[0]
    if chosen not in allowed:
        raise ValueError(f"selection_metric: {chosen!r} is not reported for a {family} teacher (it reports {', '.join(allowed)})")
    return chosen

# Files inside a distillation checkpoint (besides config.json / model.safetensors from
# save_pretrained and tokenizer.json).
TRAIN_STATE_FILE = "train_state.pt"  # optimizer, scheduler, step, epoch, history
BENCHMARK_FILE = "benchmark.json"  # the data spec the student was trained and validated on

# Files in a run directory (<workdir>/ray/<run_name>/), beside Ray's own.
JOB_FILE = "distill_job.json"  # the validated config that started the run
MLFLOW_RUN_FILE = "mlflow_run.json"  # tracking URI + run id, so a resumed run logs to the same run
SUMMARY_FILE = "summary.json"  # what main() returned

# MLflow.
DISTILL_EXPERIMENT = "amad-distill"
BEST_CHECKPOINT_ARTIFACT = "best_checkpoint"
TAG_TEACHER_PATH = "teacher.path"
TAG_TEACHER_TEST_ACCURACY = "teacher.test_accuracy"
TAG_RUN_DIR = "ray.run_dir"
TAG_BEST_CHECKPOINT = "best_checkpoint.path"

# Ray Tune sweeps (amad sweep): an MLflow parent run per sweep, a child run per trial.
SWEEP_EXPERIMENT = "amad-sweep"
SWEEP_JOB_FILE = "sweep_job.json"  # <workdir>/sweeps/<name>/: the validated sweep config
BEST_FILE = "best.json"  # the selected trial: checkpoint, config, metrics
TRIALS_CSV = "trials.csv"  # the summary table (one row per trial)
MEASUREMENTS_FILE = "measurements.json"  # params and CPU latency per checkpoint, measured once
PARAMS = "params"  # student parameter count
LATENCY_MS = "latency_ms_per_example"  # measured CPU latency (1 thread), ms per example
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag: nests child runs under the parent in the UI
TAG_TRIAL_ID = "sweep.trial_id"
TAG_TRIAL_STATUS = "sweep.status"  # completed | stopped_early | failed
TAG_TRIAL_ERROR = "sweep.error"
TAG_BEST_TRIAL = "best.trial_id"
TAG_BEST_RUN = "best.run_id"
TAG_BEST_VAL_ACCURACY = "best.val_accuracy"  # a sweep selecting by another metric tags best.<metric>
