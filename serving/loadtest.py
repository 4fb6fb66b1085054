"""``amad loadtest``: real test-split questions (or images to caption) at a fixed concurrency against a
running ``amad serve``.

Bounded in count (``requests``) and time (``duration_s``); only the URL it is given (default the
loopback one). The route decides the requests: ``/v1/answer`` sends questions -- the served model's
benchmark spec (``GET /v1/model``) generates the first scenes of its *test* split, the same images and
questions ``amad/data`` makes; ``/v1/caption`` sends the first test-split images of a captioner's
``captions`` spec (with ``num_beams``). Each image goes as a base64 PNG. Reports p50/p95/p99 latency,
throughput, errors by status and the batch sizes the server reported (``X-Batch-Size``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Example:
    image_png: bytes
    question: str
    answer: str


def test_examples(benchmark: dict, count: int) -> list[Example]:
    """The first ``count`` questions of the model's test data: for the generated benchmark its test
    split (first scenes only: generation is sequential), each image as PNG bytes; for VQA-v2 files
    the ``test`` split (else ``val``), each image file's own bytes."""
    from PIL import Image

    from amad.data import benchmark as bench
    from amad.data.scenes import generate

    if (benchmark or {}).get("source") == "vqa_v2":
        return _vqa_v2_examples(benchmark, count)
    spec = bench.BenchmarkSpec.from_dict(benchmark) if benchmark else bench.BenchmarkSpec()
    scenes = min(spec.test_scenes, max(1, -(-count // spec.questions_per_scene)))
    # The test split's seed, as make_split derives it (private there; the offsets never change).
    images, questions = generate(scenes, spec.questions_per_scene, spec.seed + bench._SPLIT_SEED_OFFSET["test"], spec.scene)
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return [Example(pngs[q.scene], q.text, q.answer) for q in questions[:count]]


def _vqa_v2_examples(benchmark: dict, count: int) -> list[Example]:
    from pathlib import Path

    from amad.data.vqa_v2 import index_images

    files = benchmark.get("test") or benchmark["val"]
    questions = json.loads(Path(files["questions"]).read_text())["questions"]
    answers = {a["question_id"]: a["multiple_choice_answer"] for a in json.loads(Path(files["annotations"]).read_text())["annotations"]}
    images = index_images(Path(files["images"]))
    chosen = [q for q in questions if q["image_id"] in images and q["question_id"] in answers][:count]
    if not chosen:
        raise ValueError(f"{files['questions']}: no question with an annotation and an image file")
    return [Example(images[q["image_id"]].read_bytes(), q["question"], answers[q["question_id"]]) for q in chosen]


def caption_examples(captions: dict, count: int) -> list[Example]:
    """The first ``count`` images of a captioner's *test* split (its ``captions.json`` spec) as PNG bytes, each with
    its first reference caption as ``answer`` (``question`` empty)."""
    from amad.data.captions import CaptionSpec, make_caption_split

    test = make_caption_split(CaptionSpec.from_dict(captions), "test")
    return [Example(_png(image), "", references[0]) for image, references in zip(test.images[:count], test.references)]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_body(example: Example, num_beams: int = 1, max_length: int | None = None) -> bytes:
    values = {"image": base64.b64encode(example.image_png).decode(), "num_beams": num_beams}
    if max_length is not None:
        values["max_length"] = max_length
    return json.dumps(values).encode()


def json_body(example: Example, top_k: int = 1) -> bytes:
    return json.dumps({"image": base64.b64encode(example.image_png).decode(), "question": example.question, "top_k": top_k}).encode()


def summarise(latencies_ms: list[float], statuses: Counter, batch_sizes: Counter, wall_s: float) -> dict:
    lat = np.asarray(latencies_ms) if latencies_ms else np.asarray([np.nan])
    ok = statuses.get(200, 0)
    return {
        "requests": int(sum(statuses.values())),
        "ok": ok,
        "errors_by_status": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0])) if k != 200},
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput_rps": ok / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
        "mean_batch_size": (sum(k * v for k, v in batch_sizes.items()) / sum(batch_sizes.values())) if batch_sizes else None,
    }


async def _run(url: str, bodies: list[bytes], concurrency: int, requests: int, duration_s: float | None, headers: dict) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    batch_sizes: Counter = Counter()
    next_index = 0
    deadline = time.perf_counter() + duration_s if duration_s else None
    headers = {"Content-Type": "application/json", **headers}

    async def worker(session):
        nonlocal next_index
        while next_index < requests and (deadline is None or time.perf_counter() < deadline):
            body = bodies[next_index % len(bodies)]
            next_index += 1
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
                    if status == 200 and "X-Batch-Size" in response.headers:
                        batch_sizes[int(response.headers["X-Batch-Size"])] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                status = f"connection:{type(err).__name__}"
            latencies.append((time.perf_counter() - started) * 1e3)
            statuses[status] += 1

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.perf_counter()
    # trust_env=False: never a proxy, whatever the environment says; only the URL given is contacted.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return summarise(latencies, statuses, batch_sizes, time.perf_counter() - started)


def model_info(base_url: str, headers: dict | None = None) -> dict:
    import urllib.request

    request = urllib.request.Request(base_url.rstrip("/") + "/v1/model", headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies
    with opener.open(request, timeout=30) as response:
        return json.loads(response.read())


def run(url: str, concurrency: int, requests: int, duration_s: float | None = None, token: str | None = None,
        examples: int = 200, bodies: list[bytes] | None = None, num_beams: int = 1) -> dict:
    """Send ``requests`` (or until ``duration_s``) POSTs to ``url`` (``.../v1/answer`` or ``.../v1/caption``)
    with ``concurrency`` in flight; ``num_beams`` for captions."""
    if concurrency < 1 or requests < 1 or num_beams < 1:
        raise ValueError("concurrency, requests and num_beams must be >= 1")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if bodies is None:
        base, _, route = url.rpartition("/v1/")
        if route not in ("answer", "caption"):
            raise ValueError(f"{url}: the URL must end in /v1/answer or /v1/caption")
        info = model_info(base, headers)
        if route == "caption":
            if "captions" not in info:
                raise ValueError(f"{url}: the service serves {info.get('name')} v{info.get('version')}, not a captioner "
                                 f"(load-test its {info.get('route', '/v1/answer')} instead)")
            bodies = [caption_body(e, num_beams) for e in caption_examples(info["captions"], examples)]
        else:
            if "captions" in info:
                raise ValueError(f"{url}: the service serves the captioner {info.get('name')} v{info.get('version')} "
                                 f"(load-test {base}/v1/caption instead)")
            bodies = [json_body(e) for e in test_examples(info.get("benchmark") or {}, examples)]
    summary = asyncio.run(_run(url, bodies, concurrency, requests, duration_s, headers))
    return {"url": url, "concurrency": concurrency, "num_beams": num_beams, **summary}


def format_summary(summary: dict) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_status"].items()) or "none"
    batch = f"{summary['mean_batch_size']:.2f}" if summary["mean_batch_size"] else "n/a"
    return (
        f"{summary['requests']} requests at concurrency {summary['concurrency']} in {summary['wall_s']:.1f} s: "
        f"{summary['throughput_rps']:.1f} req/s; latency p50 {summary['p50_ms']:.1f} ms, p95 {summary['p95_ms']:.1f} ms, "
        f"p99 {summary['p99_ms']:.1f} ms; errors: {errors}; mean batch size {batch}"
    )
