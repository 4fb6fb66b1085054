"""The smoke test of ``amad run``: Serve the registered model on 127.0.0.1, ask real test-split
questions over HTTP, and check every answer against an offline ONNX Runtime prediction.

Offline answers come from the exported file and the training pre-processing (the checkpoint's
:class:`amad.data.preprocess.Preprocessor`, the image decoded from the same bytes the request
carries), called directly rather than through the server; the two must agree on every question.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from pipeline import names

HOST = "127.0.0.1"


def offline_answers(onnx_file: str | Path, checkpoint: Path, examples) -> list[str]:
    from amad.data.preprocess import load_preprocessor
    from amad.data.sources import model_labels
    from pipeline import onnx_tools

    preprocessor = load_preprocessor(checkpoint)  # the training pre-processing, as the checkpoint records it
    input_ids, attention_mask = preprocessor.encode([e.question for e in examples])
    images = preprocessor.pixels([preprocessor.decode(e.image_png) for e in examples])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **images}
    logits = onnx_tools.ort_logits(onnx_tools.open_session(onnx_file, threads=1), [batch])
    labels = model_labels(checkpoint)
    return [labels[int(i)] for i in logits.argmax(-1)]


def ask(url: str, body: bytes, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    # Loopback only: no proxy may see (or swallow) the request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def check(*, model_uri: str, tracking_uri: str, onnx_file: str, checkpoint: str, questions: int, port: int, keep_running: bool) -> dict:
    """Serve ``model_uri``, compare ``questions`` served answers with offline ones; returns the figures.

    Needs a connected Ray cluster (``amad run`` holds one). ``port`` 0 means any free port
    (:func:`pipeline.local_cluster.free_port`); the URL returned says which. Serve is shut down
    afterwards unless ``keep_running``.
    """
    from pipeline.local_cluster import free_port
    from serving.config import ServeConfig
    from serving.loadtest import json_body, test_examples
    from serving.server import start, stop

    checkpoint = Path(checkpoint)
    examples = test_examples(json.loads((checkpoint / names.BENCHMARK_FILE).read_text()), questions)
    expected = offline_answers(onnx_file, checkpoint, examples)
    port = port or free_port()
    cfg = ServeConfig(model=model_uri, tracking_uri=tracking_uri, host=HOST, port=port, replica_cpus=0.5, max_batch_size=8, batch_wait_ms=2.0)
    version = start(cfg)
    url = f"http://{HOST}:{port}/v1/answer"
    try:
        served = [ask(url, json_body(example))["answer"] for example in examples]
    finally:
        if not keep_running:
            stop(cfg.app_name)
    agreed = sum(a == b for a, b in zip(served, expected))
    example = json.loads(json_body(examples[0]))
    curl = (f"curl -s -X POST {url} -H 'Content-Type: application/json' "
            f"-d '{{\"image\": \"<base64 PNG>\", \"question\": \"{example['question']}\", \"top_k\": 3}}'")
    return {"questions": len(examples), "agreed": agreed, "served": served, "offline": expected, "version": version, "port": port,
            "url": url if keep_running else None, "curl": curl if keep_running else None}
