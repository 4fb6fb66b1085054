"""The Ray Serve application: a FastAPI ingress over :class:`serving.model.Predictor` with dynamic batching.

Routes (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

* ``POST /v1/answer`` -- JSON ``{"image": <base64 PNG/JPEG>, "question": str, "top_k": int?}`` or a
  multipart form (an ``image`` file, a ``question`` field, optionally ``top_k``) ->
  ``{"answer", "score", "top_k": [{"answer", "score"}], "model": {"name", "version"}, "latency_ms"}``.
  The response header ``X-Batch-Size`` says how many requests shared the ONNX Runtime call.
* ``POST /v1/caption`` -- JSON ``{"image": <base64 PNG/JPEG>, "max_length": int?, "num_beams": int?}`` or a
  multipart form (an ``image`` file, optionally ``max_length`` and ``num_beams`` fields) ->
  ``{"caption", "tokens", "model": {"name", "version"}, "latency_ms"}``, where the served model is a
  captioner (``amad-captioner``, :mod:`serving.captioning`). One batch is one encoder call, then a greedy
  decoding loop that retires rows as they end (beam-search requests decode per beam width). Each service
  serves one model: the other route answers 404 naming the route to use.
* ``GET /healthz``; ``GET /v1/model`` (name, version, alias, kind, route, heads, layers, labels or
  caption settings, parity figures).
* ``GET /`` -- the browser demo page (:mod:`serving.demo_page`), which uses ``GET /v1/examples`` (the
  model's first test-split questions, images as base64 PNG) and ``POST /v1/answer`` like any client.

Every route counts its answers by status class in the service's Prometheus metrics (:mod:`serving.metrics`),
with the batch sizes, the ONNX Runtime time per batch and the served version.

Every request is parsed and validated on its own (a bad one gets a 4xx JSON ``{"error", "status"}``
and never reaches a batch); only prepared inputs are batched (``@serve.batch``), and only under load:
a request that finds no other one of its replica waiting runs at once rather than waiting
``batch_wait_ms`` for a batch to form. The ONNX Runtime call runs on one worker thread per replica, so the replica's event loop keeps parsing requests (and
the next batch keeps filling) while the model runs.

Champion changes: the model version is part of the Serve *user config*. :func:`deploy` resolves the
alias to a version and (re)deploys; when only the user config changed Serve calls ``reconfigure`` on
the live replicas, which load the new version beside the old one and swap it in between batches:
requests in flight finish on the old session, none is dropped, no replica restarts.

That needs a fixed code version. Serve restarts replicas whenever the deployment's code version
changes, and an imperative ``serve.run`` draws a random one each time (Ray 2.60:
``ServeControllerClient.deploy_applications`` uses ``deployment._version or get_random_string()``; the
public ``version=`` option was removed). :func:`build` pins it to a digest of what a replica is made
of -- its constructor settings, its actor options and the source of the code it runs -- through the
``_internal`` form of ``Deployment.options``. Serve does not compare constructor arguments itself, so
the settings must be in the digest: a new token or limit then restarts the replicas, a new model
version does not. ``GET /v1/model`` reports the replica's process id, which the tests watch.
"""

# No `from __future__ import annotations` here: Serve re-wraps the ingress methods, and FastAPI then
# cannot resolve a string annotation "Request" -- it would take `request` for a required query parameter.
import asyncio
import hashlib
import hmac
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from serving.config import AppArgs, ReplicaSettings, ServeConfig, UserConfig
from serving.demo_page import PAGE
from serving.model import ANSWERER, CAPTIONER, ROUTES
from serving.metrics import ServiceMetrics
from serving.inputs import (JSON_TYPE, MULTIPART_TYPE, BadInput, check_content_length, media_type, parse_caption_json,
                            parse_caption_multipart, parse_json, parse_multipart)

api = FastAPI(
    title="amad serve",
    description="Visual question answering with the distilled student from the MLflow Model Registry.",
    version="1",
)

ANSWER_BODY = {
    "required": True,
    "content": {
        JSON_TYPE: {"schema": {
            "type": "object", "additionalProperties": False, "required": ["image", "question"],
            "properties": {
                "image": {"type": "string", "format": "byte", "description": "base64 PNG/JPEG"},
                "question": {"type": "string", "minLength": 1},
                "top_k": {"type": "integer", "minimum": 1, "default": 1},
            },
        }},
        MULTIPART_TYPE: {"schema": {
            "type": "object", "required": ["image", "question"],
            "properties": {"image": {"type": "string", "format": "binary"}, "question": {"type": "string"},
                           "top_k": {"type": "integer", "minimum": 1, "default": 1}},
        }},
    },
}


CAPTION_BODY = {
    "required": True,
    "content": {
        JSON_TYPE: {"schema": {
            "type": "object", "additionalProperties": False, "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "byte", "description": "base64 PNG/JPEG"},
                "max_length": {"type": "integer", "minimum": 2, "description": "tokens at most, the start and end tokens included "
                                                                            "(default and most: the model's longest caption)"},
                "num_beams": {"type": "integer", "minimum": 1, "default": 1, "description": "1: greedy; more: beam search"},
            },
        }},
        MULTIPART_TYPE: {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}, "max_length": {"type": "integer", "minimum": 2},
                           "num_beams": {"type": "integer", "minimum": 1, "default": 1}},
        }},
    },
}


def error(err: BadInput) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 past it, also for bodies without a Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="AnswerService", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class AnswerService:
    """One replica: the model loaded in ``__init__``, batches of prepared requests answered on a worker thread."""

    def __init__(self, settings: dict):
        from serving.model import open_predictor

        self.settings = ReplicaSettings.model_validate(settings)
        self._open_predictor = open_predictor
        self.metrics = ServiceMetrics()  # Prometheus, through Ray's metrics agent: serving/metrics.py
        # What the URI names now; reconfigure (called right after, with the user config) pins the version
        # the driver resolved -- normally the same one, so nothing is loaded twice. The version is not a
        # constructor argument: a changed argument would make Serve restart replicas instead of reconfiguring.
        self.predictor = self._open(None)
        self.metrics.serving(self.predictor.bundle.name, self.predictor.bundle.version)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self._waiting = 0  # prepared requests of this replica waiting for an answer
        self._examples: dict[str, list] = {}  # model version -> the demo page's built-in examples

    def _open(self, version: str | None):
        return self._open_predictor(self.settings.model_uri, self.settings.tracking_uri, version, cache_dir=self.settings.cache_dir,
                                    threads=self.settings.threads, limits=self.settings.limits)

    def reconfigure(self, user_config: dict) -> None:
        """Batching knobs and the model version; a new version is loaded first, then swapped in."""
        config = UserConfig.model_validate(user_config)
        for batched in (self._batched, self._batched_captions):
            batched.set_max_batch_size(config.max_batch_size)
            batched.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        if config.model_version is not None and config.model_version != self.predictor.bundle.version:
            self.predictor = self._open(config.model_version)
            self.metrics.serving(self.predictor.bundle.name, self.predictor.bundle.version)

    def check_health(self) -> None:
        if self.predictor.session is None:  # pragma: no cover -- a replica whose model is gone is replaced
            raise RuntimeError("no ONNX Runtime session")
        # Ray drops a gauge's series a few export intervals after its last set(): the controller's health
        # check (every health_check_period_s) keeps the version visible on an idle replica.
        self.metrics.serving(self.predictor.bundle.name, self.predictor.bundle.version)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list) -> list:
        """``items``: prepared requests -> ``(Answer, batch size)`` each, from one ORT call."""
        predictor = self.predictor  # a reconfigure during the call swaps the attribute, not this batch's model
        answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_answer, predictor, items)
        return [(answer, len(items), predictor) for answer in answers]

    async def _single(self, item) -> tuple:
        predictor = self.predictor
        answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_answer, predictor, [item])
        return answers[0], 1, predictor

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched_captions(self, items: list) -> list:
        """``items``: prepared caption requests -> ``(Caption, batch size, predictor)`` each, from one batched decode."""
        predictor = self.predictor
        captions = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_answer, predictor, items)
        return [(caption, len(items), predictor) for caption in captions]

    def _timed_answer(self, predictor, items: list) -> list:
        """On the worker thread: the ONNX Runtime calls of one batch (answers, or captions from a captioner), its
        size and time recorded (not the wait for the thread)."""
        started = time.perf_counter()
        answers = predictor.caption(items) if predictor.kind == CAPTIONER else predictor.answer(items)
        self.metrics.batch(len(items), time.perf_counter() - started)
        self.metrics.serving(predictor.bundle.name, predictor.bundle.version)  # refreshed under traffic too (see check_health)
        return answers

    def _authorised(self, request: Request) -> bool:
        if not self.settings.token_sha256:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.settings.token_sha256)

    @api.post("/v1/answer", openapi_extra={"requestBody": ANSWER_BODY}, summary="Answer a question about an image")
    async def answer(self, request: Request):
        response = await self._answer(request)
        self.metrics.request("/v1/answer", response.status_code)
        return response

    async def _query(self, request: Request, route: str, parse_json_body, parse_form):
        """Authorise, size-check and parse one POST to ``route``: the parsed query, or BadInput (4xx)."""
        limits = self.settings.limits
        if not self._authorised(request):
            raise BadInput(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        served = ROUTES[self.predictor.kind]
        if served != route:
            raise BadInput(404, f"this service serves {self.predictor.bundle.name} v{self.predictor.bundle.version}, "
                                f"a {self.predictor.kind}: POST {served} instead of {route}")
        check_content_length(request.headers.get("content-length"), limits)
        kind = media_type(request.headers.get("content-type"))
        if kind not in (JSON_TYPE, MULTIPART_TYPE):
            raise BadInput(415, f"content type {kind or '(none)'!r} is not supported; send {JSON_TYPE} or {MULTIPART_TYPE}")
        body = await read_body(request, limits.max_body_bytes)
        if kind == JSON_TYPE:
            return parse_json_body(body, limits)
        request._body = body  # Starlette's form parser reads a cached body (already size-checked) from here
        try:
            form = await request.form(max_files=4, max_fields=8, max_part_size=limits.max_body_bytes)
        except Exception as err:  # noqa: BLE001 -- Starlette raises its own types for malformed forms
            raise BadInput(400, f"malformed multipart body: {err}") from None
        return await parse_form(form, limits)

    async def _run(self, prepared, batched, single):
        """``(result, batch size, predictor)`` of one prepared request: batched only under load (a request that
        finds nothing else waiting runs at once instead of waiting batch_wait_ms for company that is not coming)."""
        run = batched if self.settings.batching and self._waiting else single
        self._waiting += 1
        try:
            return await run(prepared)
        finally:
            self._waiting -= 1

    async def _answer(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            query = await self._query(request, ROUTES[ANSWERER], parse_json, parse_multipart)
            prepared = self.predictor.prepare(query.image, query.question, query.top_k)
        except BadInput as err:
            return error(err)
        try:
            result, batch_size, predictor = await self._run(prepared, self._batched, self._single)
        except Exception as err:  # noqa: BLE001 -- a model failure is a JSON 500; the replica keeps serving
            return JSONResponse({"error": f"inference failed: {type(err).__name__}: {err}", "status": 500}, status_code=500)
        body = {
            "answer": result.answer,
            "score": result.score,
            "top_k": [{"answer": a, "score": s} for a, s in result.top_k],
            "model": {"name": predictor.bundle.name, "version": predictor.bundle.version},
            "latency_ms": (time.perf_counter() - started) * 1e3,
        }
        return JSONResponse(body, headers={"X-Batch-Size": str(batch_size)})

    @api.post("/v1/caption", openapi_extra={"requestBody": CAPTION_BODY}, summary="Caption an image")
    async def caption(self, request: Request):
        response = await self._caption(request)
        self.metrics.request("/v1/caption", response.status_code)
        return response

    async def _caption(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            query = await self._query(request, ROUTES[CAPTIONER], parse_caption_json, parse_caption_multipart)
            prepared = self.predictor.prepare(query.image, query.max_length, query.num_beams)
        except BadInput as err:
            return error(err)
        try:
            result, batch_size, predictor = await self._run(prepared, self._batched_captions, self._single)
        except Exception as err:  # noqa: BLE001 -- a model failure is a JSON 500; the replica keeps serving
            return JSONResponse({"error": f"captioning failed: {type(err).__name__}: {err}", "status": 500}, status_code=500)
        body = {"caption": result.caption, "tokens": result.tokens,
                "model": {"name": predictor.bundle.name, "version": predictor.bundle.version},
                "latency_ms": (time.perf_counter() - started) * 1e3}
        return JSONResponse(body, headers={"X-Batch-Size": str(batch_size)})

    @api.get("/", summary="The browser demo page", response_class=HTMLResponse)
    async def demo_page(self):
        self.metrics.request("/", 200)
        return HTMLResponse(PAGE)

    @api.get("/v1/examples", summary="Test-split examples of the served model's data, for the demo page")
    async def examples(self, count: int = 8):
        """``{"examples": [{"image": <base64 PNG>, "question", "expected"}]}``: the first ``count`` (1..16)
        questions of the model's test data (:func:`serving.loadtest.test_examples`); 404 where the
        replica cannot read that data (a model trained on VQA-v2 files kept elsewhere)."""
        response = await self._examples_response(count)
        self.metrics.request("/v1/examples", response.status_code)
        return response

    async def _examples_response(self, count: int) -> JSONResponse:
        import base64

        from serving.loadtest import caption_examples, test_examples

        if not 1 <= count <= 16:
            return error(BadInput(422, f"count must be between 1 and 16, got {count}"))
        predictor = self.predictor
        if predictor.bundle.version not in self._examples:
            make = caption_examples if predictor.kind == CAPTIONER else test_examples
            try:
                found = await asyncio.get_running_loop().run_in_executor(self._executor, make, predictor.bundle.benchmark(), 16)
            except (OSError, KeyError, TypeError, ValueError) as err:
                return error(BadInput(404, f"no built-in examples for {predictor.bundle.name} v{predictor.bundle.version}: "
                                           f"its test data cannot be read here ({type(err).__name__}: {err})"))
            # a captioner's examples: an image and one of its reference captions (no question)
            self._examples[predictor.bundle.version] = [
                {"image": base64.b64encode(e.image_png).decode(), **({"question": e.question} if e.question else {}), "expected": e.answer}
                for e in found]
        return JSONResponse({"examples": self._examples[predictor.bundle.version][:count],
                             "model": {"name": predictor.bundle.name, "version": predictor.bundle.version}})

    @api.get("/healthz", summary="Liveness")
    async def healthz(self):
        self.metrics.request("/healthz", 200)
        return {"status": "ok", "model": {"name": self.predictor.bundle.name, "version": self.predictor.bundle.version},
                "replica": {"pid": os.getpid()}}

    @api.get("/v1/model", summary="The model being served")
    async def model(self):
        self.metrics.request("/v1/model", 200)
        return {**self.predictor.describe(), "replica": {"pid": os.getpid()}}


def deployment_options(args: AppArgs, version: str | None) -> dict:
    """The Serve deployment options of ``AnswerService`` for ``args`` serving ``version``.

    The same dict goes into :func:`build` and into a written Serve config's ``deployments[0]``
    (:mod:`serving.deploy_config`), so the two cannot drift.
    """
    user_config = UserConfig(model_version=version, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
    actor = {"num_cpus": args.replica_cpus}
    if args.replica_gpus:
        actor["num_gpus"] = args.replica_gpus
    options = {"user_config": user_config.model_dump(mode="json"), "max_ongoing_requests": args.max_ongoing_requests(),
               "ray_actor_options": actor}
    if args.autoscale:
        low, high = args.autoscale
        options["autoscaling_config"] = {"min_replicas": low, "initial_replicas": max(low, 1), "max_replicas": high,
                                         "target_ongoing_requests": max(2, args.max_batch_size)}
    else:
        options["num_replicas"] = args.replicas
    return options


def replica_settings(args: AppArgs) -> dict:
    """The constructor argument every replica gets (plain JSON data)."""
    settings = ReplicaSettings(model_uri=args.model, tracking_uri=args.tracking_uri, limits=args.limits,
                               token_sha256=args.token_sha256, threads=args.threads, batching=args.batching,
                               cache_dir=args.cache_dir)
    return settings.model_dump(mode="json")


def build(args: AppArgs, version: str | None):
    """The bound application for ``args`` serving ``version`` (None: what the URI names when a replica starts)."""
    options = deployment_options(args, version)
    init = replica_settings(args)
    deployment = AnswerService.options(**options)
    # See the module docstring: without a fixed code version every deploy restarts the replicas.
    deployment = deployment.options(version=code_version(init, options["ray_actor_options"]), _internal=True)
    return deployment.bind(init)


def app_builder(args: AppArgs):
    """The application builder for ``serve run serving.app:app_builder key=value ...`` and a Serve config's
    ``import_path: serving.app:app_builder`` + ``args`` (validated as :class:`AppArgs`; unknown keys are errors).

    The version the model URI names now goes into the default user config; a config's own
    ``deployments[].user_config`` (which ``amad serve --write-config`` fills with the resolved version)
    takes precedence. Runs where Serve builds the application, so the registry must be reachable there.
    """
    from serving.model import resolve_version

    if not isinstance(args, AppArgs):  # a plain dict when called directly rather than by Serve
        args = AppArgs.model_validate(args)
    _, version, _, _ = resolve_version(args.model, args.tracking_uri)
    return build(args, version)


def default_args() -> AppArgs:
    """The module-level application's arguments: ``$AMAD_SERVE_MODEL`` (default the champion) and
    ``$MLFLOW_TRACKING_URI`` (default the main job's store, ``sqlite:///runs/sweep/mlflow.db``)."""
    return AppArgs(model=os.environ.get("AMAD_SERVE_MODEL", "models:/amad-student@champion"),
                   tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/sweep/mlflow.db"))


def code_version(init: dict, ray_actor_options: dict) -> str:
    """A digest of what a replica is made of: constructor settings, actor options, the source it runs."""
    digest = hashlib.sha256(json.dumps({"init": init, "actor": ray_actor_options}, sort_keys=True).encode())
    digest.update(source_digest().encode())
    return digest.hexdigest()[:20]


def source_digest() -> str:
    """SHA-256 over the Python sources of the packages a replica runs (``serving``, ``amad``, and ``pipeline``,
    whose ONNX decoding a captioner's replica runs)."""
    from pathlib import Path

    import amad
    import pipeline
    import serving

    digest = hashlib.sha256()
    for package in (serving, amad, pipeline):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def deploy(cfg: ServeConfig, token: str | None = None) -> str:
    """Resolve ``cfg.model`` to a version and deploy it (again); returns the version.

    Calling it again after the alias moved changes only the user config: Serve reconfigures the
    running replicas in place (see the module docstring)."""
    from serving.model import resolve_version

    _, version, _, _ = resolve_version(cfg.model, cfg.tracking_uri)
    serve.run(build(cfg.app_args(token), version), name=cfg.app_name, route_prefix="/", blocking=False)
    return version


# For `serve build serving.app:app`: built from the environment without touching the registry (the
# version is left to the replicas, see UserConfig). A written config (`amad serve --write-config`)
# pins the version instead, which is what makes a champion change a Serve config change.
app = build(default_args(), None)
