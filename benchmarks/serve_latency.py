"""Ray Serve latency and throughput for the registered student, a teacher-sized model and a no-op ceiling.

Run from the repository root (a few minutes on 2 cores):

    .venv/bin/python benchmarks/serve_latency.py
    .venv/bin/python benchmarks/serve_latency.py --throughput-optimized   # RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    .venv/bin/python benchmarks/serve_latency.py --cluster-cpus 8 --replica-cpus 4   # a 16-core machine

**Models.** In a temporary MLflow store, ``amad export`` registers the default teacher
(``weights/teacher-default``) as ``bench-teacher`` and a randomly initialised default student (4
heads x 2 layers, head_dim 16, as ``benchmarks/inference.py``) as ``bench-student``: latency is
what matters here, not accuracy.

**Measurements, all in one run on one machine.** ``ort_p50_ms``: in-process
:meth:`serving.model.Predictor.predict` at batch 1 (PNG decode, tokenisation, ONNX Runtime -- the
same work a replica does per request). Then one local Ray cluster (loopback) with Serve's direct
ingress on (:mod:`serving.ingress`; ``--proxy-only`` leaves it off) offering ``--cluster-cpus`` CPUs
(default 2, this machine's; on a bigger one, CPUs the client here does not need), Serve on
127.0.0.1, one replica of ``--replica-cpus`` CPUs, and per app (deployed in turn), through each
path -- ``direct`` (the replica's own HTTP server, the headline figures) and ``proxy`` (Serve's proxy, keys suffixed
``_proxy``): HTTP p50/p99 at concurrency 1 (sequential requests) for the student, and throughput at
concurrency 32 (``--seconds`` each) for a no-op FastAPI deployment (the HTTP path's ceiling), a
*zero-cost model* (the student's request path -- JSON and base64 parsing, ``@serve.batch``, the
worker thread -- around a model that returns a fixed answer: what batching alone leaves of the
ceiling), the student and the teacher with batching on and off. The ratio the target is about
(student vs no-op, direct path) is measured ``--rounds`` times: after the first pass the no-op, the
zero-cost model and the batched student are deployed and measured again in turn, and their c32
figures are the medians of the rounds (each round's in ``c32_rounds``). The client is
:mod:`serving.loadtest` in this process (aiohttp), on the same cores.

Writes ``benchmarks/results/serve_latency.json`` (``ort_p50_ms``, ``http_p50_ms``, ``http_p99_ms``,
``rps_noop_c32``, ``rps_zero_model_c32``, ``rps_batched_c32``, ``rps_unbatched_c32``, ``teacher_rps_batched_c32``,
``teacher_rps_unbatched_c32``, plus the settings, load average, the ratios to the no-op and the
targets' verdicts).
"""

# No `from __future__ import annotations`: the no-op FastAPI route below must see a real `Request`
# annotation (as a string, FastAPI inside Serve takes `request` for a query parameter: every call a 422).
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.local_cluster import apply_loopback_env, free_port  # noqa: E402

apply_loopback_env()

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_latency.json"
TEACHER = ROOT / "weights" / "teacher-default"


def register_models(workdir: Path) -> str:
    """Export + register the teacher and a default-shaped student; returns the tracking URI."""
    from amad.data.text import TOKENIZER_FILE
    from amad.models import StudentSpec, ViltAdapter
    from pipeline import export, names
    from pipeline.config import parse_config
    from pipeline.export_config import ExportJobConfig

    teacher = ViltAdapter.load(TEACHER)
    student_dir = workdir / "student" / "epoch_0001"
    student = ViltAdapter.build(ViltAdapter.student_config(teacher.config, StudentSpec(heads=4, layers=2, head_dim=16)), seed=0)
    student.eval().save_pretrained(student_dir)
    for name in (TOKENIZER_FILE, names.BENCHMARK_FILE):
        shutil.copy(TEACHER / name, student_dir / name)
    uri = None
    for checkpoint, model in ((student_dir, "bench-student"), (TEACHER, "bench-teacher")):
        cfg = parse_config({"checkpoint": str(checkpoint), "latency_repeats": 5, "gates": {"parity_examples": 64},
                            "registry": {"student_model": model, "require_no_worse": False}}, ExportJobConfig, "bench")
        uri = export.main(cfg, workdir)["registry"]["tracking_uri"]
    return uri


def ort_p50(uri: str, model: str, examples, repeats: int) -> dict:
    import numpy as np

    from serving.model import open_predictor

    predictor = open_predictor(model, uri, threads=1)
    example = examples[0]
    for _ in range(10):
        predictor.predict([example.image_png], [example.question])
    times = []
    for i in range(repeats):
        e = examples[i % len(examples)]
        started = time.perf_counter()
        predictor.predict([e.image_png], [e.question])
        times.append((time.perf_counter() - started) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def noop_app():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Noop", max_ongoing_requests=64)
    @serve.ingress(api)
    class Noop:
        @api.post("/v1/answer")
        async def answer(self, request: Request):
            await request.body()
            return JSONResponse({"answer": "noop"})

    return Noop.bind()


def zero_model_app(max_batch_size: int, batch_wait_ms: float):
    """The student's request path with a model that costs nothing: what batching alone leaves of the ceiling.

    Like :class:`serving.app.AnswerService` it checks the content type and length, reads and parses
    the JSON body (base64 included), hands the parsed request to ``@serve.batch`` and runs the batch
    on a worker thread; the "model" there returns a fixed answer, so neither decoding, tokenising nor
    ONNX Runtime is paid. Its throughput bounds any model served this way on this machine.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from serving.app import error, read_body
    from serving.config import Limits
    from serving.inputs import BadInput, check_content_length, media_type, parse_json

    api = FastAPI()

    def fixed_answers(queries: list) -> list:
        return [{"answer": "yes", "score": 1.0, "top_k": [{"answer": "yes", "score": 1.0}][: q.top_k]} for q in queries]

    @serve.deployment(name="ZeroModel", max_ongoing_requests=64)
    @serve.ingress(api)
    class ZeroModel:
        def __init__(self):
            self.limits = Limits()
            self.executor = ThreadPoolExecutor(max_workers=1)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000)
        async def batched(self, queries: list) -> list:
            answers = await asyncio.get_running_loop().run_in_executor(self.executor, fixed_answers, queries)
            return [(answer, len(queries)) for answer in answers]

        @api.post("/v1/answer")
        async def answer(self, request: Request):
            started = time.perf_counter()
            try:
                check_content_length(request.headers.get("content-length"), self.limits)
                if media_type(request.headers.get("content-type")) != "application/json":
                    raise BadInput(415, "send application/json")
                query = parse_json(await read_body(request, self.limits.max_body_bytes), self.limits)
            except BadInput as err:
                return error(err)
            answer, batch_size = await self.batched(query)
            body = {**answer, "model": {"name": "zero", "version": "0"}, "latency_ms": (time.perf_counter() - started) * 1e3}
            return JSONResponse(body, headers={"X-Batch-Size": str(batch_size)})

    return ZeroModel.bind()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput measurement")
    parser.add_argument("--c1-requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3,
                        help="direct-ingress c32 windows of the no-op, zero-cost model and batched student, interleaved; medians reported")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--cluster-cpus", type=float, default=2.0,
                        help="CPUs the local Ray cluster offers (default: %(default)s); must hold the replica")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--proxy-only", action="store_true", help="measure only through Serve's proxy (no direct ingress)")
    parser.add_argument("--throughput-optimized", action="store_true", help="set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 before Ray starts")
    args = parser.parse_args(argv)
    if args.replica_cpus > args.cluster_cpus:
        parser.error(f"--replica-cpus {args.replica_cpus:g} does not fit --cluster-cpus {args.cluster_cpus:g}")
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    load_before = os.getloadavg()

    from serving import loadtest
    from serving.config import ServeConfig

    workdir = Path(tempfile.mkdtemp(prefix="amad-serve-bench-"))
    try:
        uri = register_models(workdir)
        examples = loadtest.test_examples(json.loads((TEACHER / "benchmark.json").read_text()), 200)
        bodies = [loadtest.json_body(e) for e in examples]
        ort = ort_p50(uri, "models:/bench-student@champion", examples, 300)
        ort_teacher = ort_p50(uri, "models:/bench-teacher@champion", examples, 100)
        print(f"in-process predict at batch 1: student p50 {ort['p50']:.2f} ms, teacher p50 {ort_teacher['p50']:.2f} ms", flush=True)

        from ray import serve

        from pipeline.local_cluster import local_cluster
        from serving.app import build
        from serving.ingress import enable_direct_ingress, replica_urls
        from serving.model import resolve_version

        results: dict = {}
        rounds: dict[str, list[float]] = {}  # c32 req/s per round, first path only
        paths = ["proxy"]
        if not args.proxy_only:
            enable_direct_ingress()
            paths.insert(0, "direct")
        with local_cluster(nodes=1, num_cpus=args.cluster_cpus, prefix="amad-serve-bench-"):
            port = free_port()
            proxy_url = f"http://127.0.0.1:{port}/v1/answer"
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})

            def measure(app, label: str, c1: bool = False, again: bool = False) -> None:
                """c32 (and c1) through every path; ``again``: one more c32 window, first path only."""
                serve.run(app, name="bench", route_prefix="/", blocking=False)
                direct = replica_urls("bench", port)
                if "direct" in paths and not direct:
                    raise RuntimeError("direct ingress is on but Serve lists no replica port")
                for path in paths[:1] if again else paths:
                    url = direct[0] + "/v1/answer" if path == "direct" else proxy_url
                    key = label if path == paths[0] else f"{label}_{path}"
                    loadtest.run(url, 8, 100, bodies=bodies)  # warm-up
                    if c1 and not again:
                        results[f"{key}_c1"] = loadtest.run(url, 1, args.c1_requests, bodies=bodies)
                    c32 = loadtest.run(url, 32, 100_000, duration_s=args.seconds, bodies=bodies)
                    if path == paths[0]:
                        rounds.setdefault(label, []).append(c32["throughput_rps"])
                    if not again:
                        results[f"{key}_c32"] = c32
                    line = f"{label} ({path}){' again' if again else ''}: c32 {c32['throughput_rps']:.1f} req/s"
                    if c1 and not again:
                        line += f", c1 p50 {results[f'{key}_c1']['p50_ms']:.2f} ms p99 {results[f'{key}_c1']['p99_ms']:.2f} ms"
                    print(line + f", mean batch {c32['mean_batch_size']}", flush=True)
                serve.delete("bench")

            def app(model: str, batching: bool):
                cfg = ServeConfig(model=model, tracking_uri=uri, replica_cpus=args.replica_cpus, batching=batching,
                                  max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms)
                return build(cfg, resolve_version(model, uri)[1])

            measure(noop_app(), "noop", c1=True)
            measure(zero_model_app(args.max_batch_size, args.batch_wait_ms), "zero_model")
            measure(app("models:/bench-student@champion", True), "student_batched", c1=True)
            measure(app("models:/bench-student@champion", False), "student_unbatched", c1=True)
            measure(app("models:/bench-teacher@champion", True), "teacher_batched")
            measure(app("models:/bench-teacher@champion", False), "teacher_unbatched")
            for _ in range(args.rounds - 1):  # later rounds of the ratio that matters, interleaved
                measure(noop_app(), "noop", again=True)
                measure(zero_model_app(args.max_batch_size, args.batch_wait_ms), "zero_model", again=True)
                measure(app("models:/bench-student@champion", True), "student_batched", again=True)
            serve.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    out = {
        "ort_p50_ms": ort["p50"],
        "http_p50_ms": results["student_batched_c1"]["p50_ms"],
        "http_p99_ms": results["student_batched_c1"]["p99_ms"],
        "rps_noop_c32": statistics.median(rounds["noop"]),
        "rps_batched_c32": statistics.median(rounds["student_batched"]),
        "rps_unbatched_c32": results["student_unbatched_c32"]["throughput_rps"],
        "teacher_rps_batched_c32": results["teacher_batched_c32"]["throughput_rps"],
        "teacher_rps_unbatched_c32": results["teacher_unbatched_c32"]["throughput_rps"],
        "rps_zero_model_c32": statistics.median(rounds["zero_model"]),
        "c32_rounds": rounds,
        "ort_teacher_p50_ms": ort_teacher["p50"],
        "http_p50_ms_unbatched": results["student_unbatched_c1"]["p50_ms"],
        "http_p50_ms_noop": results["noop_c1"]["p50_ms"],
        "path": paths[0],
        "proxy": {key: results[f"{label}_proxy_{kind}"][field] for key, label, kind, field in (
            ("http_p50_ms", "student_batched", "c1", "p50_ms"), ("http_p99_ms", "student_batched", "c1", "p99_ms"),
            ("http_p50_ms_noop", "noop", "c1", "p50_ms"), ("rps_noop_c32", "noop", "c32", "throughput_rps"),
            ("rps_zero_model_c32", "zero_model", "c32", "throughput_rps"),
            ("rps_batched_c32", "student_batched", "c32", "throughput_rps"),
            ("rps_unbatched_c32", "student_unbatched", "c32", "throughput_rps"),
            ("teacher_rps_batched_c32", "teacher_batched", "c32", "throughput_rps"),
            ("teacher_rps_unbatched_c32", "teacher_unbatched", "c32", "throughput_rps"))} if len(paths) > 1 else None,
        "details": results,
        "settings": {"rounds": args.rounds, "replica_cpus": args.replica_cpus, "cluster_cpus": args.cluster_cpus, "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                     "seconds": args.seconds, "throughput_optimized": args.throughput_optimized, "replicas": 1,
                     "paths": paths},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    out["targets"] = {
        "http_minus_ort_p50_le_5ms": out["http_p50_ms"] - out["ort_p50_ms"] <= 5,
        "student_c32_ge_0.8x_noop": out["rps_batched_c32"] >= 0.8 * out["rps_noop_c32"],
        "teacher_batching_gain_ge_1.5x": out["teacher_rps_batched_c32"] >= 1.5 * out["teacher_rps_unbatched_c32"],
        "student_batching_never_loses": out["rps_batched_c32"] >= out["rps_unbatched_c32"],
    }
    print(f"\n| figure | {paths[0]} |" + (" proxy |" if out["proxy"] else "") + "\n| --- | --- |" + (" --- |" if out["proxy"] else ""))
    out["ratios"] = {"student_batched_vs_noop": out["rps_batched_c32"] / out["rps_noop_c32"],
                     "zero_model_vs_noop": out["rps_zero_model_c32"] / out["rps_noop_c32"]}
    for key in ("ort_p50_ms", "http_p50_ms", "http_p99_ms", "http_p50_ms_noop", "rps_noop_c32", "rps_zero_model_c32", "rps_batched_c32",
                "rps_unbatched_c32", "teacher_rps_batched_c32", "teacher_rps_unbatched_c32"):
        proxy = out["proxy"] and out["proxy"].get(key)
        print(f"| {key} | {out[key]:.2f} |" + (f" {proxy:.2f} |" if proxy else (" |" if out["proxy"] else "")))
    print("ratios to the no-op:", json.dumps({k: round(v, 3) for k, v in out["ratios"].items()}))
    print("targets:", json.dumps(out["targets"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
