"""Serve config files (``amad serve --write-config`` / ``--check-config``, ``serving.app:app_builder``,
``serve build serving.app:app``) without a Ray cluster; ``tests/test_serve.py`` deploys one with ``serve deploy``."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline import cli
from serving.config import AppArgs, ServeConfig, UserConfig
from serving.deploy_config import IMPORT_PATH, ServeConfigError, check_serve_config, load_serve_config, serve_config, write_serve_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models:/amad-student@champion"
TOKEN = "config-token-91ab"


@pytest.fixture()
def written() -> dict:
    cfg = ServeConfig(model=MODEL, tracking_uri="sqlite:///store/mlflow.db", port=8123, autoscale=(1, 3), replica_cpus=0.5)
    return serve_config(cfg, "7", TOKEN)


def test_the_written_config_pins_the_version_carries_the_typed_args_and_passes_rays_schema(written):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(written)
    check_serve_config(written)
    [app] = written["applications"]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    [deployment] = app["deployments"]
    assert UserConfig.model_validate(deployment["user_config"]) == UserConfig(model_version="7", max_batch_size=16, batch_wait_ms=5.0)
    assert deployment["autoscaling_config"]["min_replicas"] == 1 and deployment["autoscaling_config"]["max_replicas"] == 3
    assert deployment["ray_actor_options"] == {"num_cpus": 0.5} and "num_replicas" not in deployment
    args = AppArgs.model_validate(app["args"])
    assert args.model == MODEL and args.autoscale == (1, 3) and args.token_sha256 == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert written["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert TOKEN not in yaml.safe_dump(written), "the token itself must never be in a Serve config"


def test_a_gpu_replica_asks_ray_for_its_gpu():
    cfg = ServeConfig(model=MODEL, tracking_uri="sqlite:///x.db", replica_gpus=1)
    [deployment] = serve_config(cfg, "1")["applications"][0]["deployments"]
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}


def _at(doc: dict, path: str) -> dict:
    node = doc
    for part in path.split("/") if path else []:
        node = node[int(part)] if part.isdigit() else node[part]
    return node


DEPLOYMENT = "applications/0/deployments/0"


@pytest.mark.parametrize(("where", "change", "message"), [
    ("", {"proxy_locaton": "HeadOnly"}, "proxy_locaton: unknown key"),
    ("http_options", {"prot": 8000}, "http_options.prot: unknown key"),
    ("applications/0", {"import_pth": "x:y"}, "applications[0].import_pth: unknown key"),
    ("applications/0/args", {"replica": 2}, "applications[0].args.replica: unknown key"),
    ("applications/0/args/limits", {"max_top": 3}, "applications[0].args.limits.max_top: unknown key"),
    ("applications/0/args", {"replicas": 0}, "applications[0].args.replicas: Input should be greater than or equal to 1"),
    ("applications/0/args", {"model": "amad-student"}, "must look like models:/"),
    (DEPLOYMENT, {"num_replica": 2}, "applications[0].deployments[0].num_replica: unknown key"),
    (DEPLOYMENT, {"name": "Answers"}, "applications[0].deployments[0].name: 'Answers' is not a deployment of serving.app:app_builder"),
    (DEPLOYMENT + "/ray_actor_options", {"num_cpu": 2}, "ray_actor_options.num_cpu: unknown key"),
    (DEPLOYMENT + "/autoscaling_config", {"max_replica": 4}, "autoscaling_config.max_replica: unknown key"),
    (DEPLOYMENT + "/autoscaling_config", {"min_replicas": "lots"}, "autoscaling_config.min_replicas: Input should be a valid integer"),
    (DEPLOYMENT + "/autoscaling_config", {"upscale_delay_s": -1}, "autoscaling_config.upscale_delay_s: Input should be greater than or equal to 0"),
    (DEPLOYMENT + "/autoscaling_config", {"min_replicas": 5}, "max_replicas (3) must be greater than or equal to min_replicas (5)"),
    (DEPLOYMENT + "/user_config", {"model_version": "champion"}, "user_config.model_version: String should match pattern"),
    (DEPLOYMENT + "/user_config", {"max_batch": 8}, "user_config.max_batch: unknown key"),
])
def test_unknown_keys_and_bad_values_are_errors_naming_the_key(written, where, change, message):
    """Ray's own schema accepts every one of the unknown keys, and the untyped autoscaling values."""
    from ray.serve.schema import ServeDeploySchema

    bad = copy.deepcopy(written)
    _at(bad, where).update(change)
    if "unknown key" in message or "autoscaling_config" in message:
        ServeDeploySchema.model_validate(bad)  # what this check adds to Ray's
    with pytest.raises(ServeConfigError) as caught:
        check_serve_config(bad)
    assert message in str(caught.value)


def test_other_applications_in_the_same_config_are_checked_against_rays_models_only(written):
    other = {"name": "other", "route_prefix": "/other", "import_path": "someone.else:app", "args": {"anything": 1},
             "deployments": [{"name": "Whatever", "user_config": {"free": "form"}}]}
    doc = copy.deepcopy(written)
    doc["applications"].append(other)
    check_serve_config(doc)
    other["deployments"][0]["num_replica"] = 2
    with pytest.raises(ServeConfigError, match=r"applications\[1\].deployments\[0\].num_replica: unknown key"):
        check_serve_config(doc)


def test_written_file_has_its_header_and_reads_back_and_bad_files_name_the_file(written, tmp_path):
    path = tmp_path / "conf" / "serve.yaml"
    write_serve_config(path, written, "Written by: amad serve --write-config x\nline two")
    text = path.read_text()
    assert text.startswith("# Written by: amad serve --write-config x\n# line two\n")
    assert load_serve_config(path) == written and not list(path.parent.glob("*.partial"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n")
    with pytest.raises(ServeConfigError, match=r"broken.yaml: not valid YAML"):
        load_serve_config(broken)
    with pytest.raises(ServeConfigError, match=r"missing.yaml: cannot read it"):
        load_serve_config(tmp_path / "missing.yaml")
    with pytest.raises(ServeConfigError, match="a Serve config is a mapping"):
        check_serve_config(["applications"])
    # A refused config is never written: the file there keeps its content.
    bad = copy.deepcopy(written)
    bad["applications"][0]["deployments"][0]["num_replica"] = 2
    with pytest.raises(ServeConfigError):
        write_serve_config(path, bad, "x")
    assert path.read_text() == text


def test_cli_check_config_exits_0_when_valid_and_2_naming_file_and_key(written, tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(written))
    doc = copy.deepcopy(written)
    doc["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 9
    bad.write_text(yaml.safe_dump(doc))
    assert cli.main(["serve", "--check-config", str(good)]) == 0
    assert "is a valid Serve config (applications: amad)" in capsys.readouterr().out
    assert cli.main(["serve", "--check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "autoscaling_config.max_replica: unknown key" in err and "Traceback" not in err


def test_cli_write_config_refuses_a_model_not_in_the_registry_and_keeps_the_old_file(tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    path.write_text("# an earlier config\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["serve", "--write-config", str(path), "--model", "models:/nobody@champion", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "models:/nobody@champion" in err and "not in the registry" in err
    assert path.read_text() == "# an earlier config\n"
    assert cli.main(["serve", "--write-config", str(path), "--model", "nobody", "--tracking-uri", uri]) == 2
    assert "must look like models:/" in capsys.readouterr().err


def test_the_application_builder_takes_one_typed_argument_and_refuses_unknown_keys():
    from serving.app import app_builder

    with pytest.raises(ValidationError, match="replica_cpu"):
        app_builder({"model": MODEL, "tracking_uri": "sqlite:///x.db", "replica_cpu": 2})
    import inspect

    assert inspect.signature(app_builder).parameters["args"].annotation in (AppArgs, "AppArgs")


def test_serve_build_writes_a_config_for_the_module_level_application(tmp_path):
    """``serve build serving.app:app``: the replicas resolve the model when they start (no version pinned)."""
    out = tmp_path / "built.yaml"
    done = subprocess.run([str(Path(sys.executable).parent / "serve"), "build", "serving.app:app", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    built = yaml.safe_load(out.read_text())
    [app] = built["applications"]
    assert app["import_path"] == "serving.app:app"
    [deployment] = app["deployments"]
    assert deployment["name"] == "AnswerService" and deployment["user_config"]["model_version"] is None
    check_serve_config(built)
