"""The validated settings of ``amad serve`` (pydantic, unknown keys are errors), checked before Ray starts.

Two parts:

* :class:`ServeConfig` -- what the command line gives: the model URI, where to listen, replicas or
  autoscaling, batching, request limits. Validated in the driver; a bad value is one clear message.
* :class:`ReplicaSettings` -- the part every replica receives (model, tracking URI, limits, the
  token's hash). Batching and the model version travel separately as the Serve *user config*
  (:class:`UserConfig`), so changing them reconfigures live replicas in place (no restart, no dropped
  requests).
"""

from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))$")
TOKEN_ENV = "AMAD_SERVE_TOKEN"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Strict):
    """What a request may carry; past these it gets a 4xx naming the limit."""

    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="whole request body (413 above)")
    max_image_bytes: int = Field(1024 * 1024, ge=64, description="encoded image bytes after base64 decoding (413 above)")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height read from the image header (413 above)")
    max_question_chars: int = Field(512, ge=1, description="characters in the question (422 above)")
    max_top_k: int = Field(10, ge=1, description="largest top_k a client may ask for")
    max_num_beams: int = Field(4, ge=1, le=8, description="widest beam search a /v1/caption client may ask for")


class UserConfig(Strict):
    """Serve's ``user_config``: applied by ``reconfigure`` on live replicas."""

    # None: whatever the model URI names when the replica starts (an application built without a
    # registry at hand, e.g. ``serve build``); `amad serve` and `--write-config` always pin one.
    model_version: str | None = Field(None, pattern=r"^\d+$")
    max_batch_size: int = Field(16, ge=1, le=512)
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)


class ReplicaSettings(Strict):
    """The constructor argument of every replica (plain data: it is pickled into the Serve config)."""

    model_uri: str
    tracking_uri: str
    limits: Limits = Limits()
    token_sha256: str | None = None  # the token's hash, never the token itself: Serve's config is readable
    threads: int = Field(1, ge=1, le=256)
    batching: bool = True  # False: one ORT call per request (the benchmark's "batching off")
    cache_dir: str | None = None  # where each load downloads (then deletes) its files; see serving.model.cache_root


class AppArgs(Strict):
    """The one typed argument of :func:`serving.app.app_builder`: a Serve config's ``args``.

    What ``serve run serving.app:app_builder key=value ...`` or a config's ``import_path`` + ``args``
    give: the model, the registry, replicas or autoscaling, batching, request limits. The model
    *version* is not here: it travels in the deployment's ``user_config`` (:class:`UserConfig`), so a
    new version reconfigures live replicas instead of restarting them.
    """

    model: str = Field(description="models:/<name>@<alias> or models:/<name>/<version>")
    tracking_uri: str = Field(min_length=1, description="MLflow tracking/registry URI the replicas load from")
    replicas: int = Field(1, ge=1, le=64)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    replica_cpus: float = Field(1.0, gt=0, le=64)
    replica_gpus: float = Field(0.0, ge=0, le=16, description="GPUs per replica (ONNX Runtime's CUDA provider where > 0)")
    max_batch_size: int = Field(16, ge=1, le=512)
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    batching: bool = True
    limits: Limits = Limits()
    cache_dir: str | None = None  # replicas' download directory root (default: $AMAD_SERVE_CACHE, else the temp dir)
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the bearer token (never the token)")

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if not MODEL_URI.match(self.model):
            raise ValueError(f"model={self.model!r} must look like models:/<name>@<alias> or models:/<name>/<version>")
        if self.autoscale is not None:
            low, high = self.autoscale
            if low < 0 or high < 1 or low > high:
                raise ValueError(f"autoscale={low}:{high} needs 0 <= MIN <= MAX and MAX >= 1")
        return self

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op threads per replica: its whole CPUs, at least one."""
        return max(1, int(self.replica_cpus))

    def max_ongoing_requests(self) -> int:
        # Serve queues at most this many requests per replica; below max_batch_size no full batch can form.
        return max(2 * self.max_batch_size, 32)


class ServeConfig(AppArgs):
    """``amad serve``'s options: the application's arguments plus where Serve listens.

    The bearer token is not a field: it comes from ``$AMAD_SERVE_TOKEN`` and only its hash goes into
    the application (:meth:`app_args`).
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "amad"
    # Replicas answer HTTP themselves too (one hop instead of proxy + actor call; see serving.ingress).
    # Takes effect on a Ray cluster this command starts; a joined cluster keeps its own setting.
    direct_ingress: bool = True

    def app_args(self, token: str | None = None) -> AppArgs:
        """The application's argument: these settings with the token's hash."""
        fields = {name: getattr(self, name) for name in AppArgs.model_fields}
        return AppArgs(**{**fields, "token_sha256": token_hash(token) or self.token_sha256})


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> ``(name, alias, None)``; ``models:/name/3`` -> ``(name, None, "3")``."""
    match = MODEL_URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    return match["name"], match["alias"], match["version"]


def token_hash(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"1:4"`` -> ``(1, 4)``; ValueError otherwise."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--autoscale {text!r} must be MIN:MAX (two whole numbers)")
    return int(parts[0]), int(parts[1])


def format_errors(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
