"""Serve config files for ``serve deploy`` / ``serve run FILE`` / a KubeRay RayService's ``serveConfigV2``.

:func:`serve_config` is what ``amad serve --write-config FILE`` writes::

    proxy_location: HeadOnly
    http_options: {host: ..., port: ...}
    applications:
    - name: amad
      route_prefix: /
      import_path: serving.app:app_builder
      args: {model: models:/amad-student@champion, tracking_uri: ..., limits: {...}, ...}   # serving.config.AppArgs
      deployments:
      - name: AnswerService
        user_config: {model_version: "7", max_batch_size: 16, batch_wait_ms: 5.0}       # the RESOLVED version
        ray_actor_options: {num_cpus: 1.0}
        max_ongoing_requests: 32
        num_replicas: 1                       # or autoscaling_config: {...}

Why the version is resolved here: Serve compares a deployed config with the running one and an
unchanged config is a no-op, so a config that said ``@champion`` would never pick up a new champion.
Re-running ``--write-config`` after the alias moved changes only ``user_config``; Serve's code version
for a config-deployed app hashes ``import_path``, ``args`` and ``runtime_env`` (Ray 2.60,
``deploy_utils.get_app_code_version``), so ``serve deploy`` then calls ``reconfigure`` on the running
replicas, which swap the model in place (see :mod:`serving.app`).

:func:`check_serve_config` is stricter than Ray: ``ServeDeploySchema`` accepts unknown keys (a typo such
as ``max_replica`` is silently ignored) and takes ``autoscaling_config`` as an untyped dict (a bad value
surfaces only when the controller deploys). Here every key is checked against Ray's own schema models,
``autoscaling_config`` against ``ray.serve.config.AutoscalingConfig``, and our application's ``args`` and
``user_config`` against :class:`~serving.config.AppArgs` and :class:`~serving.config.UserConfig`; the
first problem is raised with the path of the key (``applications[0].deployments[0].autoscaling_config.max_replica``).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from serving.config import AppArgs, ServeConfig, UserConfig

IMPORT_PATH = "serving.app:app_builder"
DEPLOYMENT = "AnswerService"


class ServeConfigError(ValueError):
    """A Serve config that Ray or our stricter check refuses; the message names the key."""


def serve_config(cfg: ServeConfig, version: str, token: str | None = None) -> dict:
    """The Serve config deploying ``cfg`` with the model pinned to ``version`` (a resolved registry version).

    ``token`` (normally ``$AMAD_SERVE_TOKEN``) enters only as its SHA-256: a Serve config is readable
    by anyone who can read the cluster's state.
    """
    from serving.app import deployment_options

    args = cfg.app_args(token)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": args.model_dump(mode="json", exclude_none=True),
            "deployments": [{"name": DEPLOYMENT, **deployment_options(args, version)}],
        }],
    }


def write_serve_config(path: Path, config: dict, header: str) -> None:
    """Write ``config`` as YAML under a ``#`` comment ``header``, atomically (a reader never sees half a file)."""
    check_serve_config(config)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    text = comment + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def load_serve_config(path: Path) -> dict:
    """Read and strictly check a Serve config file; :class:`ServeConfigError` names the file and the key."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ServeConfigError(f"{path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ServeConfigError(f"{path}: not valid YAML ({err})") from None
    try:
        check_serve_config(doc)
    except ServeConfigError as err:
        raise ServeConfigError(f"{path}: {err}") from None
    return doc


def check_serve_config(doc: object) -> None:
    """Raise :class:`ServeConfigError` naming the first unknown key or bad value of a Serve config (a dict)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema  # its nested models cover applications and deployments

    if not isinstance(doc, dict):
        raise ServeConfigError(f"a Serve config is a mapping with an 'applications' list, not {type(doc).__name__}")
    _check_model(ServeDeploySchema, doc, "")
    for i, app in enumerate(doc.get("applications") or []):
        where = f"applications[{i}]"
        ours = app.get("import_path") == IMPORT_PATH
        if ours:
            _check_model(AppArgs, app.get("args") or {}, f"{where}.args")
        for j, deployment in enumerate(app.get("deployments") or []):
            at = f"{where}.deployments[{j}]"
            if deployment.get("autoscaling_config") is not None:
                _check_model(AutoscalingConfig, deployment["autoscaling_config"], f"{at}.autoscaling_config")
            if ours:
                if deployment.get("name") != DEPLOYMENT:
                    raise ServeConfigError(f"{at}.name: {deployment.get('name')!r} is not a deployment of {IMPORT_PATH} "
                                           f"(it has one: {DEPLOYMENT!r})")
                if deployment.get("user_config") is not None:
                    _check_model(UserConfig, deployment["user_config"], f"{at}.user_config")


def _check_model(model: type[BaseModel], value: object, where: str) -> None:
    """Unknown keys anywhere in ``value`` (recursing into nested pydantic models), then pydantic's own validation."""
    _unknown_keys(model, value, where)
    try:
        model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        key = f"{where}.{path}" if where and path else (where or path or "config")
        raise ServeConfigError(f"{key}: {first['msg']} (got {_short(first.get('input'))})") from None


def _unknown_keys(model: type[BaseModel], value: object, where: str) -> None:
    if not isinstance(value, dict):
        return  # pydantic's validation reports the wrong type
    fields = model.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    for key in value:
        if key not in names:
            at = f"{where}.{key}" if where else str(key)
            raise ServeConfigError(f"{at}: unknown key (known here: {', '.join(sorted(fields))})")
    for name, field in fields.items():
        if value.get(name) is None:
            continue
        nested = _nested_model(field.annotation)
        if nested is None:
            continue
        at = f"{where}.{name}" if where else name
        if isinstance(value[name], list):
            for i, item in enumerate(value[name]):
                _unknown_keys(nested, item, f"{at}[{i}]")
        else:
            _unknown_keys(nested, value[name], at)


def _nested_model(annotation: object) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]``, ``Optional[List[X]]``; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, typing.List):
        for arg in typing.get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
