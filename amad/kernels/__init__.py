"""Native CPU kernels for AMAD, compiled on first use; the losses fall back to PyTorch without them.

The KL form of AMAD touches every element of the teacher's ``(B, Ht, Q, K)`` maps several times
and takes a logarithm of each; as a chain of PyTorch ops it made a training step ~1.37x a logit-KD
step on CPU. ``amad_kl.c`` fuses the whole loss (cosines, alignment softmax, mixture, KL) and its
gradient into one sweep per batch element (see the notes at its top): 3-4x faster per mapped
layer, ~1.09x a logit-KD step (``benchmarks/loss_overhead.py``).

It is compiled once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``;
about a second) into a cache directory, and loaded with :mod:`ctypes`, so no build step, headers
or ``ninja`` are needed. Where no compiler works, :func:`library` returns None, the reason is
logged once, and :mod:`amad.losses` uses its PyTorch implementation (same values to float32
rounding). Environment:

* ``AMAD_NATIVE_KERNELS=0`` turns the kernels off (the PyTorch path everywhere).
* ``AMAD_KERNEL_CFLAGS="-O3 -march=x86-64-v3 -fopenmp"`` replaces the flags tried (by default
  ``FLAG_SETS`` in order: ``-march=native`` and OpenMP first, then without them).
* ``AMAD_KERNEL_CACHE=DIR`` sets the cache directory (default ``$XDG_CACHE_HOME/amad-pipeline/
  kernels``, i.e. ``~/.cache/...``; a temporary directory when that is not writable).

Threads: the library is built with OpenMP where the compiler supports it. On Linux PyTorch ships
its own ``libgomp.so.1`` and has loaded it by the time this runs, so the kernels resolve to that
same runtime and share PyTorch's thread pool (two OpenMP runtimes would spin against each other).
If loading the library brings in a second OpenMP runtime, the kernels run single-threaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["NativeKernels", "disabled", "library", "unavailable_reason"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("amad_kl.c")
ABI = 3  # amad_kernels_abi() of the source this module can call
# Tried in order; the first that compiles wins. -march=native: the cache key includes the CPU's
# feature flags, so a cache shared between different machines never loads a foreign build.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp-simd"),
    ("-O3", "-fopenmp-simd"),
    ("-O3",),
)
COMMON_FLAGS = ("-shared", "-fPIC", "-std=c11", "-fno-math-errno", "-ffp-contract=fast")

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "amad_kernels_abi": ([], _INT),
    "amad_kernels_openmp": ([], _INT),
    "amad_log_array": ([_P, _P, _I64], None),
    # T, S, valid, B, Ht, Hs, Q, K, tau, eps, limit, loss, a, w, nt, sq_s, grad_s, detach, status,
    # nthreads
    "amad_kl_forward": ([_P, _P, _P] + [_I64] * 5 + [_F] * 3 + [_P] * 6 + [_INT, _P, _INT], None),
    # T, S, valid, B, Ht, Hs, Q, K, tau, eps, a, w, nt, sq_s, g, detach, grad_s, nthreads
    "amad_kl_backward": ([_P, _P, _P] + [_I64] * 5 + [_F] * 2 + [_P] * 5 + [_INT, _P, _INT], _INT),
}


class NativeKernels:
    """The loaded library. ``threaded``: False when calls must stay single-threaded."""

    def __init__(self, lib: ctypes.CDLL, threaded: bool, path: Path):
        self.lib, self.threaded, self.path = lib, threaded, path
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res

    def threads(self) -> int:
        """OpenMP threads for one call: PyTorch's intra-op thread count, or 1."""
        return torch.get_num_threads() if self.threaded else 1


_lock = threading.Lock()
_state: dict[str, object] = {}
_disabled_depth = 0


def library() -> NativeKernels | None:
    """The kernels, building them on first call; None when disabled or unavailable."""
    return None if _disabled_depth else _loaded()


def _loaded() -> NativeKernels | None:
    if "result" not in _state:
        with _lock:
            if "result" not in _state:
                _state["result"], _state["reason"] = _load()
                if _state["reason"]:
                    log.warning("AMAD native kernels unavailable, using PyTorch ops: %s", _state["reason"])
    return _state["result"]  # type: ignore[return-value]


@contextlib.contextmanager
def disabled():
    """Within the block :func:`library` returns None, so the PyTorch implementations run (for
    benchmarks and tests that compare the two). Process-wide, not per thread."""
    global _disabled_depth
    with _lock:
        _disabled_depth += 1
    try:
        yield
    finally:
        with _lock:
            _disabled_depth -= 1


def unavailable_reason() -> str | None:
    """Why the kernels could not be built or loaded (None when they were, or were turned off by
    ``AMAD_NATIVE_KERNELS=0``)."""
    _loaded()
    return _state["reason"]  # type: ignore[return-value]


def _load() -> tuple[NativeKernels | None, str | None]:
    if os.environ.get("AMAD_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, None  # asked for: not worth a warning
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    errors = []
    configured = os.environ.get("AMAD_KERNEL_CFLAGS", "").split()
    for flags in [tuple(configured)] if configured else FLAG_SETS:
        try:
            path = _build(compiler, flags)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
            continue
        before = _openmp_runtimes()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            errors.append(f"{' '.join(flags)}: cannot load {path}: {exc}")
            continue
        if lib.amad_kernels_abi() != ABI:
            return None, f"{path} has ABI {lib.amad_kernels_abi()}, expected {ABI}"
        # A second OpenMP runtime would fight PyTorch's for the cores: then stay on one thread.
        threaded = bool(lib.amad_kernels_openmp()) and before is not None and _openmp_runtimes() == before
        return NativeKernels(lib, threaded, path), None
    return None, f"{compiler} could not build {SOURCE.name}: " + "; ".join(errors)


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cache_dir() -> Path:
    configured = os.environ.get("AMAD_KERNEL_CACHE")
    if configured:
        root = Path(configured)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amad-pipeline" / "kernels"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, delete=True)
        probe.close()
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"amad-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """Compile (or find in the cache) the library for these flags; returns its path."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(
            x.encode() if isinstance(x, str) else x
            for x in (source, compiler, version, " ".join(flags + COMMON_FLAGS), platform.machine(), _cpu_features())
        )
    ).hexdigest()[:20]
    target = _cache_dir() / f"amad_kl-{key}.so"
    if target.is_file():
        return target
    # Build beside the target and rename: concurrent builders (Ray workers) never see half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, *COMMON_FLAGS, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip() or f"exit status {result.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_features() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _openmp_runtimes() -> frozenset[str] | None:
    """Paths of the OpenMP runtimes mapped into this process; None where that cannot be seen."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "omp" in ln.rsplit("/", 1)[-1]}
    except OSError:
        return None
    return frozenset(p for p in paths if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp")))
