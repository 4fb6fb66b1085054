"""``amad serve``: the Predictor without Ray, and the real Serve app on 127.0.0.1 over a tiny exported model.

Serve is started once for the module (on the session's two-node loopback cluster) and always shut
down. The module registers two versions of one student (``versions``); tests that move the
``champion`` alias say which version they expect instead of assuming an order. The CLI test runs
``amad serve --blocking`` as a subprocess with its own Ray and a bearer token, follows the alias
and checks that every process it started is gone after Ctrl-C.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import pickle
import signal
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
from conftest import submit_and_wait
from pipeline.local_cluster import free_port
from serving.model import SPIN_ENTRY, Predictor, load_bundle, open_predictor, resolve_version
from test_export import export_config, train_tiny_student

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_body_bytes=64 * 1024, max_image_bytes=32 * 1024, max_image_pixels=256 * 256, max_question_chars=200, max_top_k=5)
MODEL = "models:/amad-student@champion"


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
    uri = report["registry"]["tracking_uri"]
    files = load_bundle(MODEL, uri, cache=root / "files").directory  # for the offline reference only
    return {"checkpoint": checkpoint, "workdir": workdir, "teacher": tiny_teacher, "uri": uri, "files": files,
            "cache": root / "serve-cache"}


@pytest.fixture(scope="module")
def versions(registered) -> tuple[str, str]:
    """Two registered versions of the student (the second from a second export of the same checkpoint),
    with ``champion`` left on the first."""
    from mlflow.tracking import MlflowClient

    first = resolve_version(MODEL, registered["uri"])[1]
    report = export.main(export_config(registered["checkpoint"], registered["teacher"]), registered["workdir"])
    second = report["registry"]["version"]
    assert second != first
    MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"]).set_registered_model_alias("amad-student", "champion", first)
    return first, second


def move_champion(registered, version: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"]).set_registered_model_alias("amad-student", "champion", version)


@pytest.fixture(scope="module")
def predictor(registered) -> Predictor:
    predictor = open_predictor(MODEL, registered["uri"], cache_dir=registered["cache"], threads=1, limits=LIMITS)
    assert list(registered["cache"].iterdir()) == [], "open_predictor left its download behind"
    return predictor


@pytest.fixture(scope="module")
def examples(predictor) -> list:
    return loadtest.test_examples(predictor.bundle.benchmark(), 24)


def offline_answers(predictor: Predictor, count: int, files: Path) -> list[str]:
    """ORT on the offline test batch exactly as training/eval build it (make_split -> batch)."""
    spec = BenchmarkSpec.from_dict(predictor.bundle.benchmark())
    batch = make_split(spec, "test", load_tokenizer(files)).batch(torch.arange(count))
    feed = {k: batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values")}
    logits = predictor.session.run(["logits"], feed)[0]
    return [predictor.labels[i] for i in logits.argmax(-1)]


# ------------------------------------------------------------------ without Ray


def test_predict_without_ray_matches_offline_ort(predictor, examples, registered):
    """The predictor's downloaded files are already deleted (open_predictor): it answers from memory."""
    got = predictor.predict([e.image_png for e in examples], [e.question for e in examples], top_k=3)
    assert [a.answer for a in got] == offline_answers(predictor, len(examples), registered["files"])
    assert not predictor.bundle.directory.exists() and predictor.describe()["labels"] == predictor.labels
    for answer in got:
        assert len(answer.top_k) == 3 and answer.top_k[0] == (answer.answer, answer.score)
        assert 0 < answer.score <= 1 and answer.top_k[0][1] >= answer.top_k[1][1] >= answer.top_k[2][1]


def test_predictor_threads_do_not_spin(predictor, registered):
    """ORT's pool threads would otherwise busy-wait between runs on the cores the replica's event loop needs."""
    two = open_predictor(MODEL, registered["uri"], cache_dir=registered["cache"], threads=2, limits=LIMITS)
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


def test_replicas_receive_only_the_token_hash_and_a_new_version_keeps_the_code_version():
    """What Serve stores and ships to replicas (the bound deployment, pickled) never holds the token;
    a new model version changes only the user config (reconfigure in place), a new token restarts."""
    from serving.app import build
    from serving.config import token_hash

    token = "s3cret-token-4f1c9a"
    cfg = ServeConfig(model=MODEL, tracking_uri="sqlite:///x.db")
    v1, v2 = build(cfg.app_args(token), "1"), build(cfg.app_args(token), "2")
    other_token = build(cfg.app_args("another-token"), "1")
    shipped = pickle.dumps((v1._bound_deployment._replica_config.init_args, v1._bound_deployment._deployment_config.user_config))
    assert token.encode() not in shipped and token_hash(token).encode() in shipped
    assert token.encode() not in pickle.dumps(v1._bound_deployment._deployment_config)
    assert v1._bound_deployment._deployment_config.user_config["model_version"] == "1"
    assert v1._bound_deployment.version == v2._bound_deployment.version, "a new model version must not restart replicas"
    assert v1._bound_deployment.version != other_token._bound_deployment.version, "new constructor settings must restart replicas"


# ------------------------------------------------------------------ real Serve


@pytest.fixture(scope="module")
def served(registered, ray_cluster):
    """The app on 127.0.0.1:<free port>, one replica of 0.5 CPU, batches of up to 16 within 20 ms."""
    import requests
    from ray import serve

    from serving.app import deploy

    port = free_port()
    cfg = ServeConfig(model=MODEL, tracking_uri=registered["uri"], port=port, replica_cpus=0.5,
                      max_batch_size=16, batch_wait_ms=20, limits=LIMITS, cache_dir=str(registered["cache"]))
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        version = deploy(cfg)
        session = requests.Session()
        session.trust_env = False  # loopback only; never a proxy
        # "version": what the replicas serve now; a test that deploys another one updates it.
        yield {"base": f"http://127.0.0.1:{port}", "cfg": cfg, "http": session, "version": version}
    finally:
        serve.shutdown()


def post(served, **kwargs):
    return served["http"].post(served["base"] + "/v1/answer", timeout=60, **kwargs)


def good_request_succeeds(served, example) -> None:
    response = post(served, json={"image": b64(example.image_png), "question": example.question})
    assert response.status_code == 200, response.text
    assert response.json()["answer"]


@pytest.mark.integration
def test_served_answers_equal_offline_ort(served, predictor, examples, registered):
    expected = offline_answers(predictor, len(examples), registered["files"])
    for example, answer in zip(examples, expected):
        response = post(served, json={"image": b64(example.image_png), "question": example.question, "top_k": 2})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["answer"] == answer
        assert body["model"] == {"name": "amad-student", "version": served["version"]} and len(body["top_k"]) == 2 and body["latency_ms"] > 0
    multipart = post(served, files={"image": ("x.png", examples[0].image_png, "image/png")}, data={"question": examples[0].question})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["answer"] == expected[0]


@pytest.mark.integration
def test_model_health_and_docs(served):
    model = served["http"].get(served["base"] + "/v1/model", timeout=30).json()
    assert (model["name"], model["version"], model["alias"], model["heads"], model["layers"]) == ("amad-student", served["version"], "champion", 2, 1)
    assert model["labels"] and "max_abs_logit_diff" in model["parity"]
    health = served["http"].get(served["base"] + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["replica"]["pid"] == model["replica"]["pid"] > 0
    assert list(Path(served["cfg"].cache_dir).iterdir()) == [], "a replica left its download behind"
    schema = served["http"].get(served["base"] + "/openapi.json", timeout=30).json()
    assert "/v1/answer" in schema["paths"] and served["http"].get(served["base"] + "/docs", timeout=30).status_code == 200


def scrape_nodes() -> list[str]:
    """The Prometheus text of every live Ray node's metrics agent (where Prometheus would scrape)."""
    import ray
    import requests

    session = requests.Session()
    session.trust_env = False  # loopback only; never a proxy
    return [session.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30).text
            for node in ray.nodes() if node["Alive"]]


def sample_values(texts: list[str], name: str, **labels) -> list[float]:
    """Values of every sample called ``name`` whose labels include ``labels``, over all nodes."""
    from prometheus_client.parser import text_string_to_metric_families

    return [sample.value for text in texts for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())]


@pytest.mark.integration
def test_prometheus_metrics_of_the_service_and_of_serve_move_with_requests(served, examples):
    """Answered, refused and health requests to an app of its own (its ``application`` label starts from
    nothing, so every figure is exact whatever the module's other tests sent): the node agents export our
    counters, histograms and version gauge (serving/metrics.py) and Serve's own HTTP request counter.
    Ray's agents export every few seconds: the test waits for the figures, not for a time."""
    from ray import serve

    from serving.app import build

    app, prefix = "amad-metrics", "/metrics-check"
    base = served["base"] + prefix
    serve.run(build(served["cfg"].app_args(), served["version"]), name=app, route_prefix=prefix, blocking=False)

    def figures() -> dict:
        texts = scrape_nodes()
        total = lambda name, **labels: sum(sample_values(texts, name, application=app, **labels))  # noqa: E731
        return {"ok": total("ray_amad_requests_total", route="/v1/answer", status_class="2xx"),
                "refused": total("ray_amad_requests_total", route="/v1/answer", status_class="4xx"),
                "health": total("ray_amad_requests_total", route="/healthz", status_class="2xx"),
                "batches": total("ray_amad_batch_size_count"), "batches_of_one": total("ray_amad_batch_size_bucket", le="1.0"),
                "inference_calls": total("ray_amad_inference_ms_count"), "serve_http": total("ray_serve_num_http_requests_total"),
                "versions": sample_values(texts, "ray_amad_model_version", application=app, model="amad-student")}

    answered, refused = 5, 3
    try:
        wait_until(lambda: served["http"].get(base + "/healthz", timeout=30).status_code == 200, 120, f"{app} answering")
        for example in examples[:answered]:
            response = served["http"].post(base + "/v1/answer", json={"image": b64(example.image_png), "question": example.question}, timeout=60)
            assert response.status_code == 200, response.text
        for _ in range(refused):
            response = served["http"].post(base + "/v1/answer", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=60)
            assert response.status_code == 400, response.text

        def exported(now: dict) -> bool:
            return (now["ok"] >= answered and now["refused"] >= refused and now["health"] >= 1 and now["batches"] >= answered
                    and now["serve_http"] >= answered + refused + 1 and bool(now["versions"]))

        deadline = time.monotonic() + 120
        while not exported(now := figures()):
            assert time.monotonic() < deadline, f"the metrics were not exported within 120 s: {now}"
            time.sleep(1)
    finally:
        serve.delete(app)
    assert (now["ok"], now["refused"]) == (answered, refused), f"a request counted twice or in another class: {now}"
    # One request at a time: every batch held one request. (Ray exports a histogram's _sum from its
    # buckets, so the buckets, not the sum, say how many requests the batches held.)
    assert now["batches"] == now["batches_of_one"] == now["inference_calls"] == answered, now
    assert now["versions"] == [float(served["version"])], now["versions"]


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # kept after the run (git-ignored)


@pytest.mark.integration
def test_the_demo_page_answers_like_the_api_in_a_real_browser(served, examples, browser, tmp_path):
    """GET / in headless Chromium: the page shows the model, a built-in example and an uploaded PNG get
    the JSON API's answers with top-k scores, latency and version; a file that is not an image, an image
    over the pixel limit and a question over the length limit show the API's own 4xx status and message.
    Screenshots are kept in test-artifacts/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def api(example, question=None) -> dict:
        response = post(served, json={"image": b64(example.image_png), "question": question or example.question, "top_k": 3})
        return {"status": response.status_code, **response.json()}

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def ask_and_wait(element_id: str) -> str:
        return submit_and_wait(browser, element_id)

    wait = WebDriverWait(browser, 60)
    browser.get(served["base"] + "/")
    wait.until(lambda d: d.find_element(By.ID, "example").get_attribute("data-loaded") not in (None, "", "0"))
    wait.until(lambda d: "version" in d.find_element(By.ID, "model").text)
    assert f"amad-student version {served['version']}" in text("model"), text("model")

    # a built-in example: the page's answer is the API's for the same image and question
    Select(browser.find_element(By.ID, "example")).select_by_index(1)
    example = examples[0]  # the page's first example is the test split's first question, as in `examples`
    assert browser.find_element(By.ID, "question").get_attribute("value") == example.question
    expected = api(example)
    assert ask_and_wait("answer") == expected["answer"], (text("answer"), expected)
    rows = browser.find_elements(By.CSS_SELECTOR, "#scores tr")
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == [t["answer"] for t in expected["top_k"]]
    assert float(text("latency")) > 0 and text("version") == f"amad-student v{served['version']}"
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "demo-page.png"))

    # an uploaded PNG and a typed question
    upload = tmp_path / "scene.png"
    upload.write_bytes(examples[3].image_png)
    browser.find_element(By.ID, "file").send_keys(str(upload))
    def previewing(data: bytes):
        return lambda d: b64(data)[:40] in d.find_element(By.ID, "preview").get_attribute("src")

    wait.until(previewing(upload.read_bytes()))
    field = browser.find_element(By.ID, "question")
    field.clear()
    field.send_keys(examples[3].question)
    assert ask_and_wait("answer") == api(examples[3])["answer"]

    # bad input: the API's own message and status, shown on the page
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these bytes are no image at all")
    refused = post(served, json={"image": b64(not_an_image.read_bytes()), "question": examples[0].question})
    assert refused.status_code == 400
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    wait.until(previewing(not_an_image.read_bytes()))
    assert ask_and_wait("error") == f"400: {refused.json()['error']}"
    too_big = tmp_path / "big.png"  # few bytes, over the served limit of 256 x 256 pixels
    too_big.write_bytes(png(Image.new("RGB", (300, 300), (200, 40, 40))))
    over_pixels = post(served, json={"image": b64(too_big.read_bytes()), "question": examples[0].question})
    assert over_pixels.status_code == 413
    browser.find_element(By.ID, "file").send_keys(str(too_big))
    wait.until(previewing(too_big.read_bytes()))
    assert ask_and_wait("error") == f"413: {over_pixels.json()['error']}"
    too_long = "why " * 200
    field.clear()
    field.send_keys(too_long)
    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(previewing(upload.read_bytes()))
    over = api(examples[3], question=too_long)
    assert over["status"] == 422
    assert ask_and_wait("error") == f"422: {over['error']}"
    assert browser.save_screenshot(str(ARTIFACTS / "demo-page-error.png"))


@pytest.mark.integration
def test_examples_route_serves_the_test_split_and_checks_its_count(served, examples):
    body = served["http"].get(served["base"] + "/v1/examples?count=3", timeout=30).json()
    assert [(e["question"], e["expected"]) for e in body["examples"]] == [(e.question, e.answer) for e in examples[:3]]
    assert base64.b64decode(body["examples"][0]["image"]) == examples[0].image_png
    bad = served["http"].get(served["base"] + "/v1/examples?count=99", timeout=30)
    assert bad.status_code == 422 and "between 1 and 16" in bad.json()["error"]


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


class SteadyLoad:
    """Clients that keep posting until stopped, recording each response's status and model version.

    ``wait_for(predicate)`` blocks until a response satisfies it (an event, not a sleep)."""

    def __init__(self, url: str, bodies: list[bytes], clients: int = 4, headers: dict | None = None):
        import requests

        self.url, self.bodies, self.headers = url, bodies, {"Content-Type": "application/json", **(headers or {})}
        self.results: list[tuple[int, str | None]] = []  # (status, version) in completion order
        self._stop, self._changed = threading.Event(), threading.Condition()
        self._sessions = [requests.Session() for _ in range(clients)]
        for session in self._sessions:
            session.trust_env = False
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        session, sent = self._sessions[index], 0
        while not self._stop.is_set():
            body = self.bodies[(index + sent) % len(self.bodies)]
            sent += 1
            try:
                response = session.post(self.url, data=body, headers=self.headers, timeout=60)
                version = response.json().get("model", {}).get("version") if response.status_code == 200 else None
                result = (response.status_code, version)
            except Exception as err:  # noqa: BLE001 -- a dropped connection is a failure to count, not a test crash
                result = (-1, type(err).__name__)
            with self._changed:
                self.results.append(result)
                self._changed.notify_all()

    def __enter__(self) -> "SteadyLoad":
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.results), timeout=timeout_s):
                raise AssertionError(f"no {what} within {timeout_s} s; responses so far: {self.summary()}")

    def summary(self) -> dict:
        from collections import Counter

        return dict(Counter(self.results))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def replica_pid(http, base: str, headers: dict | None = None) -> tuple[int, str]:
    model = http.get(base + "/v1/model", headers=headers or {}, timeout=30).json()
    return model["replica"]["pid"], model["version"]


@pytest.mark.integration
def test_a_new_champion_is_swapped_in_place_without_dropping_requests(served, registered, versions, examples):
    """Load runs before, during and after the redeploy until the new version has answered: every
    request succeeds, both versions answer, and the same replica process serves both."""
    from serving.app import deploy

    old = served["version"]
    new = next(v for v in versions if v != old)
    pid_before, serving_now = replica_pid(served["http"], served["base"])
    assert serving_now == old
    move_champion(registered, new)
    with SteadyLoad(served["base"] + "/v1/answer", [loadtest.json_body(e) for e in examples]) as load:
        load.wait_for(lambda r: len(r) >= 8, 60, "answers before the redeploy")
        assert deploy(served["cfg"]) == new
        served["version"] = new
        load.wait_for(lambda r: sum(v == new for _, v in r) >= 16, 120, f"16 answers from version {new}")
    statuses = {status for status, _ in load.results}
    assert statuses == {200}, load.summary()
    assert {v for _, v in load.results} == {old, new}, load.summary()
    # after the first answer from the new version, no request was answered by the old one again
    first_new = next(i for i, (_, v) in enumerate(load.results) if v == new)
    late_old = [i for i, (_, v) in enumerate(load.results[first_new:]) if v == old]
    assert len(late_old) <= 4, f"old version still answering after the swap: {late_old}"  # at most the requests already in flight
    pid_after, serving_now = replica_pid(served["http"], served["base"])
    assert (pid_after, serving_now) == (pid_before, new), "the replica restarted instead of reconfiguring in place"


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
def test_cli_serves_with_a_token_follows_the_alias_loadtests_and_shuts_down_cleanly(registered, versions, examples, tmp_path):
    """``amad serve --blocking`` with AMAD_SERVE_TOKEN: 401 without the token; ``amad loadtest`` exits 1
    when its requests fail and 0 when they succeed; moving the alias swaps the model in the same
    replica process within ``--poll-s``; downloads are deleted; Ctrl-C leaves no process behind and
    nothing was written to ~/.ray (no bare ray.init())."""
    import requests

    first, second = versions
    move_champion(registered, first)
    token = "cli-token-7d2e"
    auth = {"Authorization": f"Bearer {token}"}
    home_token = Path.home() / ".ray" / "auth_token"
    home_token_existed = home_token.exists()
    cache = tmp_path / "serve-cache"
    port = free_port()
    # short enough for the command's private Ray directory to nest inside (Ray's socket paths: <= 107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="as-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONWARNINGS": "ignore", "AMAD_SERVE_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model", MODEL, "--tracking-uri", registered["uri"],
               "--port", str(port), "--replica-cpus", "0.5", "--blocking", "--poll-s", "2", "--cache-dir", str(cache)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    printed = threading.Condition()

    def read_output() -> None:  # line by line, so the test can wait for one while the command runs
        for line in process.stdout:
            with printed:
                lines.append(line)
                printed.notify_all()
        with printed:
            printed.notify_all()

    def wait_for_line(text: str, timeout_s: float) -> str:
        with printed:
            found = printed.wait_for(lambda: any(text in line for line in lines) or process.poll() is not None, timeout=timeout_s)
        assert found and process.poll() is None, f"amad serve printed no {text!r} in {timeout_s} s:\n" + "".join(lines)[-3000:]
        return next(line for line in lines if text in line)

    def loadtest_cli(url: str, with_token: bool, out: Path) -> subprocess.CompletedProcess:
        load_env = dict(env) if with_token else {k: v for k, v in env.items() if k != "AMAD_SERVE_TOKEN"}
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "loadtest", "--url", url,
                               "--concurrency", "4", "--requests", "40", "--out", str(out)],
                              cwd=ROOT, env=load_env, capture_output=True, text=True, timeout=300)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    started_here: set[int] = set()
    try:
        http = requests.Session()
        http.trust_env = False
        direct = wait_for_line("direct to a replica", 180).split()[-1]
        started_here |= descendants(process.pid)
        assert direct.startswith("http://127.0.0.1:") and direct.endswith("/v1/answer") and f":{port}/" not in direct, direct
        proxy, base = f"http://127.0.0.1:{port}/v1/answer", f"http://127.0.0.1:{port}"
        ask = {"image": b64(examples[0].image_png), "question": examples[0].question}
        # The token is required on both ways in, and the proxy and the replica answer alike.
        for url in (proxy, direct):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                refused = http.post(url, json=ask, headers=headers, timeout=60)
                assert refused.status_code == 401 and "bearer token" in refused.json()["error"], (url, headers, refused.text)
        via_proxy = http.post(proxy, json=ask, headers=auth, timeout=60)
        via_replica = http.post(direct, json=ask, headers=auth, timeout=60)
        assert via_proxy.status_code == via_replica.status_code == 200, (via_proxy.text, via_replica.text)
        assert via_proxy.json()["answer"] == via_replica.json()["answer"]
        assert via_proxy.json()["model"]["version"] == first
        pid, serving_now = replica_pid(http, base)
        assert serving_now == first and token not in http.get(base + "/v1/model", timeout=30).text
        # amad loadtest: exit status 1 when requests fail (here: no token -> 401s), 0 when all succeed.
        failed = loadtest_cli(direct, with_token=False, out=tmp_path / "failed.json")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert json.loads((tmp_path / "failed.json").read_text())["errors_by_status"] == {"401": 40}
        load = loadtest_cli(direct, with_token=True, out=tmp_path / "load.json")
        assert load.returncode == 0, load.stdout + load.stderr
        assert "p50" in load.stdout and "p99" in load.stdout
        summary = json.loads((tmp_path / "load.json").read_text())
        assert summary["ok"] == 40 and summary["errors_by_status"] == {}
        # Follow the alias: the command re-reads it every --poll-s and reconfigures the same replica.
        move_champion(registered, second)
        wait_for_line(f"now serving v{second}", 60)
        answer = http.post(proxy, json=ask, headers=auth, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == second, answer.text
        assert replica_pid(http, base) == (pid, second), "the replica restarted instead of reconfiguring in place"
        assert list(cache.iterdir()) == [], "a replica left its download behind"
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
        left_in_ray_tmp = sorted(os.listdir(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert started_here, "amad serve started no processes?"
    deadline = time.time() + 30
    while any(alive(pid) for pid in started_here) and time.time() < deadline:
        time.sleep(0.5)
    left = [pid for pid in started_here if alive(pid)]
    assert not left, f"processes left behind: {left}"
    assert home_token.exists() == home_token_existed, "amad serve wrote ~/.ray/auth_token (a bare ray.init())"
    assert left_in_ray_tmp == [], f"amad serve left files in its RAY_TMPDIR: {left_in_ray_tmp}"


# ------------------------------------------------------------------ serve deploy of a written config


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``check()`` (an HTTP status, a process state) until it returns something truthy; its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(interval_s)


@pytest.mark.integration
def test_serve_deploy_of_written_configs_serves_and_swaps_a_new_version_in_place(registered, versions, examples, tmp_path):
    """The way Ray users deploy: ``ray start --head`` (its own process, 2 CPUs, 127.0.0.1), ``amad serve
    --write-config`` and ``serve deploy`` of the file; after the champion moves, the command written again
    changes only the user config, and ``serve deploy`` of it swaps the model in the same replica process
    while clients keep sending: every request answered, the new version reported. HOME is a temp dir
    and RAY_AUTH_MODE is explicit, so nothing reads or writes ~/.ray."""
    import requests
    import yaml

    first, second = versions
    move_champion(registered, first)
    real_home_token = Path.home() / ".ray" / "auth_token"
    real_home_token_existed = real_home_token.exists()
    home = tmp_path / "home"
    home.mkdir()
    gcs, dashboard, http_port, client_port, agent_port, metrics_port = (free_port() for _ in range(6))
    ray_tmp = tempfile.mkdtemp(prefix="sd-", dir="/tmp")  # short: Ray's socket paths must stay <= 107 bytes
    node_tmp = Path(ray_tmp) / "tmp"  # the head's own temporary files: its killed dashboard forkserver leaves a pymp-* dir
    node_tmp.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": ray_tmp, "TMPDIR": str(node_tmp), "RAY_AUTH_MODE": "disabled",
           "PYTHONWARNINGS": "ignore"}
    for name in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        env.pop(name, None)
    bin_dir = Path(sys.executable).parent
    config = tmp_path / "deploy" / "serve.yaml"
    cache = tmp_path / "serve-cache"
    write_command = [sys.executable, "-m", "pipeline.cli", "serve", "--write-config", str(config), "--model", MODEL,
                     "--tracking-uri", registered["uri"], "--port", str(http_port), "--replica-cpus", "0.5",
                     "--max-batch-size", "4", "--cache-dir", str(cache)]

    def run(command: list[str], timeout_s: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done

    run(write_command)
    written_first = yaml.safe_load(config.read_text())
    assert written_first["applications"][0]["deployments"][0]["user_config"]["model_version"] == first
    assert config.read_text().startswith("# Written by: amad serve --write-config")
    run([sys.executable, "-m", "pipeline.cli", "serve", "--check-config", str(config)])

    head_log = tmp_path / "ray-start.log"
    with head_log.open("w") as log:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--num-cpus", "2", "--object-store-memory", str(100 * 1024 * 1024), "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client_port),
             "--dashboard-agent-listen-port", str(agent_port), "--metrics-export-port", str(metrics_port), "--disable-usage-stats"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    http = requests.Session()
    http.trust_env = False
    dashboard_url, base = f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{http_port}"
    started: set[int] = set()

    def get_ok(url: str):
        assert head.poll() is None, f"ray start exited ({head.returncode}):\n{head_log.read_text()[-3000:]}"
        try:
            response = http.get(url, timeout=10)
        except requests.ConnectionError:
            return None
        return response if response.status_code == 200 else None

    def app_status() -> str | None:
        response = get_ok(dashboard_url + "/api/serve/applications/")
        return response and response.json().get("applications", {}).get("amad", {}).get("status")

    def deployed(version: str) -> None:
        run([str(bin_dir / "serve"), "deploy", str(config), "--address", dashboard_url])
        wait_until(lambda: app_status() == "RUNNING", 240, f"RUNNING app after serve deploy of v{version}")

    try:
        wait_until(lambda: get_ok(dashboard_url + "/api/version"), 120, "dashboard of the ray start head")
        started |= descendants(head.pid)
        deployed(first)
        ask = {"image": b64(examples[0].image_png), "question": examples[0].question}
        answer = http.post(base + "/v1/answer", json=ask, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == first, answer.text
        pid_before = replica_pid(http, base)
        assert pid_before[1] == first
        started |= descendants(head.pid)

        # The champion moves; the same command writes the new version and nothing else changes.
        move_champion(registered, second)
        run(write_command)
        written_second = yaml.safe_load(config.read_text())
        assert written_second["applications"][0]["deployments"][0]["user_config"]["model_version"] == second
        written_second["applications"][0]["deployments"][0]["user_config"]["model_version"] = first
        assert written_second == written_first, "only the user config's model version may change"

        with SteadyLoad(base + "/v1/answer", [loadtest.json_body(e) for e in examples]) as load:
            load.wait_for(lambda r: len(r) >= 8, 60, "answers before the new config")
            run([str(bin_dir / "serve"), "deploy", str(config), "--address", dashboard_url])
            load.wait_for(lambda r: sum(v == second for _, v in r) >= 16, 240, f"16 answers from version {second}")
        assert {status for status, _ in load.results} == {200}, load.summary()
        assert {v for _, v in load.results} == {first, second}, load.summary()
        assert replica_pid(http, base) == (pid_before[0], second), "the replica restarted instead of reconfiguring in place"
        assert list(cache.iterdir()) == [], "a replica left its download behind"
    finally:
        started |= descendants(head.pid)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:  # pragma: no cover -- leave nothing behind even on failure
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = sorted(pid for pid in started if alive(pid))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert started and not left, f"processes of the ray start head left behind: {left}"
    assert not (home / ".ray" / "auth_token").exists(), "the cluster or serve deploy wrote an auth token into HOME"
    assert real_home_token.exists() == real_home_token_existed, "the test touched ~/.ray/auth_token"
