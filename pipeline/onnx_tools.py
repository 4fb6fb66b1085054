"""ONNX export of a question-answering student and the ONNX Runtime sessions that run it.

The exported graph takes ``input_ids`` ``(B, L)`` int64, ``attention_mask`` ``(B, L)`` int64 and
``pixel_values`` ``(B, 3, S, S)`` float32, and returns ``logits`` ``(B, num_labels)``; ``B`` and
``L`` (up to the model's ``max_position_embeddings``) are dynamic. A model fed by a checkpoint's
image processor (aspect-preserving resize, padded per batch) is exported from an example that has a
``pixel_mask``: the graph then also takes ``pixel_mask`` ``(B, H, W)`` int64, and ``H``, ``W`` are
dynamic too. The model must embed images
deterministically (:class:`amad.models.DeterministicViltEmbeddings`): stock ViLT samples its patch
order with ``torch.multinomial``, which cannot be exported.

Execution providers are chosen for the machine (:func:`machine_providers`): the CUDA provider only
where a CUDA device is actually usable. ``onnxruntime-gpu`` lists the CUDA provider even on a
machine without a GPU, and asking for it there prints an ONNX Runtime ERROR before falling back.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values")
MASKED_INPUT_NAMES = (*INPUT_NAMES, "pixel_mask")
OUTPUT_NAME = "logits"
EXPORTERS = ("dynamo", "torchscript")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class LogitsOnly(nn.Module):
    """``(input_ids, attention_mask, pixel_values) -> logits``: the model with a tensor-only signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits


class MaskedLogitsOnly(LogitsOnly):
    """``(input_ids, attention_mask, pixel_values, pixel_mask) -> logits``: images of any size, padded per batch."""

    def forward(self, input_ids, attention_mask, pixel_values, pixel_mask):  # noqa: D102 (as the class)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, pixel_mask=pixel_mask).logits


def input_names(batch: dict) -> tuple[str, ...]:
    """The graph inputs a batch feeds: with ``pixel_mask`` when the batch has one."""
    return MASKED_INPUT_NAMES if "pixel_mask" in batch else INPUT_NAMES


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The ONNX feed for a dataset batch (extra keys such as labels are dropped)."""
    missing = [name for name in INPUT_NAMES if name not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: an ONNX student needs {list(INPUT_NAMES)}")
    feed = {
        "input_ids": batch["input_ids"].to(torch.int64).numpy(),
        "attention_mask": batch["attention_mask"].to(torch.int64).numpy(),
        "pixel_values": batch["pixel_values"].to(torch.float32).numpy(),
    }
    if "pixel_mask" in batch:
        feed["pixel_mask"] = batch["pixel_mask"].to(torch.int64).numpy()
    return feed


def export_onnx(model: nn.Module, path: str | Path, example: dict[str, torch.Tensor], *, exporter: str = "dynamo", opset: int = 18) -> Path:
    """Export ``model`` (eval mode) to ``path`` with dynamic batch and text length; checked by ``onnx.checker``.

    ``example`` is a dataset batch of at least 2 rows (the dynamo exporter specialises size-1 dims).
    The file is written next to ``path`` and renamed into place, so a failed export leaves no half file.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} must be one of {EXPORTERS}")
    if example["input_ids"].shape[0] < 2:
        raise ValueError("the export example needs a batch of at least 2 rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    masked = "pixel_mask" in example
    names = input_names(example)
    wrapper = (MaskedLogitsOnly if masked else LogitsOnly)(model).eval()
    args = tuple(torch.as_tensor(example[name]) for name in names)
    max_text = int(model.config.max_position_embeddings)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the checker and the gate judge the result
        common = dict(input_names=list(names), output_names=[OUTPUT_NAME])
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            text = torch.export.Dim("text", min=1, max=max_text)
            shapes = {"input_ids": {0: batch, 1: text}, "attention_mask": {0: batch, 1: text}, "pixel_values": {0: batch}}
            if masked:
                patch = int(model.config.patch_size)
                # multiples of the patch size, as ViltImageProcessor pads (size_divisor) and the example shows
                height, width = torch.export.Dim("rows", min=1, max=512) * patch, torch.export.Dim("cols", min=1, max=512) * patch
                shapes["pixel_values"] = {0: batch, 2: height, 3: width}
                shapes["pixel_mask"] = {0: batch, 1: height, 2: width}
            common.update(dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=False, verbose=False)
        else:
            axes = {"input_ids": {0: "batch", 1: "text"}, "attention_mask": {0: "batch", 1: "text"},
                    "pixel_values": {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
            if masked:
                axes["pixel_values"] = {0: "batch", 2: "height", 3: "width"}
                axes["pixel_mask"] = {0: "batch", 1: "height", 2: "width"}
            common.update(
                dynamic_axes=axes,
                opset_version=min(opset, 17),  # the TorchScript exporter's newest opset
                dynamo=False,
            )
        torch.onnx.export(wrapper, args, str(partial), **common)
    onnx.checker.check_model(str(partial), full_check=True)
    os.replace(partial, path)
    return path


def cuda_usable() -> bool:
    """A CUDA device is present (not merely a CUDA build of a library)."""
    return torch.cuda.is_available()


def machine_providers() -> list[str]:
    """``[CUDA, CPU]`` where ONNX Runtime has the CUDA provider and a GPU exists, else ``[CPU]``."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and cuda_usable():
        return [CUDA, CPU]
    return [CPU]


def open_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An ``InferenceSession`` on ``path``; a clear ValueError if the file is missing or not a valid model."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX model there")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers or machine_providers())
    except Exception as err:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{path}: ONNX Runtime cannot load this model ({type(err).__name__}: {str(err).strip()[:300]})") from None


def ort_logits(session, batches) -> np.ndarray:
    """Logits ``(N, num_labels)`` for an iterable of dataset batches."""
    return np.concatenate([session.run([OUTPUT_NAME], model_inputs(batch))[0] for batch in batches])


def torch_logits(model: nn.Module, batches) -> np.ndarray:
    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in batches:
            names = input_names(batch)
            wrapper = MaskedLogitsOnly(model) if "pixel_mask" in names else LogitsOnly(model)
            outputs.append(wrapper(*(batch[name] for name in names)).numpy())
    return np.concatenate(outputs)


def optimize_graph(src: str | Path, dst: str | Path, *, heads: int, hidden: int) -> str:
    """ONNX Runtime's offline graph optimisation of ``src`` into ``dst``; returns how it was done.

    First the transformer optimizer (fusions for attention, layer norm, GELU), told the model's
    real head count and hidden size; if it fails on this graph, ORT's own ``ORT_ENABLE_EXTENDED``
    level (the level whose saved graph stays portable across providers).
    """
    import onnxruntime as ort

    dst = Path(dst)
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(str(src), model_type="vit", num_heads=heads, hidden_size=hidden, opt_level=1, use_gpu=False)
        optimized.save_model_to_file(str(dst))
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        return f"transformer optimizer (vit, heads={heads}, hidden={hidden}; fused {fused})"
    except Exception as err:  # noqa: BLE001 -- any failure: fall back to ORT's generic passes
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(dst)
        options.log_severity_level = 3
        ort.InferenceSession(str(src), sess_options=options, providers=[CPU])
        return f"onnxruntime ORT_ENABLE_EXTENDED (transformer optimizer failed: {type(err).__name__})"


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of the weights of MatMul/Gemm nodes (activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return Path(dst)


def latency_ms(run_once, repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """p50/p99 wall time of ``run_once()`` in milliseconds."""
    for _ in range(warmup):
        run_once()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        samples.append((time.perf_counter() - start) * 1e3)
    samples = np.sort(np.asarray(samples))
    return {"p50": float(np.percentile(samples, 50)), "p99": float(np.percentile(samples, 99))}


def interleaved_latency_ms(runs: dict, repeats: int = 50, warmup: int = 5) -> dict[str, dict[str, float]]:
    """p50/p99 wall time (ms) of each ``runs[name]()``, called round-robin with a rotating order, so
    load from other processes on a shared machine hits every model alike; the ratio of two p50s is
    then a fair same-runtime comparison, where two back-to-back measurements are not."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for i in range(repeats):
        for name, run in order[i % len(order):] + order[: i % len(order)]:
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))} for name, v in samples.items()}
