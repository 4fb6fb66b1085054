"""Smoke tests for the scripts in benchmarks/: they run end to end and write well-formed results.

No timing is asserted: these run on shared, noisy machines.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amad.data.scenes import QUESTION_TYPES

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
    assert methods == {"task", "logit_kd", "amad", "amad_pytorch", "one_to_one", "head_mean", "relation"}
    for summary in (results, results["default_allocator"]):  # --allocator both: two timed passes
        for key in ("step_ms", "step_ms_p10", "step_ms_p90"):
            assert set(summary[key]) == methods, key
            for method, value in summary[key].items():
                assert positive_finite(value), (key, method, value)
    assert positive_finite(results["default_allocator"]["ratio_amad_vs_logit_kd"])
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
    assert config["allocator"]  # what retain_freed_memory did (or why not)
    native = config["native_kernels"]
    if native["library"] is None:  # then it says why, unless it was turned off on purpose
        assert native["unavailable_reason"] or os.environ.get("AMAD_NATIVE_KERNELS") == "0"


def test_loss_overhead_methods_subset_and_default_allocator(tmp_path):
    loss_overhead = load_script("loss_overhead")
    out = tmp_path / "x.json"
    threads = torch.get_num_threads()
    try:
        results = loss_overhead.main(
            ["--quick", "--out", str(out), "--threads", "1", "--methods", "amad_pytorch", "--allocator", "default"]
        )
    finally:
        torch.set_num_threads(threads)
    assert set(results["step_ms"]) == {"logit_kd", "amad", "amad_pytorch"}
    assert results["default_allocator"] is None and results["config"]["allocator"] == "glibc defaults"
    with pytest.raises(SystemExit):
        loss_overhead.parse_args(["--methods", "amad,nope"])


@pytest.mark.integration
def test_train_scaling_quick_run_writes_complete_results(tmp_path):
    """A subprocess: the benchmark starts (and connects its driver to) its own two-node loopback cluster,
    which this process may not do while it is connected to the session's. It inherits conftest's
    loopback environment and sets the same itself (pipeline.local_cluster)."""
    out = tmp_path / "train_scaling.json"
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_TMPDIR", "MLFLOW_TRACKING_URI")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_scaling.py"), "--quick", "--out", str(out)],
        cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "speedup 2 vs 1:" in result.stdout

    results = json.loads(out.read_text())
    for key in ("samples_per_s", "speedup_2_vs_1", "target", "meets_target", "runs", "config"):
        assert key in results, key
    rates = results["samples_per_s"]
    assert set(rates) == {"1", "2"} and all(positive_finite(rate) for rate in rates.values()), rates
    assert math.isclose(results["speedup_2_vs_1"], rates["2"] / rates["1"])
    assert results["meets_target"] is (results["speedup_2_vs_1"] >= 1.6)
    config = results["config"]
    assert config["quick"] is True and config["threads_per_worker"] == 1 and config["cpus_per_worker"] == 1
    for workers, run in results["runs"].items():
        per_epoch = run["per_epoch"]
        assert [m["epoch"] for m in per_epoch] == list(range(1, config["epochs"] + 1)), workers
        assert all(positive_finite(m["samples_per_s"]) and positive_finite(m["epoch_seconds"]) for m in per_epoch)
        # the aggregate is over epochs 2..E: total samples / total seconds
        measured = per_epoch[1:]
        expected = sum(m["samples_per_s"] * m["epoch_seconds"] for m in measured) / sum(m["epoch_seconds"] for m in measured)
        assert math.isclose(run["samples_per_s"], expected) and math.isclose(rates[workers], expected)
        samples = config["steps_per_epoch_per_worker"] * config["batch_size_per_worker"] * int(workers) * len(measured)
        assert run["samples"] == samples, (workers, run["samples"], samples)


def test_amad_loss_floor_quick_run_writes_complete_results(tmp_path):
    floor = load_script("amad_loss_floor")
    step_json = tmp_path / "step.json"
    step_json.write_text(json.dumps({"step_ms": {"logit_kd": 100.0}}))
    threads = torch.get_num_threads()
    try:
        returned = floor.main(["--quick", "--threads", "1", "--step-json", str(step_json),
                               "--out", str(tmp_path / "floor.json")])
    finally:
        torch.set_num_threads(threads)

    assert json.loads((tmp_path / "floor.json").read_text()) == json.loads(json.dumps(returned))
    assert set(returned["ms_per_layer_fwd_bwd"]) == {"shipped", "pytorch", "one_pass"}  # --quick skips compile
    assert all(positive_finite(v) for v in returned["ms_per_layer_fwd_bwd"].values())
    assert returned["passes_per_layer"]["one_pass"] == 1.0
    assert returned["budget_ms_per_layer"] == pytest.approx(0.10 * 100.0 / 2)


def test_plain_amad_loss_matches_the_shipped_loss():
    """The compiled variant times the same loss, so its plain form must equal amad_loss."""
    floor = load_script("amad_loss_floor")
    t, s, mask = floor.make_inputs(3, 6, 2, 21, padding=3)
    assert not mask.all() and mask.any()
    plain = floor.plain_amad_loss(t, s, mask)
    (grad_plain,) = torch.autograd.grad(plain, s)
    shipped = floor.amad_loss(t, s, mask)
    (grad_shipped,) = torch.autograd.grad(shipped, s)
    torch.testing.assert_close(plain, shipped, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_plain, grad_shipped, rtol=1e-4, atol=1e-7)


@pytest.mark.integration
def test_inference_quick_run_writes_complete_results(tmp_path):
    inference = load_script("inference")
    threads = torch.get_num_threads()
    try:
        returned = inference.main(["--quick", "--threads", "1", "--repeats", "8", "--out", str(tmp_path / "inf.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "inf.json").read_text()) == json.loads(json.dumps(returned))
    assert returned["command"] == "python benchmarks/inference.py --quick --threads 1 --repeats 8 --out " + str(tmp_path / "inf.json")
    variants = {"teacher_torch", "teacher_ort_fp32", "student_torch", "student_ort_fp32", "student_ort_int8"}
    for key in ("p50_ms", "p99_ms", "rps_b32", "accuracy"):
        assert set(returned[key]) == variants, key
    for variant in variants:
        assert positive_finite(returned["p50_ms"][variant]) and returned["p50_ms"][variant] <= returned["p99_ms"][variant]
        assert positive_finite(returned["rps_b32"][variant])
        assert 0.0 <= returned["accuracy"][variant] <= 1.0
    # The fp32 ONNX student passed the parity gate, so it answers as the PyTorch student does
    # (a near-tie within 1e-4 may flip one or two of the random student's answers).
    assert returned["notes"]["parity_fp32"] <= 1e-4
    questions = returned["config"]["validation_questions"]
    assert abs(returned["accuracy"]["student_ort_fp32"] - returned["accuracy"]["student_torch"]) <= 2 / questions
    # the same-runtime comparison: the teacher in ONNX Runtime passed the same gate and answers as in PyTorch
    assert returned["notes"]["teacher"]["parity_fp32"] <= 1e-4
    assert abs(returned["accuracy"]["teacher_ort_fp32"] - returned["accuracy"]["teacher_torch"]) <= 2 / questions
    assert returned["ratios"]["student_vs_teacher_ort_b1"] == pytest.approx(returned["p50_ms"]["student_ort_fp32"] / returned["p50_ms"]["teacher_ort_fp32"])
    assert returned["config"]["quick"] is True and returned["config"]["validation_questions"] <= 256


def test_compare_methods_quick_run_writes_json_and_the_generated_results_page(tmp_path, capsys):
    """Both regimes on a random tiny teacher: tuning, reuse of logged runs, the page, and worker processes."""
    compare = load_script("compare_methods")
    threads = torch.get_num_threads()
    argv = ["--quick", "--threads", "1", "--start", "pruned", "--out", str(tmp_path / "cm.json"), "--results-md", str(tmp_path / "results.md")]
    try:
        first = compare.main(argv + ["--methods", "task", "amad_t1"])  # untuned: attention weight 1
        tuned = compare.main(argv + ["--tune"])
        again = compare.main(argv)  # the tuning file is read back; every run is reused
        lines = len((tmp_path / "cm.runs.jsonl").read_text().splitlines())
        only = compare.main(argv + ["--tune", "--tune-only"])  # every candidate reused, no final run
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # amad_t1 at weight 1 was trained as a final run first: tuning reuses it; the chosen candidates'
    # tuning runs are their seed-0 final runs, so only logit_kd is left to train.
    assert "tuning: 20 candidate runs" in out and "final: 9 runs, 1 to train" in out and "final: 9 runs, 0 to train" in out
    log = [json.loads(line) for line in (tmp_path / "cm.runs.jsonl").read_text().splitlines()]
    trained = [(r["arm"], json.dumps(r["params"], sort_keys=True)) for r in log]
    grid = [(arm, json.dumps(params, sort_keys=True)) for arm in compare.ARMS for params in compare.candidates(arm, [1.0, 4.0, 16.0], [0.3, 0.1], 0.3)]
    assert sorted(trained) == sorted(grid)  # every candidate and baseline trained exactly once, whichever stage asked
    assert all("test" in r for r in log)
    qtypes = set(QUESTION_TYPES)  # every run says which question types it answers, on test and along its curve
    for record in log:
        assert set(record["test"]["per_type"]) == qtypes and all(0.0 <= v <= 1.0 for v in record["test"]["per_type"].values())
        assert [step for step, _ in record["type_curve"]] == [step for step, _ in record["curve"]]
        assert all(set(per_type) == qtypes for _, per_type in record["type_curve"])
    assert first["params"]["amad_t1"]["2"] == {"attention_weight": 1.0} and first["accuracy"]["task"] == tuned["accuracy"]["task"]
    tuning = json.loads((tmp_path / "cm.tuning.json").read_text())
    for arm, per_heads in tuned["params"].items():
        assert per_heads["2"] == tuning["chosen"].get("2", {}).get(arm, {}), arm
        if arm not in compare.NO_ATTENTION:
            best = max(tuning["candidates"]["2"][arm], key=lambda c: c["val_accuracy"])
            assert per_heads["2"] == best["params"]
            logged = next(r for r in log if r["arm"] == arm and r["params"] == best["params"])
            assert tuned["accuracy"][arm]["2"] == [logged["test"]["accuracy"]], arm  # the chosen tuning run is the seed-0 final
    assert again["accuracy"] == tuned["accuracy"] and again["reused_runs"] == 9
    assert only["command"].endswith("--tune --tune-only") and only["chosen"] == tuning["chosen"] and len((tmp_path / "cm.runs.jsonl").read_text().splitlines()) == lines
    assert set(tuned["accuracy"]) == set(compare.ARMS)
    for field in ("accuracy", "relational_accuracy", "nonrelational_accuracy"):
        for arm, per_heads in tuned[field].items():
            assert set(per_heads) == {"2"} and len(per_heads["2"]) == 1 and 0.0 <= per_heads["2"][0] <= 1.0, (field, arm)
    for arm, per_heads in tuned["curves"].items():
        assert [step for step, _ in per_heads["2"][0]] == [10, 20], arm  # every --eval-every steps and the last
    assert set(tuned["alignment"]) == {"amad_t1", "amad_tuned", "amad_mse"}
    for per_heads in tuned["alignment"].values():
        summary = per_heads["2"][0]
        assert 0.5 - 1e-6 <= summary["peak"] <= 1.0 + 1e-6 and 0.0 <= summary["kept_top"] <= 1.0  # between uniform and one-hot
        assert 0.0 <= summary["dropped_entropy"] <= 1.0 + 1e-6
    page = (tmp_path / "results.md").read_text()
    assert page.startswith("<!-- generated by benchmarks/results_page.py") and "| amad_t1 |" in page
    assert "python benchmarks/compare_methods.py --quick" in page and "| amad_t1 − one_to_one_origin |" in page
    assert "1 seed: no error bar" in page and "## Students pruned from the teacher" in page

    # Two lockstep groups (seeds 0 and 1) at once in worker processes, random regime.
    command = [sys.executable, str(BENCHMARKS / "compare_methods.py"), "--quick", "--threads", "1", "--jobs", "2", "--fresh",
               "--seeds", "0", "1", "--methods", "logit_kd", "amad_t1", "--out", str(tmp_path / "jobs" / "cm.json"),
               "--results-md", str(tmp_path / "jobs" / "results.md")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = json.loads((tmp_path / "jobs" / "cm.json").read_text())
    assert parallel["config"]["jobs"] == 2 and parallel["config"]["seeds"] == [0, 1] and parallel["regime"] == "random"
    # one student per group here, two per group there: lockstep shares nothing that changes a student
    in_process = compare.main(["--quick", "--threads", "1", "--fresh", "--methods", "logit_kd", "amad_t1", "--group-size", "1",
                               "--out", str(tmp_path / "one" / "cm.json"), "--results-md", str(tmp_path / "one" / "results.md")])
    assert {json.loads(line)["group_size"] for line in (tmp_path / "one" / "cm.runs.jsonl").read_text().splitlines()} == {1}
    for method in ("logit_kd", "amad_t1"):
        assert parallel["accuracy"][method]["2"][0] == in_process["accuracy"][method]["2"][0], method
    torch.set_num_threads(threads)
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "compare_methods.py"), "--quick", "--methods", "one_to_one_origin"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "one_to_one_origin needs students pruned from the teacher (--start pruned)" in refused.stderr


def test_compare_captioning_quick_run_tunes_every_arm_alike_and_reuses_its_runs(tmp_path, capsys):
    """The captioning claim on a random tiny captioner: every arm and kind scope, tuning, reuse of logged runs."""
    compare = load_script("compare_captioning")
    threads = torch.get_num_threads()
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path / "cc.json")]
    try:
        tuned = compare.main(argv + ["--tune"])
        again = compare.main(argv)  # no --tune: the tuning file is read back, every run reused
    finally:
        torch.set_num_threads(threads)
    assert set(tuned["cider_d"]) == set(compare.ARMS) == set(tuned["bleu_4"])
    assert {"one_to_one_origin/all", "one_to_one_origin/cross", "amad_t1/all", "amad_t1/cross"} <= set(compare.ARMS)
    log = [json.loads(line) for line in (tmp_path / "cc.runs.jsonl").read_text().splitlines()]
    assert len(log) == 8 * 3 + 2  # 8 tuned arms x 3 candidates, then task and logit_kd: the chosen candidates are not trained again
    for arm, chosen in tuned["tuning"]["chosen"]["2"].items():
        candidates = [r for r in log if r["arm"] == arm]
        assert chosen == max(candidates, key=lambda r: r["val_cider_d"])["params"], arm
        assert tuned["cider_d"][arm]["2"] == [next(r for r in candidates if r["params"] == chosen)["test"]["cider_d"]]
    assert again["cider_d"] == tuned["cider_d"] and again["reused_runs"] == 10 and tuned["reused_runs"] == 0 and again["params"] == tuned["params"]
    tuning = json.loads((tmp_path / "cc.tuning.json").read_text())
    assert tuning["chosen"] == tuned["tuning"]["chosen"]
    for arm, chosen in tuning["chosen"]["2"].items():  # every candidate kept with its validation score and curve
        kept = tuning["candidates"]["2"][arm]
        assert [c["params"] for c in kept] == [r["params"] for r in log if r["arm"] == arm] and chosen in [c["params"] for c in kept]
        assert all(len(c["curve"]) == 2 for c in kept), arm
    tuned_runs = [r for r in log if r["stage"] == "tune"]
    assert tuning["train_seconds"] == pytest.approx(sum(r["group_seconds"] / r["group_size"] for r in tuned_runs))
    assert tuning["command"] == f"python benchmarks/compare_captioning.py {' '.join(argv + ['--tune'])}"
    assert 0 < tuned["train_seconds"] and again["train_seconds"] == pytest.approx(tuned["train_seconds"])
    for arm, per_heads in tuned["cider_d"].items():
        assert 0.0 <= per_heads["2"][0] <= 10.0 and 0.0 <= tuned["bleu_4"][arm]["2"][0] <= 1.0, arm
    assert [step for step, _ in tuned["curves"]["amad_t1/all"]["2"][0]] == [6, 12]
    assert "| amad_t1/cross |" in capsys.readouterr().out
    objective = compare.objective_for("one_to_one_origin/cross", {"attention_weight": 2.0}, {k: [[(0, 1)]] for k in compare.KINDS})
    assert objective.kinds == ("cross",) and objective.one_to_one_pairing == "origin" and set(objective.head_origins) == {"cross"}


def test_compare_captioning_random_start_has_the_pruned_shapes_and_fresh_weights(tmp_path):
    """``--start random``: the pruned student's shapes with weights drawn from the seed, never the teacher's; the
    by-origin arms are refused by name and left out of the default arms; results go to their own file."""
    compare = load_script("compare_captioning")
    args = compare.parse_args(["--quick", "--start", "random"])
    assert args.out.endswith("compare_captioning_random.json") and not any("origin" in arm for arm in args.methods)
    assert len(args.methods) == len(compare.ARMS) - 2
    with pytest.raises(SystemExit):
        compare.parse_args(["--quick", "--start", "random", "--methods", "one_to_one_origin/cross"])
    pruned_args = compare.parse_args(["--quick"])
    assert pruned_args.out.endswith("compare_captioning.json") and "one_to_one_origin/all" in pruned_args.methods
    world = compare._load_world(compare.quick_teacher(tmp_path), pruned_args)
    teacher, importance = world["teacher"], world["importance"]
    pruned = compare.initial_student(pruned_args, teacher, importance, 2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(pruned.parameters(), compare.initial_student(pruned_args, teacher, importance, 2, seed=1).parameters()))
    random0, random0_again, random1 = (compare.initial_student(args, teacher, importance, 2, seed=s) for s in (0, 0, 1))
    shapes = lambda model: {name: tuple(p.shape) for name, p in model.named_parameters()}  # noqa: E731
    assert shapes(random0) == shapes(pruned) == shapes(random1)
    assert all(torch.equal(a, b) for a, b in zip(random0.parameters(), random0_again.parameters()))  # the seed draws them
    differs = lambda a, b: sum(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    matrices = sum(p.dim() == 2 for p in pruned.parameters())
    assert differs(random0, pruned) >= matrices and differs(random0, random1) >= matrices - 1  # every weight matrix is new
    assert compare.run_key(args, tmp_path, 1) != compare.run_key(pruned_args, tmp_path, 1)


def sweep_efficiency_probe(probe: str):
    """Run ``probe`` (Python that imports the benchmark script) in a subprocess, since importing it sets
    the loopback environment; returns the JSON its last line printed."""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sweep_efficiency_configs_validate_for_both_schedulers():
    """The benchmark's two sweeps (built from the shipped presets plus its overrides) pass SweepConfig
    validation, in both modes."""
    probe = (
        "import json, sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks'); import sweep_efficiency as se\n"
        "out = {}\n"
        "for quick in (False, True):\n"
        "    args = se.parse_args(['--quick'] if quick else [])\n"
        "    for scheduler in ('asha', 'fifo'):\n"
        "        cfg = se.sweep_config(args, se.ROOT / 'weights' / 'teacher-default', scheduler)\n"
        "        s = cfg.scheduler\n"
        "        out[f'{quick}-{scheduler}'] = [s.type, s.grace_period, s.reduction_factor, s.max_epochs, cfg.max_concurrent_trials]\n"
        "    warm = se.sweep_config(args, se.ROOT / 'weights' / 'teacher-default', 'fifo', warm_up=True)\n"
        "    out[f'{quick}-warm-up'] = [warm.scheduler.type, warm.max_epochs, warm.name, sorted(warm.space)]\n"
        "print(json.dumps(out))\n"
    )
    got = sweep_efficiency_probe(probe)
    # Full mode: rungs at 1, 3, 9 and 27 epochs; quick: 1, 2 and 4.
    # The untimed warm-up: two 1-epoch trials under its own name.
    warm = ["fifo", 1, "efficiency-warm-up", ["student.heads"]]
    assert got == {"False-asha": ["asha", 1, 3, 27, 2], "False-fifo": ["fifo", 1, 3, 27, 2], "False-warm-up": warm,
                   "True-asha": ["asha", 1, 2, 4, 2], "True-fifo": ["fifo", 1, 2, 4, 2], "True-warm-up": warm}


def test_sweep_efficiency_rounds_interleave_and_report_medians():
    """Rounds run ABBA, the headline is the ratio of median wall times, and one round's accuracy gap
    over a point fails the target even when the medians pass."""
    probe = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import sweep_efficiency as se\n"
        "run = lambda wall, acc: {'wall_s': wall, 'best_acc': acc}\n"
        "rounds = [{'asha': run(500.0, 0.50), 'fifo': run(900.0, 0.505)},\n"
        "          {'asha': run(480.0, 0.50), 'fifo': run(1000.0, 0.505)},\n"
        "          {'asha': run(700.0, 0.50), 'fifo': run(800.0, 0.505)}]\n"
        "ok = se.summarise(rounds)\n"
        "bad = se.summarise(rounds[:1] + [{'asha': run(480.0, 0.49), 'fifo': run(1000.0, 0.51)}])\n"
        "print(json.dumps({'order': se.sweep_order(3), 'ok': [ok['wall_s_asha'], ok['wall_s_full'], round(ok['wall_ratio'], 4),\n"
        "    round(ok['acc_gap_points'], 2), ok['meets_target'], [round(r['wall_ratio'], 4) for r in ok['per_round']]],\n"
        "    'bad': [round(bad['acc_gap_points'], 2), bad['meets_target']]}))\n"
    )
    got = sweep_efficiency_probe(probe)
    assert got["order"] == [[0, "asha"], [0, "fifo"], [1, "fifo"], [1, "asha"], [2, "asha"], [2, "fifo"]]
    # Medians 500 / 900 s: 0.5556 although round 3 alone is 0.875; every gap 0.5 points.
    assert got["ok"] == [500.0, 900.0, 0.5556, 0.5, True, [0.5556, 0.48, 0.875]]
    assert got["bad"] == [2.0, False]


def test_pruning_frontier_quick_run_writes_every_start_and_the_plot(tmp_path):
    frontier = load_script("pruning_frontier")
    out = tmp_path / "frontier.json"
    results = frontier.main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["command"].startswith("python benchmarks/pruning_frontier.py --quick")
    starts = {row["start"] for row in results["rows"]}
    assert starts == {"pruned", "random", "regrouped"}
    assert all(row["start"] != "regrouped" or row["ffn_keep"] == 1.0 for row in results["rows"])
    pruned = {(r["layers"], r["ffn_keep"]): r["parameters"] for r in results["rows"] if r["start"] == "pruned"}
    assert pruned[(1, 0.5)] < pruned[(1, 1.0)] < pruned[(2, 1.0)] < results["teacher"]["parameters"]
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.integration
def test_real_size_quick_run_goes_through_the_pipeline_and_writes_complete_results(tmp_path):
    """The bring-your-own path on a (shrunk) ViLT-B/32-shaped checkpoint: amad run in a subprocess of
    the script, then the in-process step, export and parity figures."""
    out = tmp_path / "real_size.json"
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_TMPDIR", "MLFLOW_TRACKING_URI")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "real_size.py"), "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    results = json.loads(out.read_text())
    assert results["command"].startswith("python benchmarks/real_size.py --quick")
    shape = results["teacher_shape"]
    assert shape["answers"] == 3129 and shape["image_size"] == 384 and shape["patch_size"] == 32 and shape["max_text_tokens"] == 40
    pipeline = results["pipeline"]
    assert pipeline["serve"]["agreed"] == pipeline["serve"]["questions"] == 4
    assert pipeline["parity_gate"]["max_abs_logit_diff"] <= 1e-4 and pipeline["parity_gate"]["top1_agreement"] == 1.0
    comparison = pipeline["comparison"]
    assert comparison["student"]["layers"] == 2 and comparison["student"]["heads"] == 6
    assert math.isclose(comparison["latency_ratio"], comparison["student"]["p50_ms"] / comparison["teacher"]["p50_ms"])
    in_process = results["in_process"]
    assert len(in_process["photo_shapes_after_processing"]) == 2  # landscape and portrait photos
    for label in ("teacher", "student"):
        assert in_process[label]["parity_max_abs_logit_diff"] <= 1e-4 and in_process[label]["parity_top1_agreement"] == 1.0
        assert positive_finite(in_process[label]["export_seconds"])
    assert positive_finite(in_process["step_seconds_median"]) and positive_finite(in_process["peak_rss_gib"])
    assert results["targets"]["parity"]["met"] is True
    assert results["targets"]["latency_ratio"]["met"] is (comparison["latency_ratio"] <= 0.5)


def test_caption_inference_quick_run_gates_times_and_scores_every_variant(tmp_path):
    """The captioning inference benchmark on a tiny random captioner and its pruned student: both exports pass the
    parity gate before anything is timed, every variant has latency and throughput, scores and ratios are written."""
    bench = load_script("caption_inference")
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--out", str(tmp_path / "ci.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "ci.json").read_text()) == json.loads(json.dumps(results))
    assert results["command"] == f"python benchmarks/caption_inference.py --quick --out {tmp_path / 'ci.json'}"
    for table in ("p50_ms", "p99_ms", "images_per_s_b32"):
        assert set(results[table]) == set(bench.VARIANTS) and all(v > 0 for v in results[table].values()), table
    assert all(gate[kind]["identical_greedy"] == 1.0 and gate[kind]["max_abs_logit_diff"] <= 1e-4
               for gate in results["parity"].values() for kind in ("whole_prefix", "cached"))
    assert results["ratios"]["cached_vs_whole_prefix_student_b32"] == pytest.approx(
        results["images_per_s_b32"]["student_ort_cached"] / results["images_per_s_b32"]["student_ort"])
    assert results["ratios"]["ort_vs_torch_student_b1"] == pytest.approx(results["p50_ms"]["student_torch"] / results["p50_ms"]["student_ort"])
    assert results["config"]["parameters"]["student"] < results["config"]["parameters"]["teacher"]
    assert set(results["scores"]) == {"teacher", "student"} and "cider_d" in results["scores"]["student"]
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "caption_inference.py")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--student is required" in refused.stderr


def _quick_world(tmp_path):
    """compare_methods' quick world (a random tiny teacher, pruned regime) and the module."""
    load_script("gradient_norms")
    cm = sys.modules["compare_methods"]
    args = cm.parse_args(["--quick", "--start", "pruned"])
    return cm, cm._load_world(cm.quick_teacher(tmp_path / "teacher"), args)


def test_gradient_norms_summary_on_hand_built_gradients():
    """Norms, share and cosines of known vectors: task (3, 0, 0), logit KD (0, 0, 2), attention (0, 4, 0) at weight 0.5."""
    gn = load_script("gradient_norms")
    measured = {"grads": {"task": torch.tensor([3.0, 0.0, 0.0]), "logit_kd": torch.tensor([0.0, 0.0, 2.0]), "attention": torch.tensor([0.0, 4.0, 0.0])},
                "weights": {"task": 1.0, "logit_kd": 1.0, "attention": 0.5}, "values": {"task": 1.0, "logit_kd": 0.5, "attention": 0.25}}
    summary = gn.summarise(measured)
    assert summary["norm"] == {"task": 3.0, "logit_kd": 2.0, "attention": 4.0, "attention_weighted": 2.0}
    assert summary["total_norm"] == pytest.approx(math.sqrt(9 + 4 + 4))  # (3, 2, 2)
    assert summary["share"] == pytest.approx(2 / math.sqrt(17))
    assert summary["cosine"] == {"task": pytest.approx(0.0), "logit_kd": pytest.approx(0.0)}
    aligned = gn.summarise({**measured, "grads": {**measured["grads"], "attention": torch.tensor([-6.0, 0.0, 0.0])}})
    assert aligned["cosine"]["task"] == pytest.approx(-1.0) and aligned["norm"]["attention_weighted"] == 3.0


def test_gradient_norms_terms_add_up_to_the_gradient_the_optimiser_sees(tmp_path):
    """The per-term gradients, weighted and summed, are what ``loss.backward()`` gives over the same batches."""
    from amad.models import ViltAdapter
    from amad.pruning import recorded_origins

    gn = load_script("gradient_norms")
    cm, world = _quick_world(tmp_path)
    teacher, student = world["teacher"], cm.initial_student(world, 2, 0)
    objective = cm.objective_for("amad_t1", {"attention_weight": 2.5}, relation_heads=2, normalization="per_head", origins=recorded_origins(student))
    batches = list(world["train"].subset(torch.arange(32)).batches(16))
    measured = gn.term_gradients(teacher, student, objective, batches)
    assert set(measured["grads"]) == {"task", "logit_kd", "attention"} and measured["weights"]["attention"] == 2.5

    student.zero_grad()
    for batch in batches:
        with torch.no_grad():
            t_out = ViltAdapter.forward(teacher, batch, need_attentions=True)
        objective(t_out, ViltAdapter.forward(student, batch, need_attentions=True), batch["labels"])["loss"].backward()
    seen = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in student.parameters() if p.requires_grad])
    combined = sum(weight * measured["grads"][term] for term, weight in measured["weights"].items())
    assert torch.allclose(seen, combined, rtol=1e-4, atol=1e-6), (seen - combined).abs().max()
    summary = gn.summarise(measured)
    assert summary["total_norm"] == pytest.approx(seen.norm().item(), rel=1e-4)
    assert summary["norm"]["attention_weighted"] == pytest.approx(2.5 * summary["norm"]["attention"])
    assert 0 < summary["share"] < 1 and all(-1 <= c <= 1 for c in summary["cosine"].values())


def test_lockstep_stop_at_gives_the_full_schedules_students_at_that_step(tmp_path):
    import copy

    lockstep = load_script("lockstep")
    cm, world = _quick_world(tmp_path)
    start = cm.initial_student(world, 2, 0)
    objective = {"a": cm.objective_for("head_mean", {"attention_weight": 1.0}, relation_heads=2, normalization="per_head")}
    kwargs = dict(steps=6, batch_size=8, lr=1e-3, warmup=2, seed=0)
    at_three = {}
    lockstep.train_lockstep(world["teacher"], {"a": copy.deepcopy(start)}, objective, world["train"], every=1,
                            on_step=lambda step, s: at_three.update(copy.deepcopy(s["a"].state_dict())) if step == 3 else None, **kwargs)
    calls = []
    stopped = lockstep.train_lockstep(world["teacher"], {"a": copy.deepcopy(start)}, objective, world["train"], stop_at=3,
                                      on_step=lambda step, s: calls.append(step), **kwargs)["a"]
    assert calls == [3]
    assert all(torch.equal(value, at_three[name]) for name, value in stopped.state_dict().items())
    assert not all(torch.equal(value, start.state_dict()[name]) for name, value in stopped.state_dict().items())


def test_gradient_norms_quick_run_writes_every_arm_at_every_point(tmp_path, capsys):
    gn = load_script("gradient_norms")
    threads = torch.get_num_threads()
    try:
        result = gn.main(["--quick", "--out", str(tmp_path / "gn.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "gn.json").read_text()) == json.loads(json.dumps(result))
    assert result["command"].startswith("python benchmarks/gradient_norms.py --quick")
    assert set(result["points"]) == set(gn.DEFAULT_ARMS) and result["reproduces_run_log"] == {}
    for points in result["points"].values():
        assert [p["step"] for p in points] == [0, 2, 4, 6]
        for p in points:
            assert positive_finite(p["norm"]["task"]) and positive_finite(p["norm"]["attention_weighted"]) and 0 < p["share"] < 1
    assert "| step | val acc |" in capsys.readouterr().out
    try:  # one arm at another weight than its chosen one
        heavier = gn.main(["--quick", "--arms", "amad_t1", "--attention-weight", "4", "--out", str(tmp_path / "w4.json")])
    finally:
        torch.set_num_threads(threads)
    assert heavier["params"] == {"amad_t1": {"attention_weight": 4.0}} and list(heavier["points"]) == ["amad_t1"]
    assert all(p["norm"]["attention_weighted"] == pytest.approx(4 * p["norm"]["attention"]) for p in heavier["points"]["amad_t1"])
