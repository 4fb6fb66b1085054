"""SIGTERM, as an orchestrator sends it (Kubernetes, systemd, ``docker stop``), stops every long-running
``amad`` command as Ctrl-C does (docs/operations.md, ``amad --help``).

Each test starts the real CLI as a subprocess in a session of its own (a background job of a
non-interactive shell ignores SIGINT: FIELD-NOTES), with the loopback environment and a short
``RAY_TMPDIR`` of its own, waits for an event (a line it prints, a checkpoint, an HTTP answer), then
sends SIGTERM to the command's own process -- as ``docker stop`` and Kubernetes do, not to its process
group -- and checks the exit status the CLI documents, a clean message (no Python traceback, no
fatal-signal stack trace from Ray's handlers), that no process is left in its session or names its
``RAY_TMPDIR``, and that the job's state was saved: the same command run again resumes and finishes.
``amad serve`` must also answer the requests in flight when the signal comes, and the direct URL it
prints must answer (it listens on ``--host``, here 127.0.0.2, not on the node's address 127.0.0.1).
``amad sweep`` is stopped inside ``amad run`` (its sweep stage); how the CLI maps each way a job stops
to its exit status is checked without Ray.
"""

from __future__ import annotations

import http.client
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
import urllib.parse
from pathlib import Path

import pytest
import ray  # noqa: F401 -- Ray bundles psutil (ray/thirdparty_files) and puts it on sys.path when imported
import psutil
import yaml

from pipeline import names
from pipeline.local_cluster import apply_loopback_env, free_port
from serving.ingress import target_urls, url_host
from test_distill_faults import committed
from test_serve import MODEL, b64, examples, predictor, registered  # noqa: F401 -- fixtures: a registered tiny student

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny"
TERMINATED = 143  # documented in `amad --help` (pipeline/cli.py) and docs/operations.md
STOP_TIMEOUT_S = 120  # SIGTERM to exit; measured 10-25 s on 2 cores (Serve's drain, Ray's shutdown, the leftover sweep)
HOLD_S = 3.0  # how long a request stays unfinished after the signal (Serve's drain loop checks every 2 s)
NOT_CLEAN = ("Traceback", "*** SIG", "PC: @", "Fatal Python error", "core dumped")  # Python's, Abseil's, the shell's


# ---------------------------------------------------------------- helpers


@pytest.fixture
def ray_tmp():
    """A short directory for the command's RAY_TMPDIR (Ray's socket paths under its private directory
    must stay within 107 bytes; tmp_path is too long): removed after."""
    path = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Cli:
    """``amad ARGS`` in a session of its own; its output (stdout and stderr) collected line by line."""

    def __init__(self, args: list, ray_tmp: Path):
        env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        apply_loopback_env(env)
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
        self.ray_tmp = ray_tmp
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, check, timeout_s: float, what: str):
        """Poll ``check()`` until it returns something truthy (its value) while the command runs."""
        deadline = time.monotonic() + timeout_s
        while not (value := check()):
            assert self.process.poll() is None, f"amad exited ({self.process.returncode}) before {what}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{self.output[-4000:]}"
            time.sleep(0.1)
        return value

    def line(self, text: str, timeout_s: float = 300) -> str:
        return self.wait_for(lambda: next((line.strip() for line in self.lines if text in line), None), timeout_s, repr(text))

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"amad still running {timeout_s} s later:\n{self.output[-4000:]}")
        self._reader.join(timeout=30)
        return code

    def sigterm(self, timeout_s: float = STOP_TIMEOUT_S) -> tuple[int, float]:
        """SIGTERM to the command's process only; ``(exit status, seconds it took)``."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s), time.monotonic() - sent

    def left_behind(self) -> list[str]:
        """Processes still running (zombies have exited) in the command's session, or naming its RAY_TMPDIR
        on their command line or in their environment (Ray's workers start sessions of their own)."""
        needle, found = str(self.ray_tmp), []
        for process in psutil.process_iter(["cmdline", "environ", "status"], ad_value=None):
            try:
                session = os.getsid(process.pid)
            except OSError:
                continue
            cmdline = " ".join(process.info["cmdline"] or [])
            ours = session == self.process.pid or needle in cmdline or (process.info["environ"] or {}).get("RAY_TMPDIR", "").startswith(needle)
            if ours and process.info["status"] != psutil.STATUS_ZOMBIE and process.pid != os.getpid():
                found.append(f"{process.pid} {cmdline[:120]}")
        return found

    def end(self) -> None:
        """Whatever happened: nothing of this command keeps running after the test."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        for entry in self.left_behind():
            try:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def assert_stopped_cleanly(cli: Cli, code: int, expected: int, seconds: float) -> None:
    output = cli.output
    assert code == expected, f"exit status {code}, documented {expected} ({seconds:.0f} s after SIGTERM):\n{output[-4000:]}"
    for marker in NOT_CLEAN:
        assert marker not in output, f"{marker!r} in the output of a SIGTERM'd command:\n{output[-4000:]}"
    assert "SIGTERM: stopping as on Ctrl-C" in output, output[-3000:]
    left = cli.left_behind()
    assert not left, "processes left behind after SIGTERM:\n" + "\n".join(left)


def job_config(tmp_path: Path, preset: Path, **values) -> Path:
    data = yaml.safe_load(preset.read_text())
    data.update(values)
    path = tmp_path / preset.name
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- addresses (no Ray)


class _Target:
    def __init__(self, ip: str, port: int):
        self.ip, self.port = ip, port


class _Group:
    def __init__(self, protocol: str, targets: list):
        self.protocol, self.targets = protocol, targets


def test_a_direct_url_has_the_host_the_replica_binds_not_its_nodes_address():
    """Serve reports a replica's node address (here 10.0.0.5) but the replica binds Serve's --host."""
    groups = [_Group("HTTP", [_Target("10.0.0.5", 30001), _Target("10.0.0.5", 8000)]), _Group("gRPC", [_Target("10.0.0.5", 40001)])]
    assert target_urls(groups, "127.0.0.1", proxy_port=8000) == ["http://127.0.0.1:30001"]
    assert target_urls(groups, "0.0.0.0", proxy_port=8000) == ["http://10.0.0.5:30001"]  # a wildcard: any address of the node
    assert url_host("::", "fd00::5") == "[fd00::5]" and url_host("::1", "10.0.0.5") == "[::1]"


def test_the_exit_statuses_are_documented_in_the_help_and_the_docs():
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    docs = (ROOT / "docs" / "operations.md").read_text()
    for code, words in ((0, "done"), (1, "failed"), (2, "bad config"), (130, "Ctrl-C"), (143, "SIGTERM")):
        assert any(line.split()[:1] == [str(code)] and words in line for line in shown.splitlines()), (code, shown)
        assert f"| {code} |" in docs, code


MAIN_CASES = r"""
import json, os, signal, sys
from pipeline import cli

def sigterm_then(outcome):
    def handler(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises KeyboardInterrupt here
            signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (a call: the pending handler runs by now)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one while stopping: ignored
            return outcome()
        return "not interrupted"
    return handler

def interrupted():
    raise KeyboardInterrupt

def train_abort():
    raise SystemExit(0)  # Ray Train's SIGINT handler ends its abort with sys.exit(0)

cases = {"sweep returns 130": lambda: 130, "serve returns 0": lambda: 0, "unwinds": interrupted, "Train's abort": train_abort}
statuses = {}
for name, outcome in cases.items():
    cli._sweep = sigterm_then(outcome)
    statuses[name] = cli.main(["sweep", "--config", "x.yaml"])
cli._sweep = lambda args: interrupted()
statuses["Ctrl-C"] = cli.main(["sweep", "--config", "x.yaml"])
statuses["default SIGTERM after"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
print(json.dumps(statuses))
"""


def test_the_cli_turns_a_sigterm_into_the_documented_status_whichever_way_the_job_stops():
    """Without Ray: whatever the job does with the interruption (Tune returns, the job unwinds, Ray
    Train's abort exits), SIGTERM gives 143 and Ctrl-C 130; a command that returns 0 (serve) keeps 0.
    In a subprocess: the CLI installs its handler in the process it runs in."""
    done = subprocess.run([sys.executable, "-c", MAIN_CASES], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = json.loads(done.stdout.splitlines()[-1])
    assert statuses == {"sweep returns 130": 143, "serve returns 0": 0, "unwinds": 143, "Train's abort": 143, "Ctrl-C": 130,
                        "default SIGTERM after": True}, statuses
    assert "amad sweep: stopped by SIGTERM" in done.stderr and "amad sweep: interrupted (re-run" in done.stderr, done.stderr
    assert done.stderr.count("SIGTERM again: already stopping") == 4 and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------- amad serve


def loopback_alias() -> str:
    """127.0.0.2 where it can be bound (Linux routes all of 127/8 to lo): a --host unlike the node's 127.0.0.1."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
            return "127.0.0.2"
        except OSError:
            return "127.0.0.1"


class InFlight:
    """One POST on a connection of its own, from a thread: the headers and half the body now, the other half
    ``hold_s`` later -- so the server has accepted the request and holds it, unfinished, across the signal."""

    def __init__(self, url: str, body: bytes, hold_s: float):
        parts = urllib.parse.urlsplit(url)
        self.server = (parts.hostname, parts.port)
        self.connection = http.client.HTTPConnection(*self.server, timeout=STOP_TIMEOUT_S)
        self.connection.connect()
        self.local = self.connection.sock.getsockname()[:2]
        self.sent, self.answer, self.error = threading.Event(), None, None
        self.thread = threading.Thread(target=self._post, args=(parts.path, body, hold_s), daemon=True)
        self.thread.start()

    def _post(self, path: str, body: bytes, hold_s: float) -> None:
        try:
            self.connection.putrequest("POST", path)
            self.connection.putheader("Content-Type", "application/json")
            self.connection.putheader("Content-Length", str(len(body)))
            self.connection.endheaders(body[: len(body) // 2])
            self.sent.set()
            time.sleep(hold_s)
            self.connection.send(body[len(body) // 2 :])
            response = self.connection.getresponse()
            self.answer = (response.status, response.read())
        except Exception as err:  # the assertion in the test says what went wrong
            self.error = err
            self.sent.set()

    def accepted(self) -> bool:
        """Sent, and a server process holds the accepted connection (one still in the listen queue has no owner)."""
        if not self.sent.is_set():
            return False
        return any(tuple(c.laddr) == self.server and c.raddr and tuple(c.raddr) == self.local and c.pid not in (None, os.getpid())
                   for c in psutil.net_connections("tcp"))

    def result(self, timeout_s: float) -> tuple[int, bytes]:
        self.thread.join(timeout_s)
        assert self.answer is not None, f"no answer to the request in flight: {self.error!r}"
        return self.answer


@pytest.mark.integration
def test_serve_answers_the_request_in_flight_then_stops_on_sigterm_with_exit_0(registered, examples, ray_tmp, tmp_path):  # noqa: F811
    """``amad serve --blocking`` on its own local Ray, ``--host 127.0.0.2``: the proxy and direct URLs it
    prints answer; a request each that the proxy and the replica have accepted, and whose body is still
    arriving when SIGTERM comes, gets its answer (``serve.shutdown`` alone kills the proxy at once and
    drops the first); exit 0, and nothing listens any more."""
    import requests

    host, port = loopback_alias(), free_port()
    body = json.dumps({"image": b64(examples[0].image_png), "question": examples[0].question}).encode()
    cli = Cli(["serve", "--model", MODEL, "--tracking-uri", registered["uri"], "--host", host, "--port", port,
               "--replica-cpus", "0.5", "--blocking", "--poll-s", "600",
               "--cache-dir", tmp_path / "cache"], ray_tmp)
    try:
        direct = cli.line("direct to a replica", 240).split()[-1]
        proxy = cli.line("serving ").split(" at ")[1].split()[0]
        assert proxy == f"http://{host}:{port}/v1/answer", proxy
        assert direct.startswith(f"http://{host}:") and direct.endswith("/v1/answer") and f":{port}/" not in direct, direct
        http = requests.Session()
        http.trust_env = False  # loopback only; never a proxy
        for url in (proxy, direct):  # what the command printed answers
            answer = http.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
            assert answer.status_code == 200 and answer.json()["answer"], (url, answer.text)
        in_flight = [InFlight(url, body, hold_s=HOLD_S) for url in (proxy, direct)]
        cli.wait_for(lambda: all(request.accepted() for request in in_flight), 30, "the proxy and the replica accepting a request each")
        code, seconds = cli.sigterm()
        answers = [request.result(30) for request in in_flight]
    finally:
        cli.end()
    for status, answer in answers:
        assert (status, bool(json.loads(answer).get("answer"))) == (200, True), (status, answer[:300])
    assert_stopped_cleanly(cli, code, 0, seconds)
    assert "stopping: requests in flight finish first" in cli.output and "amad serve: stopped" in cli.output, cli.output[-3000:]
    with pytest.raises(requests.ConnectionError):  # and it no longer listens
        http.get(proxy.replace("/v1/answer", "/healthz"), timeout=10)


# ---------------------------------------------------------------- amad distill


@pytest.mark.integration
def test_distill_stops_on_sigterm_with_143_keeps_its_checkpoints_and_the_same_command_resumes(tiny_teacher, ray_tmp, tmp_path):
    """SIGTERM once epoch 1's checkpoint is committed: Ray Train aborts the run (as on Ctrl-C), exit 143;
    the same command then resumes after the last committed epoch and finishes."""
    config = job_config(tmp_path, TINY / "distill.yaml", teacher=str(tiny_teacher), run_name="sigterm",
                        train={**yaml.safe_load((TINY / "distill.yaml").read_text())["train"], "epochs": 3})
    workdir = tmp_path / "work"
    run_dir = workdir / "ray" / "sigterm"
    command = ["distill", "--config", config, "--workdir", workdir]
    cli = Cli(command, ray_tmp)
    try:
        cli.wait_for(lambda: "epoch_0001" in committed(run_dir), 300, "epoch 1's checkpoint")
        code, seconds = cli.sigterm()
    finally:
        cli.end()
    assert_stopped_cleanly(cli, code, TERMINATED, seconds)
    assert "amad distill: stopped by SIGTERM" in cli.output, cli.output[-3000:]
    kept = committed(run_dir)
    assert "epoch_0001" in kept and "epoch_0003" not in kept, kept

    again = Cli(command, ray_tmp)
    try:
        code = again.wait(600)
    finally:
        again.end()
    assert code == 0, again.output[-4000:]
    resumed_at = int(kept[-1].removeprefix("epoch_"))
    assert f"resumed after epoch {resumed_at}" in again.output, again.output[-4000:]
    assert json.loads((run_dir / names.SUMMARY_FILE).read_text())["latest"][names.EPOCH] == 3


# ---------------------------------------------------------------- amad run


@pytest.mark.integration
def test_run_stops_on_sigterm_in_its_sweep_with_143_then_resumes_serves_and_stops_serving_with_0(examples, ray_tmp, tmp_path):  # noqa: F811
    """The tiny pipeline with a one-trial sweep: SIGTERM once the trial has checkpointed epoch 1; the
    sweep stops as on Ctrl-C, the finished teacher stage stays recorded, exit 143. The same command with
    ``--serve`` then reuses the teacher, finishes and serves; SIGTERM while a request is in flight: it is
    answered (Serve's graceful stop, not ``serve.shutdown`` alone), exit 0, nothing left running."""
    values = yaml.safe_load((TINY / "run.yaml").read_text())
    sweep = yaml.safe_load((ROOT / values["sweep"]).read_text())
    sweep["space"] = {"student.heads": {"grid": [2]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    values.update(sweep=str(tmp_path / "sweep.yaml"), export=str(ROOT / values["export"]))
    values["teacher"]["train_config"] = str(ROOT / values["teacher"]["train_config"])
    values["smoke"]["enabled"] = False
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    workdir = tmp_path / "work"
    cli = Cli(["run", "--config", config, "--workdir", workdir], ray_tmp)
    try:
        cli.wait_for(lambda: list((workdir / "sweeps").glob("*/trials/*/epoch_0001")), 400, "the sweep's first checkpoint")
        code, seconds = cli.sigterm()
    finally:
        cli.end()
    assert_stopped_cleanly(cli, code, TERMINATED, seconds)
    assert set(json.loads((workdir / "pipeline_state.json").read_text())) == {"teacher"}, "only the teacher stage finished"

    again = Cli(["run", "--config", config, "--workdir", workdir, "--serve"], ray_tmp)
    try:
        url = again.line("[run] serving at", 900).split(" at ")[1].split()[0]
        body = json.dumps({"image": b64(examples[0].image_png), "question": examples[0].question}).encode()
        in_flight = InFlight(url, body, hold_s=HOLD_S)
        again.wait_for(in_flight.accepted, 30, "the proxy accepting a request")
        code, seconds = again.sigterm()
        status, answer = in_flight.result(30)
    finally:
        again.end()
    assert "teacher: reused" in again.output, again.output[-4000:]
    assert (status, bool(json.loads(answer).get("answer"))) == (200, True), (status, answer[:300])
    assert_stopped_cleanly(again, code, 0, seconds)
    assert "[run] stopping Serve" in again.output, again.output[-3000:]
    assert set(json.loads((workdir / "pipeline_state.json").read_text())) == {"teacher", "sweep", "export", "smoke", "report"}
