"""Offline checks of the deployment files under ``deploy/`` (KubeRay manifests, the ``ray up`` config, the Dockerfile).

:func:`check_manifests` returns one line per problem, each naming the file and the key, e.g.
``deploy/k8s/rayjob-sweep.yaml: RayJob/amad-sweep spec.rayClusterSpec.rayVersion: '2.59.0' is not ray==2.60.0
(constraints.txt)``. Nothing here needs a cluster, an API server or the network:

* every YAML under ``deploy/`` loads;
* every object in ``deploy/k8s/`` validates against its CustomResourceDefinition's ``openAPIV3Schema``
  (kept in ``deploy/k8s/schemas/``), with unknown fields refused as ``kubectl apply``'s strict field
  validation refuses them (a CRD schema alone allows them: the API server would silently drop them);
* every ``rayVersion`` and every image tag (k8s containers, the launcher's Docker images, the Dockerfile's
  ``FROM``) is the Ray version pinned in ``constraints.txt``; a container given ``nvidia.com/gpu`` runs a GPU image;
* a RayService's ``serveConfigV2`` passes :func:`serving.deploy_config.check_serve_config` (Ray's
  ``ServeDeploySchema`` plus unknown keys and autoscaling values), listens on 0.0.0.0 at the head's ``serve`` port;
* a RayJob's ``entrypoint`` is an ``amad`` command that :func:`pipeline.cli.build_parser` accepts, whose
  ``--config`` exists, and whose Train/Tune jobs name shared ``--storage-path`` (a node-local path fails at
  the first checkpoint on a multi-node cluster);
* one Ray auth mode everywhere: every cluster spec sets ``authOptions.mode``, all the same, no container
  contradicts it, and every ``ray start`` of the launcher config sets ``RAY_AUTH_MODE`` itself (a token
  file alone switches a node into token mode);
* no two objects for which KubeRay would create Services of the same name (``<name>-head-svc``);
* one MLflow server: every ``MLFLOW_TRACKING_URI`` and Serve ``tracking_uri`` in ``deploy/k8s/`` agree;
* the PodMonitor selects the pod templates and every one declares the port it scrapes;
* the launcher config passes Ray's own ``prepare_config`` + ``validate_config`` (what ``ray up`` runs first),
  and pins ``torch`` as the Makefile does.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shlex
from pathlib import Path

import yaml

K8S_DIR = Path("deploy/k8s")
SCHEMA_DIR = K8S_DIR / "schemas"
VM_DIR = Path("deploy/vm")
GPU_RESOURCE = "nvidia.com/gpu"
# Train/Tune jobs write checkpoints: on a multi-node cluster they need storage every node sees.
STORAGE_COMMANDS = ("distill", "sweep", "run")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are ~3 MB of YAML
_CRD_CACHE: dict[tuple, list] = {}  # parsed CRD files, by (resolved path, mtime, size)
_VALIDATORS: dict[tuple, object] = {}  # strict jsonschema validators, by (CRD file, version schema)


def check_manifests(root: Path) -> list[str]:
    """Every problem of the deployment files of the repository at ``root``; an empty list when there is none."""
    root = Path(root)
    problems: list[str] = []
    ray_version = _pinned(root / "constraints.txt", "ray", problems)
    torch_version = _makefile_var(root / "Makefile", "TORCH_VERSION")
    files = _load_yaml_files(root, problems)
    schemas = _crd_schemas(root, files)
    seen = _Seen()
    for path, docs in files.items():
        rel = path.relative_to(root)
        if _under(rel, SCHEMA_DIR):
            continue
        if _under(rel, K8S_DIR):
            for doc in docs:
                _check_k8s_object(root, rel, doc, schemas, ray_version, seen, problems)
        elif _under(rel, VM_DIR):
            for doc in docs:
                _check_launcher_config(rel, doc, ray_version, torch_version, problems)
    for dockerfile in sorted((root / "deploy").glob("**/Dockerfile*")):
        _check_dockerfile(dockerfile.relative_to(root), dockerfile.read_text(), ray_version, torch_version, problems)
    _check_across_k8s(seen, problems)
    return problems


# ---------------------------------------------------------------------------------------------- loading


def _load_yaml_files(root: Path, problems: list[str]) -> dict[Path, list]:
    files = {}
    found = [Path(d) / f for d, _, names in os.walk(root / "deploy", followlinks=True) for f in names]
    for path in sorted(found):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        rel = path.relative_to(root)
        try:
            if _under(rel, SCHEMA_DIR):  # large and unchanging: parse once per process
                stat = path.stat()
                key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
                if key not in _CRD_CACHE:
                    _CRD_CACHE[key] = [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d is not None]
                files[path] = _CRD_CACHE[key]
            else:
                files[path] = [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d is not None]
        except yaml.YAMLError as err:
            problems.append(f"{rel}: not valid YAML: {' '.join(str(err).split())}")
    return files


def _crd_schemas(root: Path, files: dict[Path, list]) -> dict[tuple[str, str], tuple[dict, Path]]:
    """``{(apiVersion, kind): (openAPIV3Schema, file)}`` of every served version of every CRD under deploy/k8s/schemas."""
    schemas = {}
    for path, docs in files.items():
        if not _under(path.relative_to(root), SCHEMA_DIR):
            continue
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec.get("versions", []):
                if version.get("served", True):
                    api_version = f"{spec['group']}/{version['name']}"
                    schemas[(api_version, spec["names"]["kind"])] = (version["schema"]["openAPIV3Schema"], path)
    return schemas


# ---------------------------------------------------------------------------------------------- k8s objects


class _Seen:
    """What the per-object checks collect for the checks across files."""

    def __init__(self):
        self.auth: list[tuple[str, dict]] = []        # (where, authOptions)
        self.tracking_uris: list[tuple[str, str]] = []  # (where, uri)
        self.templates: list[tuple[str, dict, dict]] = []  # (where, pod template, rayStartParams)
        self.pod_monitors: list[tuple[str, dict]] = []
        self.services: dict[str, str] = {}  # Service name KubeRay will create -> who creates it


def _check_k8s_object(root: Path, rel: Path, obj: object, schemas: dict, ray_version: str | None,
                      seen: _Seen, problems: list[str]) -> None:
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        problems.append(f"{rel}: a Kubernetes object needs apiVersion and kind")
        return
    name = (obj.get("metadata") or {}).get("name")
    me = f"{rel}: {obj['kind']}/{name}"
    if not name:
        problems.append(f"{me} metadata.name: missing")
    found = schemas.get((obj["apiVersion"], obj["kind"]))
    if found is None:
        problems.append(f"{me} apiVersion/kind: no CRD for {obj['apiVersion']} {obj['kind']} under {SCHEMA_DIR}")
    else:
        for path, message in _schema_errors(obj, *found):
            problems.append(f"{me} {path}: {message}")
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    for path, value in _walk(obj):
        if path.endswith("rayVersion") and ray_version and str(value) != ray_version:
            problems.append(f"{me} {path}: {value!r} is not ray=={ray_version} (constraints.txt)")
    for path, container in _containers(obj):
        _check_container(me, path, container, ray_version, problems)
    if obj["kind"] == "PodMonitor":
        seen.pod_monitors.append((me, obj))
    cluster_key = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}.get(obj["kind"])
    if cluster_key and name:
        # KubeRay names the Services it creates after the object (utils.GenerateHeadServiceName, v1.7.0): two
        # objects of one name, say a RayCluster and a RayService, would fight over <name>-head-svc.
        for service in [f"{name}-head-svc"] + ([f"{name}-serve-svc"] if obj["kind"] == "RayService" else []):
            if service in seen.services:
                problems.append(f"{me} metadata.name: KubeRay would create the Service {service} for it and for "
                                f"{seen.services[service]}; rename one")
            seen.services.setdefault(service, me)
    if cluster_key:
        cluster = spec if obj["kind"] == "RayCluster" else spec.get(cluster_key.split(".")[1])
        if isinstance(cluster, dict):
            _collect_cluster(me, cluster_key, cluster, seen, problems)
    if obj["kind"] == "RayService":
        _check_serve_config(me, spec, seen, problems)
    if obj["kind"] == "RayJob":
        _check_entrypoint(root, me, spec, problems)


def _schema_errors(obj: dict, schema: dict, source: Path) -> list[tuple[str, str]]:
    from jsonschema import Draft202012Validator

    key = (str(source.resolve()), id(schema))  # schema: an object of a cached CRD file, so its id is stable
    if key not in _VALIDATORS:
        _VALIDATORS[key] = Draft202012Validator(_strict(schema))
    validator = _VALIDATORS[key]
    found = []
    for error in validator.iter_errors(obj):
        path = _path(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            for extra in sorted(set(error.instance) - known):
                found.append((f"{path}.{extra}" if path else extra, "unknown field (kubectl apply's strict validation refuses it)"))
        else:
            found.append((path or "(top level)", error.message))
    return sorted(found)[:10]


def _strict(schema: object) -> object:
    """The schema with ``additionalProperties: false`` wherever it lists properties and keeps no unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for keyword in ("properties", "patternProperties", "definitions", "$defs"):
        if isinstance(schema.get(keyword), dict):
            out[keyword] = {name: _strict(sub) for name, sub in schema[keyword].items()}
    for keyword in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(keyword), (dict, list)):
            out[keyword] = _strict(schema[keyword])
    for keyword in ("allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(keyword), list):
            out[keyword] = [_strict(sub) for sub in schema[keyword]]
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _containers(obj: dict):
    """``(key path, container)`` of every container and init container anywhere in ``obj``."""
    for path, value in _walk(obj):
        if path.split(".")[-1] in ("containers", "initContainers") and isinstance(value, list):
            for i, container in enumerate(value):
                if isinstance(container, dict):
                    yield f"{path}[{i}]", container


def _check_container(me: str, path: str, container: dict, ray_version: str | None, problems: list[str]) -> None:
    image = container.get("image")
    if not isinstance(image, str):
        return
    problem = _image_problem(image, ray_version)
    if problem:
        problems.append(f"{me} {path}.image: {problem}")
    limits = (container.get("resources") or {}).get("limits") or {}
    if GPU_RESOURCE in limits and not _is_gpu_tag(image):
        problems.append(f"{me} {path}.image: {image!r} is a CPU image but the container asks for {GPU_RESOURCE} "
                        "(use the -gpu build: docker build --build-arg VARIANT=gpu)")


def _collect_cluster(me: str, key: str, cluster: dict, seen: _Seen, problems: list[str]) -> None:
    auth = cluster.get("authOptions") or {}
    if not auth.get("mode"):
        problems.append(f"{me} {key}.authOptions.mode: not set; set it (token or disabled) in every cluster spec, "
                        "the same everywhere, so that nodes and clients agree")
    else:
        seen.auth.append((f"{me} {key}.authOptions", auth))
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or []) if isinstance(g, dict)]
    for group_key, group in groups:
        template = group.get("template") or {}
        where = f"{me} {key}.{group_key}.template"
        seen.templates.append((where, template, group.get("rayStartParams") or {}))
        for i, container in enumerate((template.get("spec") or {}).get("containers") or []):
            for env in container.get("env") or []:
                at = f"{where}.spec.containers[{i}].env[{env.get('name')}]"
                if env.get("name") == "RAY_AUTH_MODE" and auth.get("mode") and env.get("value") != auth["mode"]:
                    problems.append(f"{at}: {env.get('value')!r} contradicts {key}.authOptions.mode={auth['mode']!r}")
                if env.get("name") == "MLFLOW_TRACKING_URI" and "value" in env:
                    seen.tracking_uris.append((at, env["value"]))


def _check_serve_config(me: str, spec: dict, seen: _Seen, problems: list[str]) -> None:
    from serving.deploy_config import ServeConfigError, check_serve_config

    at = f"{me} spec.serveConfigV2"
    text = spec.get("serveConfigV2")
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{at}: missing (the Serve config `amad serve --write-config` writes)")
        return
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problems.append(f"{at}: not valid YAML: {' '.join(str(err).split())}")
        return
    try:
        check_serve_config(doc)
    except ServeConfigError as err:
        problems.append(f"{at}: {err}")
        return
    http = doc.get("http_options") or {}
    if http.get("host") != "0.0.0.0":
        problems.append(f"{at}: http_options.host: {http.get('host')!r}; KubeRay's serve Service reaches the proxy only on 0.0.0.0")
    head = ((spec.get("rayClusterConfig") or {}).get("headGroupSpec") or {}).get("template") or {}
    for container in (head.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "serve" and port.get("containerPort") != http.get("port", 8000):
                problems.append(f"{at}: http_options.port: {http.get('port', 8000)} is not the head's port named serve "
                                f"({port.get('containerPort')})")
    for i, app in enumerate(doc.get("applications") or []):
        uri = (app.get("args") or {}).get("tracking_uri")
        if uri:
            seen.tracking_uris.append((f"{at}: applications[{i}].args.tracking_uri", uri))


def _check_entrypoint(root: Path, me: str, spec: dict, problems: list[str]) -> None:
    from pipeline.cli import build_parser

    at = f"{me} spec.entrypoint"
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str):
        problems.append(f"{at}: missing")
        return
    argv = shlex.split(entrypoint)
    if not argv or argv[0] != "amad":
        problems.append(f"{at}: {entrypoint!r} is not an `amad ...` command")
        return
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        lines = errors.getvalue().strip().splitlines()
        problems.append(f"{at}: amad refuses {shlex.join(argv[1:])!r}: {lines[-1] if lines else 'usage error'}")
        return
    config = getattr(args, "config", None)
    if config is not None and not (root / config).is_file():
        problems.append(f"{at}: --config {config}: no such file in the repository (the job's working_dir)")
    if args.command in STORAGE_COMMANDS:
        storage, named = getattr(args, "storage_path", None), "--storage-path"
        if not storage and config is not None and (root / config).is_file():  # else the job YAML's storage.path
            with contextlib.suppress(yaml.YAMLError, AttributeError):
                storage, named = (yaml.safe_load((root / config).read_text()).get("storage") or {}).get("path"), f"{config}'s storage.path"
        if not storage:
            problems.append(f"{at}: no --storage-path (nor storage.path in {config}): on a multi-node cluster checkpoints "
                            "need storage every node sees (s3://, gs://, or a shared mount; docs/storage.md)")
        elif "://" not in str(storage) and not str(storage).startswith("/"):
            problems.append(f"{at}: {named} {storage!r} is a relative path: give a URI (s3://, gs://) or a shared mount's absolute path")
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env is not None:
        try:
            parsed = yaml.safe_load(runtime_env)
        except yaml.YAMLError as err:
            problems.append(f"{me} spec.runtimeEnvYAML: not valid YAML: {' '.join(str(err).split())}")
            return
        if not isinstance(parsed, dict):
            problems.append(f"{me} spec.runtimeEnvYAML: a runtime_env is a mapping, got {type(parsed).__name__}")


def _check_across_k8s(seen: _Seen, problems: list[str]) -> None:
    if seen.auth:
        first_where, first = seen.auth[0]
        for where, auth in seen.auth[1:]:
            for field in ("mode", "secretName"):
                if auth.get(field) != first.get(field):
                    problems.append(f"{where}.{field}: {auth.get(field)!r} differs from {first.get(field)!r} at {first_where}; "
                                    "one auth mode and token for every cluster (clients use one)")
    if seen.tracking_uris:
        first_where, first = seen.tracking_uris[0]
        for where, uri in seen.tracking_uris[1:]:
            if uri != first:
                problems.append(f"{where}: {uri!r} differs from {first!r} at {first_where}; one MLflow server for jobs and Serve")
    for where, template, start_params in seen.templates:
        for i, container in enumerate((template.get("spec") or {}).get("containers") or []):
            for port in container.get("ports") or []:
                wanted = start_params.get("metrics-export-port")
                if port.get("name") == "metrics" and wanted is not None and str(port.get("containerPort")) != str(wanted):
                    problems.append(f"{where}.spec.containers[{i}].ports[metrics]: {port.get('containerPort')} is not "
                                    f"rayStartParams metrics-export-port {wanted}")
    for me, monitor in seen.pod_monitors:
        spec = monitor.get("spec") or {}
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        matched = [(where, t) for where, t, _ in seen.templates
                   if wanted and all(((t.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in wanted.items())]
        if not matched:
            problems.append(f"{me} spec.selector.matchLabels: {wanted} selects no pod template in {K8S_DIR}")
        for j, endpoint in enumerate(spec.get("podMetricsEndpoints") or []):
            port = endpoint.get("port")
            for where, template in matched if port else []:
                ray_container = ((template.get("spec") or {}).get("containers") or [{}])[0]  # KubeRay: the first is Ray's
                if port not in {p.get("name") for p in ray_container.get("ports") or []}:
                    problems.append(f"{where}.spec.containers[0].ports: no port named {port!r}, which "
                                    f"{me.split(':')[0]} spec.podMetricsEndpoints[{j}].port scrapes")


# ---------------------------------------------------------------------------------------------- ray up, Dockerfile


def _check_launcher_config(rel: Path, doc: object, ray_version: str | None, torch_version: str | None,
                           problems: list[str]) -> None:
    if not isinstance(doc, dict):
        problems.append(f"{rel}: a cluster launcher config is a mapping")
        return
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(doc)))  # what `ray up` runs before it talks to the cloud
    except jsonschema.ValidationError as err:
        extra = re.findall(r"'([^']+)' was unexpected", err.message)
        path = _path(err.absolute_path)
        if extra:
            problems.append(f"{rel}: {path + '.' if path else ''}{extra[0]}: unknown key (ray up refuses it)")
        else:
            problems.append(f"{rel}: {path or '(top level)'}: {err.message}")
    except (ValueError, RuntimeError, KeyError, NotImplementedError, AssertionError) as err:
        problems.append(f"{rel}: ray up refuses it: {err}")
    docker = doc.get("docker") or {}
    images = {f"docker.{k}": docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)}
    for name, node_type in (doc.get("available_node_types") or {}).items():
        node_image = ((node_type or {}).get("docker") or {}).get("worker_image")
        if node_image:
            images[f"available_node_types.{name}.docker.worker_image"] = node_image
        is_head = name == doc.get("head_node_type")
        image = node_image or docker.get("head_image" if is_head else "worker_image") or docker.get("image")
        if image and _is_gpu_node(node_type or {}) and not _is_gpu_tag(image):
            problems.append(f"{rel}: available_node_types.{name}: a GPU instance type runs the CPU image {image!r}")
    for key, image in images.items():
        problem = _image_problem(image, ray_version)
        if problem:
            problems.append(f"{rel}: {key}: {problem}")
    for key, command in _commands(doc):
        for pinned in re.findall(r"\bray(?:\[[^\]]*\])?==([\w.]+)", command):
            if ray_version and pinned != ray_version:
                problems.append(f"{rel}: {key}: installs ray=={pinned}, not ray=={ray_version} (constraints.txt)")
        for pinned in re.findall(r"\btorch==([\w.]+)", command):
            if torch_version and pinned != torch_version:
                problems.append(f"{rel}: {key}: installs torch=={pinned}, not the Makefile's TORCH_VERSION {torch_version}")
    modes = {}
    for key, command in _commands(doc):
        if "ray start" not in command:
            continue
        mode = re.search(r"\bRAY_AUTH_MODE=(\S+)", command)
        if not mode:
            problems.append(f"{rel}: {key}: `ray start` without RAY_AUTH_MODE=...: set it on every node (a token file "
                            "alone switches a node into token mode, and then nodes or clients disagree)")
            continue
        modes[key] = mode.group(1)
        if mode.group(1) == "token" and not re.search(r"\bRAY_AUTH_TOKEN(_PATH)?=", command):
            problems.append(f"{rel}: {key}: token mode without RAY_AUTH_TOKEN_PATH= (or RAY_AUTH_TOKEN=)")
    if len(set(modes.values())) > 1:
        problems.append(f"{rel}: RAY_AUTH_MODE differs between start commands: {modes}")


def _commands(doc: dict):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for i, command in enumerate(doc.get(key) or []):
            yield f"{key}[{i}]", str(command)
    for name, node_type in (doc.get("available_node_types") or {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            for i, command in enumerate((node_type or {}).get(key) or []):
                yield f"available_node_types.{name}.{key}[{i}]", str(command)


def _check_dockerfile(rel: Path, text: str, ray_version: str | None, torch_version: str | None, problems: list[str]) -> None:
    args: dict[str, str] = {}
    lines = re.sub(r"\\\n", " ", text).splitlines()
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "ARG" and len(words) > 1 and "=" in words[1]:
            name, default = words[1].split("=", 1)
            args[name] = default.strip("\"'")
            if name == "RAY_VERSION" and ray_version and args[name] != ray_version:
                problems.append(f"{rel}: ARG RAY_VERSION: {args[name]!r} is not ray=={ray_version} (constraints.txt)")
            if name == "TORCH_VERSION" and torch_version and args[name] != torch_version:
                problems.append(f"{rel}: ARG TORCH_VERSION: {args[name]!r} is not the Makefile's TORCH_VERSION {torch_version}")
        if words[0].upper() == "FROM" and len(words) > 1:
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[1])
            if image.startswith("rayproject/"):
                problem = _image_problem(image, ray_version)
                if problem:
                    problems.append(f"{rel}: FROM (line {number}): {problem}")


# ---------------------------------------------------------------------------------------------- small helpers


def _image_problem(image: str, ray_version: str | None) -> str | None:
    """Why ``image``'s tag is not of the pinned Ray version ({version} or {version}-...), or None."""
    if ray_version is None:
        return None
    name = image.split("@")[0]
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
    if tag is None:
        return f"{image!r} has no tag; tag it {ray_version}-... (the ray pin of constraints.txt)"
    if tag != ray_version and not tag.startswith(ray_version + "-"):
        return f"{image!r}: tag {tag!r} is not of ray=={ray_version} (constraints.txt); expected {ray_version}-..."
    return None


def _is_gpu_tag(image: str) -> bool:
    return re.search(r"[:-](gpu|cu\d+)\b", image.split("@")[0].rsplit("/", 1)[-1]) is not None


def _is_gpu_node(node_type: dict) -> bool:
    resources = node_type.get("resources") or {}
    instance = str((node_type.get("node_config") or {}).get("InstanceType", ""))
    return bool(resources.get("GPU")) or re.match(r"^(g\d|p\d)", instance) is not None


def _pinned(constraints: Path, package: str, problems: list[str]) -> str | None:
    try:
        text = constraints.read_text()
    except OSError:
        problems.append(f"{constraints.name}: missing; the deployment files pin {package} from it")
        return None
    match = re.search(rf"^{re.escape(package)}==(\S+)", text, re.MULTILINE | re.IGNORECASE)
    if not match:
        problems.append(f"{constraints.name}: no {package}==... line")
        return None
    return match.group(1)


def _makefile_var(makefile: Path, name: str) -> str | None:
    try:
        match = re.search(rf"^{name}\s*\??=\s*(\S+)", makefile.read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def _walk(node: object, path: str = ""):
    """``(key path, value)`` of every mapping entry under ``node``: ``spec.workerGroupSpecs[0].replicas``."""
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{path}.{key}" if path else str(key)
            yield at, value
            yield from _walk(value, at)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _under(rel: Path, directory: Path) -> bool:
    return rel.parts[: len(directory.parts)] == directory.parts
