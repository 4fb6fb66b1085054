"""``amad serve``: the Predictor without Ray, and the real Serve app on 127.0.0.1 over a tiny exported model.

Serve is started once for the module (on the session's two-node loopback cluster) and always shut
down. The clean-shutdown test runs ``amad serve --blocking`` as a subprocess with its own Ray and
checks that every process it started is gone after Ctrl-C.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.text import load_tokenizer
from pipeline import export
from serving import loadtest
from serving.config import Limits, ServeConfig
from serving.inputs import BadInput, parse_json
from serving.model import SPIN_ENTRY, Predictor, load_bundle
from test_export import export_config, train_tiny_student

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_body_bytes=64 * 1024, max_image_bytes=32 * 1024, max_image_pixels=256 * 256, max_question_chars=200, max_top_k=5)
MODEL = "models:/amad-student@champion"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def registered(tiny_teacher, tmp_path_factory) -> dict:
    """A tiny trained student exported and registered as amad-student@champion in a temp SQLite store."""
    root = tmp_path_factory.mktemp("serve")
    checkpoint = train_tiny_student(tiny_teacher, root / "run" / "epoch_0002")
    workdir = root / "work"
    report = export.main(export_config(checkpoint, tiny_teacher), workdir)
    return {"checkpoint": checkpoint, "workdir": workdir, "teacher": tiny_teacher, "uri": report["registry"]["tracking_uri"]}


@pytest.fixture(scope="module")
def predictor(registered) -> Predictor:
    return Predictor(load_bundle(MODEL, registered["uri"], cache=registered["workdir"] / "cache"), threads=1, limits=LIMITS)


@pytest.fixture(scope="module")
def examples(predictor) -> list:
    return loadtest.test_examples(predictor.bundle.benchmark(), 24)


def offline_answers(predictor: Predictor, count: int) -> list[str]:
    """ORT on the offline test batch exactly as training/eval build it (make_split -> batch)."""
    spec = BenchmarkSpec.from_dict(predictor.bundle.benchmark())
    batch = make_split(spec, "test", load_tokenizer(predictor.bundle.directory)).batch(torch.arange(count))
    feed = {k: batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values")}
    logits = predictor.session.run(["logits"], feed)[0]
    return [predictor.labels[i] for i in logits.argmax(-1)]


# ------------------------------------------------------------------ without Ray


def test_predict_without_ray_matches_offline_ort(predictor, examples):
    got = predictor.predict([e.image_png for e in examples], [e.question for e in examples], top_k=3)
    assert [a.answer for a in got] == offline_answers(predictor, len(examples))
    for answer in got:
        assert len(answer.top_k) == 3 and answer.top_k[0] == (answer.answer, answer.score)
        assert 0 < answer.score <= 1 and answer.top_k[0][1] >= answer.top_k[1][1] >= answer.top_k[2][1]


def test_predictor_threads_do_not_spin(predictor):
    """ORT's pool threads would otherwise busy-wait between runs on the cores the replica's event loop needs."""
    two = Predictor(predictor.bundle, threads=2, limits=LIMITS)  # the same downloaded files, a second session
    for session in (predictor.session, two.session):
        assert session.get_session_options().get_session_config_entry(SPIN_ENTRY) == "0"
    assert two.session.get_session_options().intra_op_num_threads == 2


def test_predict_converts_greyscale_rgba_and_palette(predictor, examples):
    image = Image.open(io.BytesIO(examples[0].image_png))
    for mode in ("L", "RGBA", "P", "LA"):
        [answer] = predictor.predict([png(image.convert(mode))], [examples[0].question])
        assert answer.answer in predictor.labels


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 422, "must be a JSON object"),
    (json.dumps({"image": "aGk=", "question": "q", "top_k": True}).encode(), 422, "top_k must be a whole number"),
    (json.dumps({"image": 3, "question": "q"}).encode(), 422, "image must be a base64 string"),
])
def test_parse_json_rejects_without_a_model(body, status, message):
    with pytest.raises(BadInput) as err:
        parse_json(body, LIMITS)
    assert err.value.status == status and message in err.value.message


def test_config_is_validated_before_ray():
    with pytest.raises(ValueError, match="must look like models:/"):
        ServeConfig(model="amad-student", tracking_uri="sqlite:///x.db")
    with pytest.raises(ValueError, match="MIN <= MAX"):
        ServeConfig(model=MODEL, tracking_uri="sqlite:///x.db", autoscale=(3, 1))
    assert ServeConfig(model=MODEL, tracking_uri="x", replica_cpus=0.5).threads == 1


def test_bearer_token_check():
    from serving.app import AnswerService
    from serving.config import ReplicaSettings, token_hash

    cls = AnswerService.func_or_class

    class Stub:
        settings = ReplicaSettings(model_uri=MODEL, tracking_uri="x", token_sha256=token_hash("s3cret"))

    class FakeRequest:
        def __init__(self, value):
            self.headers = {"authorization": value} if value is not None else {}

    assert cls._authorised(Stub(), FakeRequest("Bearer s3cret"))
    assert not cls._authorised(Stub(), FakeRequest("Bearer wrong"))
    assert not cls._authorised(Stub(), FakeRequest(None))
    assert not cls._authorised(Stub(), FakeRequest("Basic s3cret"))


# ------------------------------------------------------------------ real Serve


@pytest.fixture(scope="module")
def served(registered, ray_cluster):
    """The app on 127.0.0.1:<free port>, one replica of 0.5 CPU, batches of up to 16 within 20 ms."""
    import requests
    from ray import serve

    from serving.app import deploy

    port = free_port()
    cfg = ServeConfig(model=MODEL, tracking_uri=registered["uri"], port=port, replica_cpus=0.5,
                      max_batch_size=16, batch_wait_ms=20, limits=LIMITS)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(cfg)
        session = requests.Session()
        session.trust_env = False  # loopback only; never a proxy
        yield {"base": f"http://127.0.0.1:{port}", "cfg": cfg, "http": session}
    finally:
        serve.shutdown()


def post(served, **kwargs):
    return served["http"].post(served["base"] + "/v1/answer", timeout=60, **kwargs)


def good_request_succeeds(served, example) -> None:
    response = post(served, json={"image": b64(example.image_png), "question": example.question})
    assert response.status_code == 200, response.text
    assert response.json()["answer"]


@pytest.mark.integration
def test_served_answers_equal_offline_ort(served, predictor, examples):
    expected = offline_answers(predictor, len(examples))
    for example, answer in zip(examples, expected):
        response = post(served, json={"image": b64(example.image_png), "question": example.question, "top_k": 2})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["answer"] == answer
        assert body["model"] == {"name": "amad-student", "version": "1"} and len(body["top_k"]) == 2 and body["latency_ms"] > 0
    multipart = post(served, files={"image": ("x.png", examples[0].image_png, "image/png")}, data={"question": examples[0].question})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["answer"] == expected[0]


@pytest.mark.integration
def test_model_health_and_docs(served):
    model = served["http"].get(served["base"] + "/v1/model", timeout=30).json()
    assert (model["name"], model["version"], model["alias"], model["heads"], model["layers"]) == ("amad-student", "1", "champion", 2, 1)
    assert model["labels"] and "max_abs_logit_diff" in model["parity"]
    assert served["http"].get(served["base"] + "/healthz", timeout=30).json()["status"] == "ok"
    schema = served["http"].get(served["base"] + "/openapi.json", timeout=30).json()
    assert "/v1/answer" in schema["paths"] and served["http"].get(served["base"] + "/docs", timeout=30).status_code == 200


@pytest.mark.integration
def test_concurrent_requests_are_batched(served, examples):
    bodies = [loadtest.json_body(e) for e in examples]
    summary = loadtest.run(served["base"] + "/v1/answer", concurrency=16, requests=96, bodies=bodies)
    assert summary["errors_by_status"] == {}
    assert max(int(size) for size in summary["batch_sizes"]) > 1, summary["batch_sizes"]


def noisy_png(side: int) -> bytes:
    return png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)))


def bad_cases(example) -> dict:
    image = Image.open(io.BytesIO(example.image_png))
    good = {"image": b64(example.image_png), "question": example.question}
    return {
        "malformed json": ({"data": b'{"image": ', "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        "wrong content type": ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "not supported"),
        "missing field": ({"json": {"image": good["image"]}}, 422, "missing field(s) ['question']"),
        "extra field": ({"json": {**good, "colour": "red"}}, 422, "unknown field(s) ['colour']"),
        "not base64": ({"json": {**good, "image": "@@not base64@@"}}, 400, "not valid base64"),
        "not an image": ({"json": {**good, "image": b64(b"hello, world")}}, 400, "not a recognised image format"),
        "truncated image": ({"json": {**good, "image": b64(example.image_png[: len(example.image_png) // 2])}}, 400, "truncated or corrupt"),
        "too many pixels": ({"json": {**good, "image": b64(png(image.resize((300, 300))))}}, 413, "pixels, over the limit of 65536"),
        "too many image bytes": ({"json": {**good, "image": b64(noisy_png(110))}}, 413, "over the limit of 32768"),
        "zero-sized image": ({"json": {**good, "image": ""}}, 400, "image is empty"),
        "empty question": ({"json": {**good, "question": "   "}}, 422, "question is empty"),
        "over-long question (characters)": ({"json": {**good, "question": "what " * 50}}, 422, "characters, over the limit of 200"),
        "over-long question (words)": ({"json": {**good, "question": "is the red object " * 5}}, 422, "this model reads at most 14"),
        "top_k zero": ({"json": {**good, "top_k": 0}}, 422, "top_k=0 is out of range"),
        "top_k too large": ({"json": {**good, "top_k": 6}}, 422, "top_k=6 is out of range (1..5)"),
        "top_k not a number": ({"json": {**good, "top_k": "3"}}, 422, "top_k must be a whole number"),
        "oversized body": ({"data": b"x" * (100 * 1024), "headers": {"Content-Type": "application/json"}}, 413, "over the limit of 65536"),
        "multipart without question": ({"files": {"image": ("x.png", example.image_png, "image/png")}}, 422, "missing form field(s) ['question']"),
        "multipart extra field": ({"data": {"question": "q"}, "files": {"image": ("x.png", example.image_png, "image/png"), "x": ("", b"")}}, 422, "unknown form field(s) ['x']"),
        "multipart image as text": ({"data": {"image": "abc"}, "files": {"question": (None, example.question)}}, 422, "image must be a file part"),
    }


BAD_CASES = list(bad_cases(loadtest.Example(png(Image.new("RGB", (32, 32))), "q", "a")))


@pytest.mark.integration
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_replica_stays_up(served, examples, case):
    kwargs, status, message = bad_cases(examples[0])[case]
    response = post(served, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and message in body["error"], body
    good_request_succeeds(served, examples[0])


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_greyscale_rgba_and_palette_images_are_converted(served, examples, mode):
    image = Image.open(io.BytesIO(examples[0].image_png)).convert(mode)
    response = post(served, json={"image": b64(png(image)), "question": examples[0].question})
    assert response.status_code == 200, response.text


@pytest.mark.integration
def test_unknown_words_are_not_an_error(served, examples):
    response = post(served, json={"image": b64(examples[0].image_png), "question": "what zorblax is the qwerty object ?"})
    assert response.status_code == 200, response.text


@pytest.mark.integration
def test_500_requests_at_concurrency_32_without_errors(served, examples):
    bodies = [loadtest.json_body(e) for e in examples]
    summary = loadtest.run(served["base"] + "/v1/answer", concurrency=32, requests=500, bodies=bodies)
    assert summary["ok"] == 500 and summary["errors_by_status"] == {}, summary


@pytest.mark.integration
def test_a_new_champion_is_picked_up_without_dropping_requests(served, registered, examples):
    from serving.app import deploy

    bodies = [loadtest.json_body(e) for e in examples]
    result = {}
    load = threading.Thread(target=lambda: result.update(loadtest.run(served["base"] + "/v1/answer", 8, 400, duration_s=120, bodies=bodies)))
    load.start()
    report = export.main(export_config(registered["checkpoint"], registered["teacher"]), registered["workdir"])
    assert (report["registry"]["version"], report["registry"]["alias"]) == ("2", "champion")
    assert deploy(served["cfg"]) == "2"
    load.join()
    assert result["errors_by_status"] == {}, result
    deadline = time.time() + 60
    while served["http"].get(served["base"] + "/v1/model", timeout=30).json()["version"] != "2":
        assert time.time() < deadline, "the replica never switched to version 2"
        time.sleep(0.5)
    response = post(served, json={"image": b64(examples[0].image_png), "question": examples[0].question})
    assert response.json()["model"]["version"] == "2"


# ------------------------------------------------------------------ the CLI, and a clean shutdown


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc, no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
def test_cli_serves_answers_loadtests_and_shuts_down_cleanly(registered, examples, tmp_path):
    import requests

    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="amad-serve-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model", MODEL, "--tracking-uri", registered["uri"],
               "--port", str(port), "--replica-cpus", "0.5", "--blocking", "--poll-s", "2"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read_output() -> None:  # line by line, so the test can wait for one while the command runs
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    started_here: set[int] = set()
    try:
        http = requests.Session()
        http.trust_env = False
        deadline = time.time() + 180
        while not any("direct to a replica" in line for line in lines):
            assert process.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "amad serve printed no direct replica URL in 180 s:\n" + "".join(lines)[-3000:]
            started_here |= descendants(process.pid)
            time.sleep(1)
        started_here |= descendants(process.pid)
        direct = next(line for line in lines if "direct to a replica" in line).split()[-1]
        assert direct.startswith("http://127.0.0.1:") and direct.endswith("/v1/answer") and f":{port}/" not in direct, direct
        # The proxy and the replica's own server answer the same question the same way.
        ask = {"image": b64(examples[0].image_png), "question": examples[0].question}
        via_proxy = http.post(f"http://127.0.0.1:{port}/v1/answer", json=ask, timeout=60)
        via_replica = http.post(direct, json=ask, timeout=60)
        assert via_proxy.status_code == via_replica.status_code == 200, (via_proxy.text, via_replica.text)
        assert via_proxy.json()["answer"] == via_replica.json()["answer"]
        out = tmp_path / "load.json"
        load = subprocess.run([sys.executable, "-m", "pipeline.cli", "loadtest", "--url", direct,
                               "--concurrency", "4", "--requests", "40", "--out", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert load.returncode == 0, load.stdout + load.stderr
        assert "p50" in load.stdout and "p99" in load.stdout
        summary = json.loads(out.read_text())
        assert summary["ok"] == 40 and summary["errors_by_status"] == {}
    finally:
        started_here |= descendants(process.pid)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:  # pragma: no cover -- leave nothing behind even on failure
            process.kill()
            process.wait()
        reader.join(timeout=10)
        output = "".join(lines)
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert started_here, "amad serve started no processes?"
    deadline = time.time() + 30
    while any(alive(pid) for pid in started_here) and time.time() < deadline:
        time.sleep(0.5)
    left = [pid for pid in started_here if alive(pid)]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes left behind: {left}"
