"""Validated job configs (pydantic, unknown keys are errors) and the YAML loader.

Every job reads one YAML file into one of these models before anything else runs, so a bad value
is reported as ``<file>: <field.path>: <reason>`` and nothing is started or written.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amad.data.benchmark import BenchmarkSpec
from amad.data.captions import CaptionSpec
from amad.data.scenes import COLOURS, MAX_OBJECTS, SceneSpec
from amad.objective import DistillationObjective


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the field and the reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SceneConfig(Strict):
    grid: int = Field(6, ge=3, le=16, description="objects sit on a grid x grid lattice")
    cell: int = Field(8, ge=4, le=64, description="pixels per grid cell; image size = grid * cell")
    min_objects: int = Field(4, ge=2)
    max_objects: int = Field(6, le=min(MAX_OBJECTS, len(COLOURS)))

    @model_validator(mode="after")
    def _objects_fit(self) -> "SceneConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects} > max_objects={self.max_objects}")
        if self.max_objects > self.grid * self.grid:
            raise ValueError(f"max_objects={self.max_objects} does not fit a {self.grid}x{self.grid} grid")
        return self

    @property
    def image_size(self) -> int:
        return self.grid * self.cell


class DataConfig(Strict):
    """The built-in generated benchmark (sizes in scenes; questions per scene cycle over all types)."""

    seed: int = 0
    train_scenes: int = Field(10_000, ge=1)
    val_scenes: int = Field(500, ge=1)
    test_scenes: int = Field(1_000, ge=1)
    questions_per_scene: int = Field(10, ge=1)
    max_question_length: int = Field(16, ge=4, le=512)
    scene: SceneConfig = SceneConfig()

    def benchmark_spec(self) -> BenchmarkSpec:
        values = self.model_dump()
        values["scene"] = SceneSpec(**values["scene"])
        return BenchmarkSpec(**values)


class TeacherModelConfig(Strict):
    family: Literal["vilt"] = "vilt"
    hidden_size: int = Field(192, ge=8)
    heads: int = Field(12, ge=1)
    layers: int = Field(4, ge=1)
    intermediate_size: int | None = Field(None, ge=1, description="default 4 * hidden_size")
    patch_size: int = Field(8, ge=1)
    initializer_range: float | None = Field(None, gt=0, description="default 1/sqrt(hidden_size)")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TeacherModelConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"heads={self.heads} does not divide hidden_size={self.hidden_size}")
        return self


class OptimConfig(Strict):
    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(300, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0


class TeacherJobConfig(Strict):
    """``amad teacher``: train a teacher, then the baselines that show it uses the image."""

    data: DataConfig = DataConfig()
    model: TeacherModelConfig = TeacherModelConfig()
    train: OptimConfig
    blind_steps: int = Field(2000, ge=0, description="steps for the question-only baseline (images blanked); 0 skips it")
    eval_every: int = Field(500, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores")

    @model_validator(mode="after")
    def _patches_tile_image(self) -> "TeacherJobConfig":
        size = self.data.scene.image_size
        if size % self.model.patch_size:
            raise ValueError(
                f"model.patch_size={self.model.patch_size} does not divide the image size {size}"
                f" (data.scene.grid * data.scene.cell)"
            )
        return self


class CaptionDataConfig(Strict):
    """The built-in captioning benchmark (:mod:`amad.data.captions`): scenes and their templated captions."""

    seed: int = 0
    train_scenes: int = Field(10_000, ge=1)
    val_scenes: int = Field(200, ge=1)
    test_scenes: int = Field(1_000, ge=1)
    references_per_image: int = Field(5, ge=1, description="captions per image (every one a training example)")
    scene: SceneConfig = SceneConfig()

    def caption_spec(self) -> CaptionSpec:
        values = self.model_dump()
        values["scene"] = SceneSpec(**values["scene"])
        return CaptionSpec(**values)


class CaptionModelConfig(Strict):
    """A ViT-encoder / BERT-decoder captioner (``transformers.VisionEncoderDecoderModel``)."""

    family: Literal["ved"] = "ved"
    hidden_size: int = Field(96, ge=8)
    heads: int = Field(12, ge=1)
    layers: int = Field(4, ge=1, description="encoder layers")
    decoder_layers: int | None = Field(None, ge=1, description="default: layers")
    intermediate_size: int | None = Field(None, ge=1, description="default 4 * hidden_size")
    patch_size: int = Field(8, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "CaptionModelConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"heads={self.heads} does not divide hidden_size={self.hidden_size}")
        return self


class CaptionTeacherJobConfig(Strict):
    """``amad teacher`` with ``model.family: ved``: train a captioner, then a text-only decoder (images blanked)
    that shows how much of its score comes from the image."""

    data: CaptionDataConfig = CaptionDataConfig()
    model: CaptionModelConfig = CaptionModelConfig()
    train: OptimConfig
    blind_steps: int = Field(2000, ge=0, description="steps for the text-only baseline (images blanked); 0 skips it")
    eval_every: int = Field(500, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    num_beams: int = Field(3, ge=1, description="beam width of the test split's second decoding (the first is greedy)")
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores")
    keep: Literal["best", "last"] = Field(
        "best", description="which weights the teacher and the text-only baseline end with: best, those of the evaluation with the "
                            "highest validation CIDEr-D (greedy); last, the final step's")

    @model_validator(mode="after")
    def _patches_tile_image(self) -> "CaptionTeacherJobConfig":
        size = self.data.scene.image_size
        if size % self.model.patch_size:
            raise ValueError(f"model.patch_size={self.model.patch_size} does not divide the image size {size} (data.scene.grid * data.scene.cell)")
        return self


def teacher_job_model(values: dict) -> type[TeacherJobConfig] | type[CaptionTeacherJobConfig]:
    """The teacher job's config model for the YAML's ``model.family`` (``vilt`` by default, ``ved`` captions)."""
    model = values.get("model") if isinstance(values, dict) else None
    family = model.get("family", "vilt") if isinstance(model, dict) else "vilt"
    models = {"vilt": TeacherJobConfig, "ved": CaptionTeacherJobConfig}
    if family not in models:
        raise ConfigError(f"model.family={family!r}: known families are 'vilt' (VQA, ViLT) and 'ved' (captioning, ViT encoder + BERT decoder)")
    return models[family]


class VqaV2FilesConfig(Strict):
    """One split in the VQA-v2 download's format (paths relative to the working directory, or absolute)."""

    questions: str = Field(..., description="questions JSON (v2_OpenEnded_mscoco_<split>2014_questions.json)")
    annotations: str = Field(..., description="annotations JSON with the 10 human answers (v2_mscoco_<split>2014_annotations.json)")
    images: str = Field(..., description="image folder (COCO_<split>2014_<id:012d>.jpg, or <id>.jpg/.png)")
    max_questions: int | None = Field(None, ge=1, description="keep the first this many usable questions (default: all)")


class DistillDataConfig(Strict):
    """What the job trains and validates on.

    ``source: generated`` (the default): the built-in benchmark the teacher was trained on (its
    ``benchmark.json``: same seed, scene and question settings); ``train_scenes``/``val_scenes``
    take the first scenes of the teacher's splits (generation is sequential per split).

    ``source: vqa_v2``: VQA-v2-format files per split (``train``, ``val``; ``test`` for ``amad run``'s
    report), read through the teacher's own pre-processing and answer labels (``id2label``). A Hugging
    Face checkpoint teacher needs this source; ``amad data export-vqa-v2`` writes the generated
    benchmark in this format.

    A captioning teacher (``model.family: ved``) reads the generated captions it was trained on (its
    ``captions.json``), with the same ``train_scenes``/``val_scenes`` overrides (in images).
    """

    source: Literal["generated", "vqa_v2"] = "generated"
    train_scenes: int | None = Field(None, ge=1, description="generated: default the teacher's")
    val_scenes: int | None = Field(None, ge=1, description="generated: default the teacher's")
    train: VqaV2FilesConfig | None = Field(None, description="vqa_v2: the training split")
    val: VqaV2FilesConfig | None = Field(None, description="vqa_v2: the validation split (checkpoint selection)")
    test: VqaV2FilesConfig | None = Field(None, description="vqa_v2: the test split (amad run's report)")

    @model_validator(mode="after")
    def _settings_of_the_source(self) -> "DistillDataConfig":
        scenes = [key for key in ("train_scenes", "val_scenes") if getattr(self, key) is not None]
        files = [key for key in ("train", "val", "test") if getattr(self, key) is not None]
        if self.source == "generated" and files:
            raise ValueError(f"{', '.join(files)}: VQA-v2 files need source: vqa_v2 (the generated benchmark has no files)")
        if self.source == "vqa_v2":
            if scenes:
                raise ValueError(f"{', '.join(scenes)}: scene counts apply to source: generated, not to VQA-v2 files")
            missing = [key for key in ("train", "val") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"source: vqa_v2 needs files for {' and '.join(missing)} ({{questions, annotations, images}})")
        return self

    def vqa_v2_dict(self) -> dict:
        """The ``benchmark.json``-style dict of the VQA-v2 source (:func:`amad.data.sources.source_from_dict`)."""
        return {"source": "vqa_v2", **{split: getattr(self, split).model_dump(exclude_none=True) for split in ("train", "val", "test")
                                         if getattr(self, split) is not None}}


class StudentConfig(Strict):
    """A student derived from the teacher.

    ``init: random`` / ``teacher``: a config derived from the teacher's; give ``head_dim`` or
    ``hidden_size``, not both (neither: the teacher's head dimension, so ``hidden = heads * teacher
    head_dim``). ``teacher`` copies the teacher's weights into a student of its width, regrouping
    its heads' dimensions.

    ``init: pruned``: the teacher itself, pruned (:mod:`amad.pruning`): ``heads`` most important heads
    of each of ``layers`` teacher layers (taken by the uniform layer map), ``ffn_keep`` of each FFN's
    neurons; head size and hidden size stay the teacher's. Importance is computed once per teacher
    and data spec on ``importance_examples`` training questions, before Ray starts.
    """

    heads: int = Field(..., ge=1, description="heads per layer ('pruned': the teacher heads each kept layer keeps)")
    layers: int = Field(..., ge=1, description="layers ('pruned': teacher layers kept, by the uniform layer map)")
    head_dim: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1, description="alternative to head_dim; heads must divide it")
    intermediate_ratio: float | None = Field(None, gt=0, description="FFN width / hidden; default: the teacher's")
    init: Literal["random", "teacher", "pruned"] = Field(
        "random",
        description="'teacher': the teacher's weights regrouped into fewer, wider heads (needs its hidden size); "
        "'pruned': the teacher's most important heads, layers and FFN neurons (Michel et al. 2019)",
    )
    ffn_keep: float = Field(1.0, gt=0, le=1, description="'pruned': fraction of each FFN's neurons kept, by activation magnitude")
    importance_examples: int = Field(2048, ge=1, description="'pruned': training questions that score the teacher's heads and neurons")

    @model_validator(mode="after")
    def _one_width(self) -> "StudentConfig":
        if self.head_dim is not None and self.hidden_size is not None:
            raise ValueError(f"give head_dim={self.head_dim} or hidden_size={self.hidden_size}, not both")
        if self.hidden_size is not None and self.hidden_size % self.heads:
            raise ValueError(f"student.heads={self.heads} does not divide student.hidden_size={self.hidden_size}")
        if self.init == "pruned":
            given = [key for key in ("head_dim", "hidden_size", "intermediate_ratio") if getattr(self, key) is not None]
            if given:
                raise ValueError(
                    f"init=pruned keeps the teacher's head size, hidden size and FFN shape: remove {', '.join(given)}"
                    " (use heads, layers and ffn_keep)"
                )
        elif self.ffn_keep != 1.0:
            raise ValueError(f"ffn_keep={self.ffn_keep} applies only to init=pruned (this student is init={self.init})")
        return self

    def resolved_head_dim(self) -> int | None:
        """The head dimension this spec asks for; None means the teacher's."""
        return self.hidden_size // self.heads if self.hidden_size is not None else self.head_dim


class ObjectiveConfig(Strict):
    """The arguments of :class:`amad.objective.DistillationObjective`, validated by building one."""

    task_weight: float = 1.0
    task_loss: Literal["ce", "vqa_bce"] = Field(
        "ce", description="'ce': cross-entropy on the single label; 'vqa_bce': ViLT's soft-target BCE (needs data.source: vqa_v2)"
    )
    logit_kd_weight: float = 1.0
    attention_weight: float = 1.0
    logit_temperature: float = 1.0
    method: Literal["amad", "one_to_one", "head_mean", "relation", "none"] = "amad"
    amad_variant: Literal["kl", "mse"] = "kl"
    amad_temperature: float = 1.0
    detach_weights: bool = False
    relation_heads: int | None = None
    kinds: tuple[str, ...] = ("self",)
    layer_map: Literal["uniform", "last"] | list[tuple[int, int]] = Field(
        "uniform", description="'uniform', 'last' or [student_layer, teacher_layer] pairs (0-based)"
    )
    layer_maps: dict[str, Literal["uniform", "last"] | list[tuple[int, int]]] | None = Field(
        None, description="kind -> its own layer map (e.g. the encoder's and the decoder's kinds of a captioner); others use layer_map"
    )
    kind_weights: dict[str, float] | None = Field(None, description="kind -> weight of its attention term (default 1 each)")
    attention_normalization: Literal["sum", "per_head"] = Field(
        "sum", description="'sum' over aligned heads (the papers' forms) or 'per_head': a mean per aligned teacher target, "
        "so one attention_weight means the same for every method (amad.objective.DistillationObjective)"
    )
    one_to_one_pairing: Literal["index", "origin"] = Field(
        "index", description="method one_to_one: student head k learns teacher head k ('index'), or the head it was "
        "pruned from ('origin': needs student.init: pruned)"
    )

    def kwargs(self, head_origins=None) -> dict:
        """The objective's arguments; ``head_origins`` (the student's, for one-to-one by origin) is
        not a setting but a fact of the student, passed once it exists."""
        values = self.model_dump()
        if not isinstance(values["layer_map"], str):
            values["layer_map"] = [tuple(pair) for pair in values["layer_map"]]
        for kind, layer_map in (values["layer_maps"] or {}).items():
            if not isinstance(layer_map, str):
                values["layer_maps"][kind] = [tuple(pair) for pair in layer_map]
        if values["one_to_one_pairing"] == "origin":
            values["head_origins"] = head_origins
        return values

    @model_validator(mode="after")
    def _objective_accepts(self) -> "ObjectiveConfig":
        if self.one_to_one_pairing == "origin" and self.method != "one_to_one":
            raise ValueError(f"one_to_one_pairing: origin applies to method: one_to_one only (method is {self.method!r})")
        # Origins come from the student, which does not exist yet: check the rest with index pairing.
        DistillationObjective(**{**self.kwargs(), "one_to_one_pairing": "index", "head_origins": None})
        return self


class DistillOptimConfig(Strict):
    """Like :class:`OptimConfig` but counted in epochs: every epoch ends with validation and a checkpoint.

    ``batch_size`` is per worker (the global batch is ``batch_size * num_workers``). One epoch is
    ``(train questions // num_workers) // batch_size`` steps on every worker, so all workers take the
    same number of steps (DDP needs that); the remainder of the shuffled split is skipped that epoch.
    """

    epochs: int = Field(..., ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)


class ScalingSettings(Strict):
    """How many Ray Train workers and what each holds."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPU resource per worker; fractions pack workers on a node")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="'auto': one GPU per worker when the cluster has enough, else CPU"
    )
    threads_per_worker: int = Field(1, ge=1, description="torch.set_num_threads in each worker")
    retain_freed_memory: bool = Field(
        True,
        description="workers keep freed host memory for reuse instead of returning it to the OS "
        "(glibc mallopt; avoids a page fault per 4 KiB of every large tensor, every step; see "
        "pipeline/cpu_allocator.py)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype on GPU; CPU workers always train in fp32"
    )


class StorageConfig(Strict):
    """Where Ray Train and Tune write checkpoints and results (:mod:`pipeline.storage`, docs/storage.md)."""

    path: str | None = Field(
        None,
        description="a directory or a pyarrow.fs URI (s3://bucket/prefix, gs://bucket/prefix, file:///nfs/amad) that every node "
        "of the cluster sees; default: the job's --workdir (right on one machine)",
    )


class DistillJobConfig(Strict):
    """``amad distill``: distil a saved teacher into a smaller student with Ray Train (DDP)."""

    teacher: str = Field(
        "weights/teacher-default",
        description="a directory saved by `amad teacher`, or a Hugging Face ViLT VQA checkpoint (save_pretrained + ViltProcessor)",
    )
    data: DistillDataConfig = DistillDataConfig()
    student: StudentConfig
    objective: ObjectiveConfig = ObjectiveConfig()
    train: DistillOptimConfig
    scaling: ScalingSettings = ScalingSettings()
    storage: StorageConfig = Field(StorageConfig(), description="checkpoints go to <storage.path>/ray/<run_name>/")
    run_name: str = Field("distill", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    checkpoints_to_keep: int = Field(2, ge=1, description="best by the selection metric; the latest is always kept too")
    selection_metric: Literal["val_accuracy", "val_relational_accuracy", "val_vqa_accuracy", "val_cider_d", "val_bleu_4"] | None = Field(
        None, description="the validation metric that picks the best checkpoint (higher is better); default the teacher family's: "
        "val_accuracy for a VQA teacher, val_cider_d for a captioner (pipeline.names.SELECTION_METRICS)",
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1: unlimited")
    seed: int = Field(0, ge=0)
    eval_batch_size: int = Field(256, ge=1)
    fail_at_step: int | None = Field(
        None, ge=1,
        description="TEST-ONLY fault injection: rank 0 exits (os._exit(1)) once after this optimizer step",
    )

    @model_validator(mode="after")
    def _origins_exist(self) -> "DistillJobConfig":
        if self.objective.one_to_one_pairing == "origin" and self.student.init != "pruned":
            raise ValueError(
                f"objective.one_to_one_pairing: origin needs a student pruned from the teacher (student.init: pruned): "
                f"a student with init {self.student.init!r} has no recorded origin heads; use one_to_one_pairing: index"
            )
        return self

    # Settings that may change when the same run is resumed: they do not change what is learned.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {"scaling", "max_failures", "fail_at_step", "checkpoints_to_keep", "eval_batch_size"}
    )

    def with_absolute_paths(self, base: Path | None = None) -> dict:
        """This job as a dict with the teacher and data file paths made absolute against ``base``
        (default: the working directory): Ray Tune runs trials in directories of its own."""
        base = Path.cwd() if base is None else Path(base)
        values = self.model_dump(mode="json")

        def absolute(path: str) -> str:
            return str((base / Path(path).expanduser()).resolve())

        values["teacher"] = absolute(values["teacher"])
        for split in ("train", "val", "test"):
            if values["data"].get(split):
                values["data"][split] = {key: absolute(value) if key in ("questions", "annotations", "images") else value
                                         for key, value in values["data"][split].items()}
        return values


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def format_validation_error(error: ValidationError) -> str:
    """One line per problem: ``field.path: reason (got value)``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<top level>"
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown key (not a setting of this job)"
        shown = item["type"] not in ("extra_forbidden", "missing") and item["loc"]  # not the whole file again
        got = f" (got {item['input']!r})" if shown else ""
        lines.append(f"{where}: {reason}{got}")
    return "\n".join(lines)


def parse_config(values: dict, model: type[ConfigT], source: str = "config") -> ConfigT:
    """Validate a dict as ``model``; ConfigError naming every bad field."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid config\n{format_validation_error(err)}") from None


def with_overrides(values: dict, changes: dict) -> dict:
    """A copy of ``values`` with dotted-key ``changes`` applied (``{"scaling.num_workers": 2}``)."""
    values = copy.deepcopy(values)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        target = values
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return values


def load_config(path: str | Path, model: type[ConfigT]) -> ConfigT:
    """Read a YAML file and validate it as ``model``."""
    return parse_config(read_yaml(path), model, str(path))


def read_yaml(path: str | Path) -> dict:
    """The settings mapping of a YAML file (not validated); ConfigError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(values).__name__}")
    return values
