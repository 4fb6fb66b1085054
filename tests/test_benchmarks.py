"""Smoke tests for the scripts in benchmarks/: they run end to end and write well-formed results.

No timing is asserted: these run on shared, noisy machines.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_loss_overhead_quick_run_writes_complete_results(tmp_path):
    loss_overhead = load_script("loss_overhead")
    out = tmp_path / "x.json"
    threads = torch.get_num_threads()
    try:
        returned = loss_overhead.main(["--quick", "--out", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count

    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    for key in ("step_ms", "step_ms_p10", "step_ms_p90", "ratio_amad_vs_logit_kd", "memory", "config",
                "target", "meets_target"):
        assert key in results, key

    methods = set(loss_overhead.METHODS)
    assert methods == {"task", "logit_kd", "amad", "one_to_one", "head_mean", "relation"}
    for key in ("step_ms", "step_ms_p10", "step_ms_p90"):
        assert set(results[key]) == methods, key
        for method, value in results[key].items():
            assert positive_finite(value), (key, method, value)
    for method in methods:  # order statistics of the same samples
        assert results["step_ms_p10"][method] <= results["step_ms"][method] <= results["step_ms_p90"][method]

    ratio = results["ratio_amad_vs_logit_kd"]
    assert positive_finite(ratio)
    assert math.isclose(ratio, results["step_ms"]["amad"] / results["step_ms"]["logit_kd"])
    assert results["meets_target"] is (ratio <= 1.10)
    assert results["target"] == "amad step <= 1.10 x logit_kd step"

    memory = results["memory"]
    assert positive_finite(memory["input_bytes"])
    for phase in ("forward_no_grad", "forward", "forward_backward"):
        for key in ("peak_extra_bytes", "ratio", "tensor_peak_extra_bytes", "tensor_ratio"):
            assert positive_finite(memory[phase][key]), (phase, key)
    # The student maps of the memory measurement have the shape the run used.
    config = results["config"]
    assert memory["shapes"]["student"] == [config["batch_size"], config["student"]["heads"],
                                           config["teacher"]["tokens"], config["teacher"]["tokens"]]
    assert config["threads"] == 1 and config["quick"] is True
    assert config["torch"] == torch.__version__
