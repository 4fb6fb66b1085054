"""The deployment files under deploy/ (KubeRay, `ray up`, the Dockerfile), checked offline.

No cluster, API server or network: each Kubernetes object against its CRD's openAPIV3Schema (kept in
deploy/k8s/schemas/), the RayService's Serve config through Ray's schema and ours, the RayJobs'
entrypoints through our CLI parser, the launcher config through Ray's own validation, and every Ray
version against the pin in constraints.txt. Then `pipeline.manifests.check_manifests` on the shipped
files (no problems) and on broken copies (each problem names the file and the key).
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.manifests import check_manifests

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SHIPPED = ["deploy/k8s/raycluster.yaml", "deploy/k8s/rayjob-sweep.yaml", "deploy/k8s/rayjob-run.yaml",
           "deploy/k8s/rayservice.yaml", "deploy/k8s/podmonitor.yaml", "deploy/vm/cluster.yaml"]


def pinned(package: str) -> str:
    match = re.search(rf"^{package}==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, f"constraints.txt pins no {package}"
    return match.group(1)


def k8s_objects() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.load_all(path.read_text(), Loader=LOADER) if doc is not None]
    return found


def objects_of(kind: str) -> list[dict]:
    return [obj for _, obj in k8s_objects() if obj["kind"] == kind]


def image_tag(image: str) -> str:
    name = image.split("@")[0]
    assert ":" in name.rsplit("/", 1)[-1], f"{image} has no tag"
    return name.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(SCHEMAS.glob("*/*.yaml")):
        crd = yaml.load(path.read_text(), Loader=LOADER)
        assert crd["kind"] == "CustomResourceDefinition", path
        for version in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def test_every_yaml_under_deploy_loads():
    paths = sorted(p for p in DEPLOY.glob("**/*") if p.suffix in (".yaml", ".yml"))
    for path in paths:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=LOADER) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    assert set(SHIPPED) <= {str(p.relative_to(ROOT)) for p in paths}
    for licence in ("kuberay/LICENSE", "prometheus-operator/LICENSE"):
        assert "Apache License" in (SCHEMAS / licence).read_text()


def test_each_k8s_object_validates_against_its_crd(crd_schemas):
    from jsonschema import Draft202012Validator  # the CRDs' x-kubernetes-* keywords are unknown to it: ignored

    kinds = set()
    for name, obj in k8s_objects():
        schema = crd_schemas.get((obj["apiVersion"], obj["kind"]))
        assert schema is not None, f"{name}: no CRD for {obj['apiVersion']} {obj['kind']}"
        errors = sorted(Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
        kinds.add(obj["kind"])
    assert kinds == {"RayCluster", "RayJob", "RayService", "PodMonitor"}


def test_the_crd_check_refuses_a_wrong_value(crd_schemas):
    """The schemas are not vacuous: a string where KubeRay wants an integer, a number where it wants a string."""
    from jsonschema import Draft202012Validator

    cluster = copy.deepcopy(objects_of("RayCluster")[0])
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 4
    errors = list(Draft202012Validator(crd_schemas[("ray.io/v1", "RayCluster")]).iter_errors(cluster))
    assert {tuple(e.absolute_path) for e in errors} == {
        ("spec", "workerGroupSpecs", 0, "maxReplicas"), ("spec", "headGroupSpec", "rayStartParams", "num-cpus")}


def test_rayservice_serve_config_passes_ray_and_our_checks():
    from ray.serve.schema import ServeDeploySchema

    from serving.deploy_config import check_serve_config

    (service,) = objects_of("RayService")
    doc = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(doc)
    check_serve_config(doc)
    (app,) = doc["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    assert re.fullmatch(r"\d+", app["deployments"][0]["user_config"]["model_version"]), "a resolved version, not an alias"


def test_rayservice_serve_config_is_what_write_config_writes():
    """Rebuilt from its own arguments, `serve_config` (what `amad serve --write-config` writes) gives the same dict."""
    from serving.config import AppArgs, ServeConfig
    from serving.deploy_config import serve_config

    (service,) = objects_of("RayService")
    doc = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = doc["applications"]
    args = {key: value for key, value in app["args"].items() if key in AppArgs.model_fields}
    cfg = ServeConfig(**args, host=doc["http_options"]["host"], port=doc["http_options"]["port"], app_name=app["name"])
    assert serve_config(cfg, app["deployments"][0]["user_config"]["model_version"]) == doc


def test_every_ray_version_and_image_tag_is_the_pinned_one():
    ray = pinned("ray")
    seen = []
    for name, obj in k8s_objects():
        text = yaml.safe_dump(obj)
        seen += [(name, v) for v in re.findall(r"rayVersion: '?([^'\n]+)'?", text)]
        seen += [(name, image_tag(i)) for i in re.findall(r"image: (\S+)", text)]
    launcher = yaml.safe_load((DEPLOY / "vm" / "cluster.yaml").read_text())
    images = [launcher["docker"][k] for k in ("image", "head_image", "worker_image")]
    images += [t["docker"]["worker_image"] for t in launcher["available_node_types"].values() if "docker" in t]
    seen += [("cluster.yaml", image_tag(i)) for i in images]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.MULTILINE))
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("rayproject/ray:"), base
    seen += [("Dockerfile ARG RAY_VERSION", args["RAY_VERSION"]), ("Dockerfile FROM", image_tag(base))]
    assert len(seen) >= 17  # 4 rayVersion, 8 k8s images, 3 launcher images, the Dockerfile's ARG and FROM
    wrong = [(where, value) for where, value in seen if value != ray and not value.startswith(ray + "-")]
    assert not wrong, f"not ray=={ray} (constraints.txt): {wrong}"
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert args["TORCH_VERSION"] == makefile_torch


def test_gpu_containers_run_the_gpu_image():
    gpu_images = [c["image"] for _, obj in k8s_objects() for c in _containers(obj)
                  if "nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})]
    assert gpu_images and all(image.endswith("-gpu") for image in gpu_images), gpu_images


def test_vm_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((DEPLOY / "vm" / "cluster.yaml").read_text())
    full = prepare_config(copy.deepcopy(launcher))
    validate_config(full)
    assert full["available_node_types"]["gpu"]["max_workers"] >= 1
    for command in full["head_start_ray_commands"][1:] + full["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=" in command, command


def test_rayjob_entrypoints_are_amad_commands_the_cli_accepts():
    from pipeline.cli import build_parser

    commands = set()
    for job in objects_of("RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "amad"
        args = build_parser().parse_args(argv[1:])
        assert (ROOT / args.config).is_file(), args.config
        assert args.storage_path and args.storage_path.startswith("s3://"), "checkpoints on storage every node sees"
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": "/home/ray/amad"}
        commands.add(f"{args.command} --config {args.config}")
    assert commands == {"sweep --config tune_configs/sweep.yaml", "run --config tune_configs/default.yaml"}


def test_one_auth_mode_and_one_mlflow_server_everywhere():
    clusters = [obj["spec"] for obj in objects_of("RayCluster")]
    clusters += [obj["spec"]["rayClusterSpec"] for obj in objects_of("RayJob")]
    clusters += [obj["spec"]["rayClusterConfig"] for obj in objects_of("RayService")]
    assert len(clusters) == 4
    assert {yaml.safe_dump(c["authOptions"]) for c in clusters} == {yaml.safe_dump({"mode": "token", "secretName": "amad-ray-auth"})}
    uris = {e["value"] for c in clusters for container in _containers({"spec": c}) for e in container.get("env", [])
            if e["name"] == "MLFLOW_TRACKING_URI"}
    (service,) = objects_of("RayService")
    uris.add(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["tracking_uri"])
    assert len(uris) == 1, uris


def test_shipped_deploy_files_have_no_problems():
    assert check_manifests(ROOT) == []


# ------------------------------------------------------------------ bad inputs: broken copies of the shipped files


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """deploy/ copied (the large CRD schemas linked), with constraints.txt, the Makefile and tune_configs/."""
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("schemas"))
    (tmp_path / "deploy" / "k8s" / "schemas").symlink_to(SCHEMAS, target_is_directory=True)
    for name in ("constraints.txt", "Makefile"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "tune_configs").symlink_to(ROOT / "tune_configs", target_is_directory=True)
    return tmp_path


BROKEN = {
    "wrong rayVersion": ("deploy/k8s/rayjob-sweep.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.59.0"',
                         ["deploy/k8s/rayjob-sweep.yaml", "spec.rayClusterSpec.rayVersion", "'2.59.0'"]),
    "wrong image tag": ("deploy/k8s/rayservice.yaml", "amad-pipeline:2.60.0-py311-cpu\n            ports:\n            - {containerPort: 8080",
                        "amad-pipeline:2.59.0-py311-cpu\n            ports:\n            - {containerPort: 8080",
                        ["deploy/k8s/rayservice.yaml", "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].image", "2.59.0"]),
    "CPU image on a GPU": ("deploy/k8s/raycluster.yaml", "amad-pipeline:2.60.0-py311-gpu", "amad-pipeline:2.60.0-py311-cpu",
                           ["deploy/k8s/raycluster.yaml", "spec.workerGroupSpecs[0].template.spec.containers[0].image", "nvidia.com/gpu"]),
    "unknown serveConfigV2 key": ("deploy/k8s/rayservice.yaml", "          max_replicas: 4\n",
                                  "          max_replicas: 4\n          max_replica: 8\n",
                                  ["deploy/k8s/rayservice.yaml", "spec.serveConfigV2",
                                   "applications[0].deployments[0].autoscaling_config.max_replica"]),
    "serveConfigV2 on 127.0.0.1": ("deploy/k8s/rayservice.yaml", "      host: 0.0.0.0", "      host: 127.0.0.1",
                                   ["deploy/k8s/rayservice.yaml", "spec.serveConfigV2", "http_options.host"]),
    "unknown CRD field": ("deploy/k8s/raycluster.yaml", "  headGroupSpec:\n    rayStartParams:", "  headGroupSpec:\n    rayStartParam:",
                          ["deploy/k8s/raycluster.yaml", "spec.headGroupSpec.rayStartParam", "unknown field"]),
    "bad CRD value": ("deploy/k8s/rayjob-run.yaml", "maxReplicas: 4", "maxReplicas: four",
                      ["deploy/k8s/rayjob-run.yaml", "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas"]),
    "entrypoint the CLI refuses": ("deploy/k8s/rayjob-sweep.yaml", "amad sweep --config", "amad sweep --confg",
                                   ["deploy/k8s/rayjob-sweep.yaml", "spec.entrypoint", "--confg"]),
    "entrypoint config missing": ("deploy/k8s/rayjob-run.yaml", "tune_configs/default.yaml --workdir", "tune_configs/nope.yaml --workdir",
                                  ["deploy/k8s/rayjob-run.yaml", "spec.entrypoint", "tune_configs/nope.yaml"]),
    "no shared storage": ("deploy/k8s/rayjob-sweep.yaml", "\n    --storage-path s3://your-bucket/amad", "",
                          ["deploy/k8s/rayjob-sweep.yaml", "spec.entrypoint", "--storage-path"]),
    "auth mode differs": ("deploy/k8s/rayservice.yaml", "      mode: token", "      mode: disabled",
                          ["deploy/k8s/rayservice.yaml", "spec.rayClusterConfig.authOptions.mode", "'disabled'"]),
    "auth mode unset": ("deploy/k8s/rayjob-run.yaml", "    authOptions:", "    authOptionz:",
                        ["deploy/k8s/rayjob-run.yaml", "spec.rayClusterSpec.authOptions.mode", "not set"]),
    "two objects, one head Service": ("deploy/k8s/raycluster.yaml", "  name: amad-cluster\n", "  name: amad\n",
                                      ["deploy/k8s/ray", "metadata.name", "amad-head-svc"]),
    "MLflow URI differs": ("deploy/k8s/rayjob-sweep.yaml", "value: http://mlflow.mlflow.svc.cluster.local:5000",
                           "value: http://mlflow.other.svc:5000", ["deploy/k8s/rayjob-sweep.yaml", "MLFLOW_TRACKING_URI", "mlflow.other"]),
    "PodMonitor port not declared": ("deploy/k8s/podmonitor.yaml", "  - port: metrics", "  - port: prom",
                                     ["deploy/k8s/raycluster.yaml", "containers[0].ports", "'prom'", "deploy/k8s/podmonitor.yaml"]),
    "launcher: wrong image": ("deploy/vm/cluster.yaml", "worker_image: rayproject/ray:2.60.0-py311-gpu",
                              "worker_image: rayproject/ray:2.59.0-py311-gpu", ["deploy/vm/cluster.yaml", "docker.worker_image", "2.59.0"]),
    "launcher: unknown key": ("deploy/vm/cluster.yaml", "idle_timeout_minutes: 10", "idle_timeout_minute: 10",
                              ["deploy/vm/cluster.yaml", "idle_timeout_minute", "unknown key"]),
    "launcher: no auth mode": ("deploy/vm/cluster.yaml", "    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token\n    MLFLOW_TRACKING_URI=http://mlflow.internal.example.com:5000\n    ray start --address",
                               "    MLFLOW_TRACKING_URI=http://mlflow.internal.example.com:5000\n    ray start --address",
                               ["deploy/vm/cluster.yaml", "worker_start_ray_commands[1]", "RAY_AUTH_MODE"]),
    "launcher: torch pin": ("deploy/vm/cluster.yaml", 'pip install --no-cache-dir "torch==2.13.0"\n', 'pip install --no-cache-dir "torch==2.12.0"\n',
                            ["deploy/vm/cluster.yaml", "available_node_types.gpu.worker_setup_commands[0]", "torch==2.12.0"]),
    "Dockerfile: wrong Ray": ("deploy/Dockerfile", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0",
                              ["deploy/Dockerfile", "ARG RAY_VERSION", "'2.59.0'"]),
    "not YAML": ("deploy/k8s/podmonitor.yaml", "  selector:\n", "  selector: [\n", ["deploy/k8s/podmonitor.yaml", "not valid YAML"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_copy_is_named_by_file_and_key(repo_copy, case):
    name, old, new, expected = BROKEN[case]
    path = repo_copy / name
    text = path.read_text()
    assert old in text, f"{case}: the shipped {name} no longer contains {old!r}: update the case"
    path.write_text(text.replace(old, new, 1))
    problems = check_manifests(repo_copy)
    assert problems, f"{case}: no problem found"
    assert any(all(part in problem for part in expected) for problem in problems), f"{case}: {problems}"


def test_a_wrong_pin_in_constraints_names_every_file(repo_copy):
    """Moving the ray pin without the deployment files: every file that names the old version is reported."""
    constraints = repo_copy / "constraints.txt"
    constraints.write_text(constraints.read_text().replace(f"ray=={pinned('ray')}", "ray==2.61.0"))
    problems = check_manifests(repo_copy)
    for name in SHIPPED[:4] + ["deploy/vm/cluster.yaml", "deploy/Dockerfile"]:
        assert any(p.startswith(name + ":") and "ray==2.61.0" in p for p in problems), (name, problems)


def _containers(obj: dict):
    for key, value in _items(obj):
        if key in ("containers", "initContainers"):
            yield from value


def _items(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _items(value)
    elif isinstance(node, list):
        for value in node:
            yield from _items(value)
