"""The model behind the service: resolve a registry URI, load the ONNX graph, answer questions.

:class:`Predictor` is plain Python (no Ray): ``predict(images, questions)`` is what the Serve
deployment calls per batch and what tests call directly. Pre-processing is the training code's own
(:func:`amad.data.preprocess.load_preprocessor` on the model's files: our word-level tokenizer and
square images, or a Hugging Face checkpoint's tokenizer and image processor with pixel masks), so
served and offline logits agree.

A registered model version (``amad export``) is an MLflow ONNX-flavour directory: ``*.onnx`` plus
``extra_files/`` holding ``config.json`` (answer labels, image size), the pre-processing's files
(``tokenizer.json``, or the checkpoint's processor and tokenizer files) and ``benchmark.json`` (the
data it was trained on, with the question length).

Where the files go: :func:`open_predictor` (what a replica calls) downloads a version into a fresh
directory of its own under the cache root (``cache_dir``, else ``$AMAD_SERVE_CACHE``, else the
system temporary directory, which honours ``TMPDIR``), builds the session and the pre-processing, and
removes the directory before it returns: a replica keeps the model in memory only, two replicas or
two versions never share a directory, and a reused process id cannot find old files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from amad.data.preprocess import load_preprocessor
from serving.config import Limits, parse_model_uri
from serving.inputs import BadInput

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
SPIN_ENTRY = "session.intra_op.allow_spinning"
ANSWERER, CAPTIONER = "answerer", "captioner"
ROUTES = {ANSWERER: "/v1/answer", CAPTIONER: "/v1/caption"}


@dataclass
class Bundle:
    """Everything needed to answer with one model version."""

    name: str
    version: str
    alias: str | None
    onnx_path: Path  # the answerer's graph; a captioner's encoder (its decoder lies beside it)
    directory: Path  # the extra files: config.json, the pre-processing's files, benchmark.json (a captioner: captions.json)
    tags: dict = field(default_factory=dict)
    kind: str = ANSWERER  # ANSWERER (``amad-student``: one graph, /v1/answer) or CAPTIONER (two graphs, /v1/caption)
    _config: dict | None = field(default=None, repr=False)
    _benchmark: dict | None = field(default=None, repr=False)

    def config(self) -> dict:
        if self._config is None:
            self._config = json.loads((self.directory / "config.json").read_text())
        return self._config

    def benchmark(self) -> dict:
        """The data the model was trained on: ``benchmark.json`` (VQA), or a captioner's ``captions.json``."""
        if self._benchmark is None:
            path = self.directory / ("captions.json" if self.kind == CAPTIONER else "benchmark.json")
            self._benchmark = json.loads(path.read_text()) if path.is_file() else {}
        return self._benchmark


def resolve_version(model_uri: str, tracking_uri: str) -> tuple[str, str, str | None, dict]:
    """``(name, version, alias, tags)`` of the version ``model_uri`` points at now; ValueError if none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_model_uri(model_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"{model_uri}: not in the registry at {tracking_uri} ({err.message.splitlines()[0]})") from None
    return name, str(found.version), alias, dict(found.tags)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where replicas download model versions: ``cache_dir``, else ``$AMAD_SERVE_CACHE``, else the system temp directory."""
    return Path(cache_dir or os.environ.get("AMAD_SERVE_CACHE") or tempfile.gettempdir())


def load_bundle(model_uri: str, tracking_uri: str, version: str | None = None, *, cache: str | Path) -> Bundle:
    """Download the files of ``model_uri`` (pinned to ``version`` when given) into ``cache``, which the caller owns.

    ``config.json`` and ``benchmark.json`` are read before returning, so the bundle's metadata stays
    usable after the caller removes the files (see :func:`open_predictor`)."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    name, alias, _ = parse_model_uri(model_uri)
    if version is None:
        name, version, alias, tags = resolve_version(model_uri, tracking_uri)
    else:
        tags = dict(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version(name, version).tags)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, version)
    dst = Path(cache)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))
    # A captioner (`amad export` of a ved checkpoint) is an MLflow pyfunc model whose artifacts/ hold both
    # graphs, the tokenizer, config.json and captions.json; its pickled Python class is never loaded here.
    captioner_files = local / "artifacts"
    if (captioner_files / "encoder.onnx").is_file() and (captioner_files / "decoder.onnx").is_file():
        bundle = Bundle(name, str(version), alias, captioner_files / "encoder.onnx", captioner_files, tags, kind=CAPTIONER)
        for needed in ("config.json", "captions.json", "tokenizer.json"):
            if not (captioner_files / needed).is_file():
                raise ValueError(f"{name} v{version}: the captioner has no artifacts/{needed} (re-run amad export)")
        bundle.config(), bundle.benchmark()
        return bundle
    onnx_files = sorted(local.glob("*.onnx"))
    extra = local / "extra_files"
    if not onnx_files:
        raise ValueError(f"{name} v{version}: no .onnx file in {source}")
    if not (extra / "config.json").is_file():
        raise ValueError(f"{name} v{version}: no extra_files/config.json (registered before serving support? re-run amad export)")
    bundle = Bundle(name, str(version), alias, onnx_files[0], extra, tags)
    bundle.config(), bundle.benchmark()
    return bundle


def open_predictor(model_uri: str, tracking_uri: str, version: str | None = None, *, cache_dir: str | Path | None = None,
                   **predictor_options) -> "Predictor":
    """A :class:`Predictor` for ``model_uri`` (a :class:`serving.captioning.CaptionPredictor` where the version
    is a captioner) whose downloaded files are already deleted (see the module docstring).

    The download goes to a new directory under :func:`cache_root` named after the model, version and
    process; it is removed whether loading succeeds or fails."""
    name, _, _ = parse_model_uri(model_uri)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"amad-serve-{name}-v{version or 'alias'}-{os.getpid()}-", dir=root)
    try:
        bundle = load_bundle(model_uri, tracking_uri, version, cache=staging)
        if bundle.kind == CAPTIONER:
            from serving.captioning import CaptionPredictor

            return CaptionPredictor(bundle, **predictor_options)
        return Predictor(bundle, **predictor_options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float  # softmax probability of ``answer``
    top_k: list[tuple[str, float]]


@dataclass(frozen=True)
class Prepared:
    """One validated request: ``image`` ``(H, W, 3)`` uint8 as the pre-processing keeps it, the question, how many answers to return."""

    image: np.ndarray
    question: str
    top_k: int = 1


def session_options(threads: int | None):
    """ONNX Runtime options of a replica's sessions: ``threads`` intra-op threads that do not spin."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # ORT's pool threads busy-wait after each run by default. In a replica they then take the CPU
    # the event loop needs to parse the next requests: measured on 2 cores with 2 intra-op
    # threads, the student served 413 req/s at concurrency 32 spinning and 725 without.
    options.add_session_config_entry(SPIN_ENTRY, "0")
    return options


def route_of(tags: dict) -> str:
    """The route a registered version is served on, from its registry tags (a captioner carries ``val_cider_d``)."""
    return ROUTES[CAPTIONER if "val_cider_d" in tags else ANSWERER]


class Predictor:
    """An ONNX Runtime session with the model's pre- and post-processing."""

    kind = ANSWERER

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None, limits: Limits | None = None):
        import onnxruntime as ort

        self.bundle = bundle
        self.limits = limits or Limits()
        config = bundle.config()
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.image_size = int(config["image_size"])
        try:
            self.preprocessor = load_preprocessor(bundle.directory)
        except (OSError, ValueError) as err:
            raise ValueError(f"{bundle.name} v{bundle.version}: its pre-processing files are not usable ({err}); re-run amad export") from None
        self.max_length = self.preprocessor.max_text_length
        self.session = ort.InferenceSession(str(bundle.onnx_path), sess_options=session_options(threads), providers=providers or default_providers())

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def prepare(self, image: bytes | np.ndarray, question: str, top_k: int = 1) -> Prepared:
        """Decode and check one request; BadInput (4xx) naming the problem."""
        words = self.preprocessor.count_tokens(question)
        if words == 0:
            raise BadInput(422, "question has no words")
        if words > self.max_length - 2:  # [CLS] and [SEP] take two of the model's positions
            raise BadInput(422, f"question has {words} tokens; this model reads at most {self.max_length - 2}")
        if top_k > len(self.labels):
            raise BadInput(422, f"top_k={top_k} is more than the model's {len(self.labels)} answers")
        if isinstance(image, np.ndarray):
            pixels = image
        else:
            try:
                pixels = self.preprocessor.decode(image, max_pixels=self.limits.max_image_pixels)
            except Image.DecompressionBombError as err:  # PIL's own limit, hit before ours for huge headers
                raise BadInput(413, f"image is too large: {err}") from None
            except ValueError as err:
                status = 413 if "over the limit" in str(err) else 400
                raise BadInput(status, str(err)) from None
        return Prepared(pixels, question, top_k)

    def logits(self, items: list[Prepared]) -> np.ndarray:
        """``(B, num_labels)`` float32 logits for ``B`` prepared requests (one ORT call)."""
        input_ids, attention_mask = self.preprocessor.encode([item.question for item in items])
        images = self.preprocessor.pixels([item.image for item in items])  # pixel_values (B, 3, H, W)[, pixel_mask]
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                **{name: tensor.numpy() for name, tensor in images.items()}}
        return self.session.run(["logits"], feed)[0]

    def answer(self, items: list[Prepared]) -> list[Answer]:
        logits = self.logits(items)
        shifted = logits - logits.max(-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)  # (B, num_labels)
        answers = []
        for row, item in zip(probs, items):
            order = np.argsort(-row)[: item.top_k]
            top = [(self.labels[i], float(row[i])) for i in order]
            answers.append(Answer(top[0][0], top[0][1], top))
        return answers

    def predict(self, images: list[bytes | np.ndarray], questions: list[str], top_k: int = 1) -> list[Answer]:
        """Answers for ``images`` (encoded bytes, or uint8 arrays as :meth:`Preprocessor.image_array` makes them) and their questions."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return self.answer([self.prepare(image, question, top_k) for image, question in zip(images, questions)])

    def describe(self) -> dict:
        config = self.bundle.config()
        tags = self.bundle.tags
        return {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "alias": self.bundle.alias,
            "kind": self.kind,
            "route": ROUTES[self.kind],
            # a pruned student's config records the heads each layer kept
            "heads": max((len(kept) for kept in (config.get("amad_pruning") or {}).get("heads", [])),
                         default=int(config["num_attention_heads"])),
            "layers": int(config["num_hidden_layers"]),
            "labels": self.labels,
            "image_size": self.image_size,
            "max_question_length": self.max_length,
            "preprocessing": self.preprocessor.describe(),
            "parity": {k.split(".", 1)[1]: float(v) for k, v in tags.items() if k.startswith("parity.")},
            "val_accuracy": float(tags["val_accuracy"]) if "val_accuracy" in tags else None,
            "providers": self.providers,
            "benchmark": self.bundle.benchmark(),
        }


def default_providers() -> list[str]:
    """CUDA first only where ONNX Runtime has it *and* a device answers (onnxruntime-gpu lists it on CPU-only machines)."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        try:
            import torch

            if torch.cuda.is_available():
                return [CUDA, CPU]
        except ImportError:
            pass
    return [CPU]
