"""Shared fixtures: a two-node local Ray cluster and a tiny saved teacher.

The cluster keeps everything of its own under a private temporary directory (``RAY_TMPDIR``), so
its ``ray_current_cluster`` address file never makes another process's ``ray.init()`` join it, and
it is always shut down (only the processes it started; never ``ray stop``).

Loopback only: test clusters bind to 127.0.0.1 and no test traffic may leave it (traffic to this
machine's own interface address is flagged too). The environment below is set before anything
imports Ray, and every process a test starts (Ray's nodes and workers, the CLI) inherits it.

The sandbox (``tests/sandbox.py``) comes first: variables that would point tests at the developer's
registry, cluster or caches are removed, and anything the session leaves in /tmp or the home
directory fails it.
"""

from __future__ import annotations

# The sandbox, before anything imports Ray or MLflow: the environment every test and every process
# it starts sees (its hooks are registered in pytest_configure below).
import sandbox

sandbox.start()

# The loopback environment (why each variable: pipeline/local_cluster.py), set before anything imports
# Ray; the benchmarks use the same helper. Importing pipeline.local_cluster does not import Ray.
from pipeline.local_cluster import LOOPBACK, OBJECT_STORE_BYTES, apply_loopback_env, local_cluster

apply_loopback_env()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER_CONFIG = ROOT / "tune_configs" / "tiny" / "teacher.yaml"
TINY_CAPTIONER_CONFIG = ROOT / "tune_configs" / "tiny" / "captioning-teacher.yaml"


def pytest_configure(config):
    if not config.pluginmanager.is_registered(sandbox):
        config.pluginmanager.register(sandbox, "amad-sandbox")


@pytest.fixture(scope="session")
def ray_cluster():
    """A head and a worker node, 1 CPU and an 80 MB object store each; the driver is connected."""
    with local_cluster(nodes=2, num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) as cluster:
        assert cluster.address.startswith(f"{LOOPBACK}:"), cluster.address
        yield cluster


def save_tiny_teacher(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised teacher of ``tune_configs/tiny/teacher.yaml``'s shape, saved as `amad teacher` saves one.

    Distillation tests need a teacher directory, not a good teacher: this takes a second, training one ~20 s.
    """
    from amad.data.benchmark import benchmark_tokenizer, make_split
    from amad.data.text import save_tokenizer
    from amad.models import ViltAdapter
    from amad.training import evaluate
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig, load_config

    cfg = load_config(TINY_TEACHER_CONFIG, TeacherJobConfig)
    spec = cfg.data.benchmark_spec()
    tokenizer = benchmark_tokenizer()
    test = make_split(spec, "test", tokenizer)
    model = train_teacher.build_model(cfg, test.answers, tokenizer.get_vocab_size(), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    (directory / train_teacher.BENCHMARK_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    metrics = {"test": {"teacher": evaluate(model, ViltAdapter, test)}, "note": "randomly initialised test fixture"}
    (directory / train_teacher.METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return directory


def save_tiny_captioner(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised captioner of ``tune_configs/tiny/captioning-teacher.yaml``'s shape, saved as
    `amad teacher` saves one (weights, tokenizer, ``captions.json``), without training it."""
    from amad.data.captions import caption_tokenizer
    from amad.data.text import save_tokenizer
    from pipeline import train_captioner
    from pipeline.config import CaptionTeacherJobConfig, load_config

    cfg = load_config(TINY_CAPTIONER_CONFIG, CaptionTeacherJobConfig)
    model = train_captioner.build_captioner(cfg, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(caption_tokenizer(), directory)
    (directory / train_captioner.CAPTIONS_FILE).write_text(json.dumps(cfg.data.caption_spec().to_dict(), indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> Path:
    """A saved (untrained) tiny captioning teacher directory."""
    return save_tiny_captioner(tmp_path_factory.mktemp("tiny-captioner"))


@pytest.fixture(scope="session")
def trained_tiny_captioner(tmp_path_factory) -> Path:
    """The tiny captioning teacher trained for 200 steps (~10 s, `amad teacher`'s own job): it writes captions that
    differ by image and score above 0, so caption parity and CIDEr-D reproduction test something (an untrained
    captioner writes one caption for every image and scores 0)."""
    import torch
    import yaml

    from pipeline import train_captioner
    from pipeline.config import CaptionTeacherJobConfig, parse_config, with_overrides

    values = yaml.safe_load(TINY_CAPTIONER_CONFIG.read_text())
    cfg = parse_config(with_overrides(values, {"train.steps": 200, "blind_steps": 0, "eval_every": 100, "num_beams": 1}), CaptionTeacherJobConfig)
    workdir, threads = tmp_path_factory.mktemp("trained-captioner"), torch.get_num_threads()
    try:
        metrics = train_captioner.main(cfg, workdir)
    finally:
        torch.set_num_threads(threads)
    assert metrics["test"]["teacher_greedy"]["cider_d"] > 0.2
    return workdir / "teacher"


@pytest.fixture(scope="module")
def monkeypatch_module():
    """``monkeypatch`` for module-scoped fixtures: undone when the module's tests are done."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A saved (untrained) tiny teacher directory: config.json, model.safetensors, tokenizer, benchmark, metrics."""
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's chromium and chromium-driver


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven by Selenium through Debian's chromedriver (`make browser` installs both).
    Its profile and home stay in ``tmp_path``, its temporary files in a short directory removed after;
    no network beyond loopback is tried."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        if os.environ.get("AMAD_REQUIRE_BROWSER") == "1":  # .ci/run sets it: there the test must run
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `make browser` (Debian's chromium, chromium-driver)")
        pytest.skip("no headless Chromium here: `make browser` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    scratch = tmp_path / "chromium"
    scratch.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
                 f"--user-data-dir={scratch / 'profile'}", f"--crash-dumps-dir={scratch}", "--window-size=900,1100"):
        options.add_argument(flag)
    # Chromium's temporary files: its singleton socket's path must stay short (<= 107 bytes), so not in tmp_path.
    short_tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    env = {**os.environ, "TMPDIR": short_tmp, "HOME": str(scratch)}
    try:
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER), env=env, log_output=str(scratch / "chromedriver.log")))
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(short_tmp, ignore_errors=True)


def submit_and_wait(browser, element_id: str) -> str:
    """Click the demo page's submit button (``#ask``); wait until its result or its error box shows and return
    ``element_id``'s text (both boxes are hidden first, so an earlier answer cannot satisfy the wait)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("document.getElementById('result').style.display='none';"
                           "document.getElementById('error').style.display='none';")
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "result").is_displayed() or d.find_element(By.ID, "error").is_displayed())
    return browser.find_element(By.ID, element_id).text
