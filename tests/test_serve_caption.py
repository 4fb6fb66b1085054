"""``POST /v1/caption``: the captioner's predictor without Ray, and the real Serve app on 127.0.0.1 over a
registered tiny captioner (``amad export`` of the session's trained tiny captioner, twice: two versions).

Every served caption is checked against ``generate`` on the same image with the same settings; bad
requests get a 4xx naming the problem; concurrent requests share batches; a new champion is swapped
into the running replica; ``amad loadtest`` drives the route.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from amad.data.captions import CaptionSpec, make_caption_split
from amad.data.images import pixels_from_uint8
from amad.models_ved import VedAdapter
from pipeline import export
from pipeline.captioner_onnx import caption_ids
from pipeline.config import parse_config
from pipeline.export_config import ExportJobConfig
from conftest import submit_and_wait
from pipeline.local_cluster import free_port
from serving.captioning import CaptionPredictor
from serving.config import Limits, ServeConfig
from serving.inputs import BadInput, parse_caption_json
from serving.model import open_predictor, resolve_version, route_of

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models:/amad-captioner@champion"
LIMITS = Limits(max_body_bytes=64 * 1024, max_image_bytes=32 * 1024, max_image_pixels=256 * 256, max_num_beams=3)


def png(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def export_captioner_version(checkpoint: Path, workdir: Path) -> dict:
    values = yaml.safe_load((ROOT / "tune_configs" / "tiny" / "export.yaml").read_text())
    values["checkpoint"] = str(checkpoint)
    return export.main(parse_config(values, ExportJobConfig, "test export"), workdir)


@pytest.fixture(scope="module")
def registered(trained_tiny_captioner, tmp_path_factory) -> dict:
    """The trained tiny captioner exported twice: ``amad-captioner`` v1 (champion) and v2, in a temp SQLite store."""
    root = tmp_path_factory.mktemp("serve-caption")
    workdir = root / "work"
    first = export_captioner_version(trained_tiny_captioner, workdir)
    second = export_captioner_version(trained_tiny_captioner, workdir)
    assert first["passed"] and second["passed"]
    uri = first["registry"]["tracking_uri"]
    versions = (first["registry"]["version"], second["registry"]["version"])
    assert resolve_version(MODEL, uri)[1] == versions[0] != versions[1]
    return {"checkpoint": trained_tiny_captioner, "uri": uri, "versions": versions, "cache": root / "serve-cache", "workdir": workdir}


@pytest.fixture(scope="module")
def model(registered):
    return VedAdapter.load(registered["checkpoint"]).eval()


@pytest.fixture(scope="module")
def test_images(registered) -> np.ndarray:
    spec = CaptionSpec.from_dict(json.loads((registered["checkpoint"] / "captions.json").read_text()))
    return make_caption_split(spec, "test").images  # (10, S, S, 3) uint8


@pytest.fixture(scope="module")
def predictor(registered) -> CaptionPredictor:
    predictor = open_predictor(MODEL, registered["uri"], cache_dir=registered["cache"], threads=1, limits=LIMITS)
    assert list(registered["cache"].iterdir()) == [], "open_predictor left its download behind"
    return predictor


def generated(model, images: np.ndarray, max_length: int, num_beams: int = 1) -> list[list[int]]:
    """``generate``'s captions of each image alone (ids up to the end token)."""
    from pipeline.captioner_onnx import TokenIds

    tokens = TokenIds.of(model.config)
    pixels = pixels_from_uint8(images)
    return [caption_ids(VedAdapter.generate(model, pixels[i:i + 1], max_length=max_length, num_beams=num_beams)[0].tolist(), tokens)
            for i in range(len(images))]


# ------------------------------------------------------------------ without Ray


def test_open_predictor_finds_a_captioner_and_describes_it(predictor, registered):
    assert isinstance(predictor, CaptionPredictor) and not predictor.bundle.directory.exists()
    described = predictor.describe()
    assert (described["kind"], described["route"], described["version"], described["alias"]) == ("captioner", "/v1/caption", registered["versions"][0], "champion")
    assert described["max_length"] == 18 and described["max_num_beams"] == 3 and described["parity"]["identical_greedy"] == 1.0
    assert described["captions"]["max_caption_length"] == 18 and described["val_cider_d"] > 0
    assert described["decoding"] == "cached (past key/values)" and described["parity"]["cached_identical_greedy"] == 1.0
    assert route_of(resolve_version(MODEL, registered["uri"])[3]) == "/v1/caption"


def test_one_batch_of_mixed_settings_captions_each_image_as_generate_does_alone(predictor, model, test_images):
    """Greedy rows of several lengths and beam rows of two widths in one batch: one encoder call, and every
    caption is ``generate``'s for that image alone with that request's settings."""
    settings = [(18, 1), (5, 1), (18, 2), (7, 3), (3, 1), (18, 1), (18, 2), (9, 1), (18, 3), (4, 2)]
    got = predictor.caption([predictor.prepare(image, ml, nb) for image, (ml, nb) in zip(test_images, settings)])
    for index, (max_length, num_beams) in enumerate(settings):
        [expected] = generated(model, test_images[index:index + 1], max_length, num_beams)
        assert got[index].tokens == expected, (index, max_length, num_beams)
        assert len(got[index].tokens) <= max_length and got[index].caption
    assert len({c.caption for c in got}) > 2


def test_greedy_decoding_retires_rows_as_they_end(predictor, model, test_images):
    """The decoder runs on fewer rows once some captions have ended: the batch sizes of its calls fall, and
    the last call runs only the rows still writing."""
    sizes: list[int] = []
    assert predictor.cached is not None, "amad export ships the decoder with past key/values"
    session = predictor.cached.step

    class Counting:  # the real ORT session; only the row counts of its calls are recorded
        def run(self, names, feed):
            sizes.append(feed["input_ids"].shape[0])
            assert feed["input_ids"].shape[1] == 1, "one new token per step over the cache"
            return session.run(names, feed)

    predictor.cached.step = Counting()
    try:
        lengths = [18, 4, 18, 6, 18, 18, 3, 18, 10, 18]
        got = predictor.caption([predictor.prepare(image, length) for image, length in zip(test_images, lengths)])
    finally:
        predictor.cached.step = session
    assert sizes[0] == len(test_images) and sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0], sizes
    assert sum(sizes) == sum(len(c.tokens) - 1 for c in got), "one decoder row per generated token"
    assert [c.tokens for c in got] == [generated(model, test_images[i:i + 1], length)[0] for i, length in enumerate(lengths)]


def test_a_version_without_the_cached_decoder_writes_the_same_captions(predictor, test_images):
    """Versions registered before the decoder with past key/values decode over the whole prefix: the same ids,
    greedy and beam search."""
    settings = [(18, 1), (4, 1), (18, 2), (6, 3), (18, 1), (18, 3), (3, 1), (18, 2), (10, 1), (18, 1)]
    items = [predictor.prepare(image, length, beams) for image, (length, beams) in zip(test_images, settings)]
    cached = predictor.cached
    with_cache = predictor.caption(items)
    predictor.cached = None
    try:
        assert predictor.caption(items) == with_cache
    finally:
        predictor.cached = cached


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{", 400, "not valid JSON"),
    (b"[1]", 422, "must be a JSON object"),
    (b'{"max_length": 5}', 422, "missing field(s) ['image']"),
    (b'{"image": "aGk=", "question": "q"}', 422, "unknown field(s) ['question']"),
    (b'{"image": "aGk=", "num_beams": 4}', 422, "num_beams=4 is out of range (1..3)"),
    (b'{"image": "aGk=", "num_beams": true}', 422, "num_beams must be a whole number"),
    (b'{"image": "aGk=", "max_length": "5"}', 422, "max_length must be a whole number"),
    (b'{"image": 5}', 422, "image must be a base64 string"),
])
def test_parse_caption_json_rejects_without_a_model(body, status, message):
    with pytest.raises(BadInput) as caught:
        parse_caption_json(body, LIMITS)
    assert caught.value.status == status and message in caught.value.message


def test_prepare_checks_the_models_limits(predictor, test_images):
    for kwargs, message in [({"max_length": 1}, "max_length=1 is out of range (2..18"), ({"max_length": 19}, "max_length=19 is out of range"),
                            ({"num_beams": 4}, "num_beams=4 is out of range (1..3)")]:
        with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            predictor.prepare(png(test_images[0]), **kwargs)
    with pytest.raises(BadInput, match="not a recognised image format"):
        predictor.prepare(b"hello, world")
    with pytest.raises(BadInput, match=r"\(32, 32, 3\) uint8"):
        predictor.prepare(test_images[0][:16])


# ------------------------------------------------------------------ the Serve app


@pytest.fixture(scope="module")
def served(registered, ray_cluster):
    """The app on 127.0.0.1:<free port> serving the captioner, one replica of 0.5 CPU, batches of up to 16 within 20 ms."""
    import requests
    from ray import serve

    from serving.app import deploy

    port = free_port()
    cfg = ServeConfig(model=MODEL, tracking_uri=registered["uri"], port=port, replica_cpus=0.5, max_batch_size=16,
                      batch_wait_ms=20, limits=LIMITS, cache_dir=str(registered["cache"]), app_name="amad-caption")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        version = deploy(cfg)
        session = requests.Session()
        session.trust_env = False  # loopback only; never a proxy
        yield {"base": f"http://127.0.0.1:{port}", "cfg": cfg, "http": session, "version": version}
    finally:
        serve.shutdown()


def post(served, route: str = "/v1/caption", **kwargs):
    return served["http"].post(served["base"] + route, timeout=60, **kwargs)


@pytest.mark.integration
def test_served_captions_are_generates_for_json_and_multipart(served, model, test_images):
    expected = generated(model, test_images, 18)
    for image, want in zip(test_images, expected):
        response = post(served, json={"image": b64(png(image))})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tokens"] == want and body["caption"] and body["latency_ms"] > 0
        assert body["model"] == {"name": "amad-captioner", "version": served["version"]}
        assert response.headers["X-Batch-Size"] == "1"
    beams = post(served, json={"image": b64(png(test_images[2])), "num_beams": 3, "max_length": 9})
    assert beams.status_code == 200 and beams.json()["tokens"] == generated(model, test_images[2:3], 9, 3)[0], beams.text
    multipart = post(served, files={"image": ("x.png", png(test_images[1]), "image/png")}, data={"num_beams": "2", "max_length": "6"})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["tokens"] == generated(model, test_images[1:2], 6, 2)[0]


@pytest.mark.integration
def test_the_service_describes_its_captioner_and_sends_answers_elsewhere(served, test_images):
    http, base = served["http"], served["base"]
    model = http.get(base + "/v1/model", timeout=30).json()
    assert (model["kind"], model["route"], model["name"], model["version"]) == ("captioner", "/v1/caption", "amad-captioner", served["version"])
    wrong = post(served, "/v1/answer", json={"image": b64(png(test_images[0])), "question": "what shape is it ?"})
    assert wrong.status_code == 404 and "POST /v1/caption instead of /v1/answer" in wrong.json()["error"], wrong.text
    examples = http.get(base + "/v1/examples?count=3", timeout=30).json()["examples"]
    assert len(examples) == 3 and all(e["expected"] and "question" not in e for e in examples)
    assert base64.b64decode(examples[0]["image"]) == png(test_images[0])
    schema = http.get(base + "/openapi.json", timeout=30).json()
    assert {"/v1/caption", "/v1/answer"} <= set(schema["paths"])
    assert list(Path(served["cfg"].cache_dir).iterdir()) == [], "a replica left its download behind"


@pytest.mark.integration
def test_the_demo_page_captions_like_the_api_in_a_real_browser(served, model, test_images, browser, tmp_path):
    """GET / in headless Chromium over a captioner: the page describes the captioner and asks for a length and a
    beam width instead of a question; a built-in example (greedy, then 2 beams and 6 tokens) and an uploaded PNG
    get the JSON API's captions and token ids, which are ``generate``'s; a beam too wide and a file that is not an
    image show the API's own 4xx status and message. A screenshot is kept in test-artifacts/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def api(image_png: bytes, **settings) -> dict:
        response = post(served, json={"image": b64(image_png), **settings})
        return {"status": response.status_code, **response.json()}

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def typed(element_id: str, value: str) -> None:
        field = browser.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)

    def caption_and_wait(element_id: str) -> str:
        return submit_and_wait(browser, element_id)

    wait = WebDriverWait(browser, 60)
    browser.get(served["base"] + "/")
    wait.until(lambda d: d.find_element(By.ID, "example").get_attribute("data-loaded") not in (None, "", "0"))
    assert f"amad-captioner version {served['version']}" in text("model") and "decoder" in text("model"), text("model")
    assert text("title") == "Caption an image with the distilled model" and text("ask") == "Caption"
    assert not browser.find_element(By.ID, "question").is_displayed() and browser.find_element(By.ID, "beams").is_displayed()
    assert browser.find_element(By.ID, "maxlength").get_attribute("value") == "18"  # the model's longest caption
    assert browser.find_element(By.ID, "beams").get_attribute("max") == str(LIMITS.max_num_beams)

    # a built-in example (the test split's first image), greedy: the API's caption, which is generate's
    Select(browser.find_element(By.ID, "example")).select_by_index(1)
    assert "a reference:" in Select(browser.find_element(By.ID, "example")).first_selected_option.text
    first = png(test_images[0])
    expected = api(first)
    assert expected["tokens"] == generated(model, test_images[:1], 18)[0]
    assert caption_and_wait("caption") == expected["caption"], (text("caption"), expected)
    assert text("tokens") == " ".join(map(str, expected["tokens"]))
    assert float(text("latency")) > 0 and text("version") == f"amad-captioner v{served['version']}"
    # the same image with 2 beams and at most 6 tokens
    typed("beams", "2")
    typed("maxlength", "6")
    beams = api(first, num_beams=2, max_length=6)
    assert beams["tokens"] == generated(model, test_images[:1], 6, 2)[0]
    assert caption_and_wait("caption") == beams["caption"] and text("tokens") == " ".join(map(str, beams["tokens"]))
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ROOT / "test-artifacts" / "demo-page-caption.png"))

    # an uploaded PNG, greedy again
    upload = tmp_path / "scene.png"
    upload.write_bytes(png(test_images[3]))
    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(lambda d: b64(upload.read_bytes())[:40] in d.find_element(By.ID, "preview").get_attribute("src"))
    typed("beams", "1")
    typed("maxlength", "18")
    assert caption_and_wait("caption") == api(upload.read_bytes())["caption"]

    # bad input: the API's own status and message on the page
    typed("beams", str(LIMITS.max_num_beams + 1))
    too_wide = api(upload.read_bytes(), num_beams=LIMITS.max_num_beams + 1, max_length=18)
    assert too_wide["status"] == 422
    assert caption_and_wait("error") == f"422: {too_wide['error']}"
    typed("beams", "1")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these bytes are no image at all")
    refused = api(not_an_image.read_bytes(), num_beams=1, max_length=18)
    assert refused["status"] == 400
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    wait.until(lambda d: b64(not_an_image.read_bytes())[:40] in d.find_element(By.ID, "preview").get_attribute("src"))
    assert caption_and_wait("error") == f"400: {refused['error']}"


def caption_bad_cases(image_png: bytes) -> dict:
    good = {"image": b64(image_png)}
    big = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (110, 110, 3), dtype=np.uint8)))
    return {
        "malformed json": ({"data": b'{"image": ', "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        "wrong content type": ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "not supported"),
        "missing image": ({"json": {"num_beams": 2}}, 422, "missing field(s) ['image']"),
        "extra field": ({"json": {**good, "question": "what ?"}}, 422, "unknown field(s) ['question']"),
        "not base64": ({"json": {"image": "@@not base64@@"}}, 400, "not valid base64"),
        "not an image": ({"json": {"image": b64(b"hello, world")}}, 400, "not a recognised image format"),
        "truncated image": ({"json": {"image": b64(image_png[: len(image_png) // 2])}}, 400, "truncated or corrupt"),
        "too many pixels": ({"json": {"image": b64(png(Image.new("RGB", (300, 300))))}}, 413, "pixels, over the limit of 65536"),
        "too many image bytes": ({"json": {"image": b64(big)}}, 413, "over the limit of 32768"),
        "max_length too short": ({"json": {**good, "max_length": 1}}, 422, "max_length=1 is out of range (2..18"),
        "max_length too long": ({"json": {**good, "max_length": 40}}, 422, "max_length=40 is out of range (2..18"),
        "num_beams over the limit": ({"json": {**good, "num_beams": 4}}, 422, "num_beams=4 is out of range (1..3)"),
        "num_beams zero": ({"json": {**good, "num_beams": 0}}, 422, "num_beams=0 is out of range"),
        "num_beams not a number": ({"json": {**good, "num_beams": "2"}}, 422, "num_beams must be a whole number"),
        "oversized body": ({"data": b"x" * (100 * 1024), "headers": {"Content-Type": "application/json"}}, 413, "over the limit of 65536"),
        "multipart without image": ({"files": {"num_beams": (None, "2")}}, 422, "missing form field(s) ['image']"),
        "multipart image as text": ({"files": {"image": (None, "abc")}}, 422, "image must be a file part"),
        "multipart bad max_length": ({"files": {"image": ("x.png", image_png, "image/png"), "max_length": (None, "long")}}, 422,
                                     "max_length must be a whole number"),
    }


CAPTION_BAD_CASES = list(caption_bad_cases(png(Image.new("RGB", (32, 32)))))


@pytest.mark.integration
@pytest.mark.parametrize("case", CAPTION_BAD_CASES)
def test_bad_caption_requests_get_a_4xx_naming_the_problem_and_the_replica_stays_up(served, test_images, case):
    kwargs, status, message = caption_bad_cases(png(test_images[0]))[case]
    response = post(served, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and message in body["error"], body
    assert post(served, json={"image": b64(png(test_images[0]))}).status_code == 200


@pytest.mark.integration
def test_concurrent_caption_requests_share_batches_and_each_gets_its_own_caption(served, model, test_images):
    """Greedy and beam requests with several lengths at concurrency 16: no errors, some batches of more than one,
    and every caption is the one ``generate`` writes for its image and settings."""
    import threading

    settings = [(18, 1), (6, 1), (18, 2), (9, 3), (4, 1)]
    expected = {(i, ml, nb): generated(model, test_images[i:i + 1], ml, nb)[0] for i in range(len(test_images)) for ml, nb in settings}
    keys = list(expected) * 2
    results: dict[int, tuple] = {}
    lock = threading.Lock()

    def client(offset: int) -> None:
        import requests

        session = requests.Session()
        session.trust_env = False
        for index in range(offset, len(keys), 16):
            image, max_length, num_beams = keys[index]
            response = session.post(served["base"] + "/v1/caption", timeout=120,
                                    json={"image": b64(png(test_images[image])), "max_length": max_length, "num_beams": num_beams})
            with lock:
                results[index] = (response.status_code, response.json().get("tokens"), int(response.headers.get("X-Batch-Size", "0")))

    threads = [threading.Thread(target=client, args=(offset,)) for offset in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == len(keys) and {status for status, _, _ in results.values()} == {200}
    wrong = [keys[i] for i, (_, tokens, _) in results.items() if tokens != expected[keys[i]]]
    assert not wrong, f"captions differ from generate's for {wrong[:5]}"
    assert max(size for _, _, size in results.values()) > 1, "no request shared a batch at concurrency 16"


@pytest.mark.integration
def test_a_new_champion_captioner_is_swapped_in_place_without_dropping_requests(served, registered, test_images):
    from mlflow.tracking import MlflowClient
    from test_serve import SteadyLoad, replica_pid

    from serving.app import deploy

    old = served["version"]
    new = next(v for v in registered["versions"] if v != old)
    pid_before, _ = replica_pid(served["http"], served["base"])
    MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"]).set_registered_model_alias("amad-captioner", "champion", new)
    bodies = [json.dumps({"image": b64(png(image))}).encode() for image in test_images]
    with SteadyLoad(served["base"] + "/v1/caption", bodies) as load:
        load.wait_for(lambda r: len(r) >= 8, 60, "captions before the redeploy")
        assert deploy(served["cfg"]) == new
        served["version"] = new
        load.wait_for(lambda r: sum(v == new for _, v in r) >= 16, 120, f"16 captions from version {new}")
    assert {status for status, _ in load.results} == {200}, load.summary()
    assert {v for _, v in load.results} == {old, new}, load.summary()
    assert replica_pid(served["http"], served["base"]) == (pid_before, new), "the replica restarted instead of reconfiguring in place"


@pytest.mark.integration
def test_amad_loadtest_drives_the_caption_route_and_refuses_the_wrong_one(served, tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    out = tmp_path / "load.json"
    ok = subprocess.run([sys.executable, "-m", "pipeline.cli", "loadtest", "--url", served["base"] + "/v1/caption", "--concurrency", "8",
                         "--requests", "40", "--num-beams", "2", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] == 40 and summary["errors_by_status"] == {} and summary["num_beams"] == 2 and summary["p50_ms"] > 0
    wrong = subprocess.run([sys.executable, "-m", "pipeline.cli", "loadtest", "--url", served["base"] + "/v1/answer", "--requests", "4"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert wrong.returncode == 2 and "serves the captioner amad-captioner" in wrong.stderr and "/v1/caption" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr
