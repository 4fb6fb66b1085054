"""The machine and software a benchmark ran on, recorded next to its figures in the results JSON."""

from __future__ import annotations

import os
import platform
import time


def run_facts(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict:
    """Load averages (1/5/15 min, from ``os.getloadavg()``) around the run, CPU count and versions.

    The load averages say how busy the shared machine was: figures from a loaded run are not comparable."""
    import ray
    import torch

    return {
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
