"""The claim comparison's parts (issue 23): normalised attention terms, one-to-one by origin, the results page.

Hand-built maps: one query row over two keys, three teacher heads and two student heads::

    teacher t0 = [0.5, 0.5], t1 = [1, 0], t2 = [0.25, 0.75]       student s0 = [0.75, 0.25], s1 = [0.5, 0.5]

so every divergence below is a closed form (KL(p || q) = sum p log(p / q)).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from amad.losses import one_to_one_loss, relation_loss
from amad.models import ViltAdapter
from amad.objective import DistillationObjective
from amad.outputs import QKV, VLOutputs
from amad.pruning import plan, prune_from_plan, recorded_origins, score

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

T = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])[None, :, None]  # (B=1, Ht=3, Q=1, K=2)
S = torch.tensor([[0.75, 0.25], [0.5, 0.5]])[None, :, None]  # (1, Hs=2, 1, 2)
LOG = math.log
KL_T0_S0 = 0.5 * LOG(0.5 / 0.75) + 0.5 * LOG(0.5 / 0.25)
KL_T1_S1 = LOG(1 / 0.5)
KL_T2_S0 = 0.25 * LOG(0.25 / 0.75) + 0.75 * LOG(0.75 / 0.25)
MEAN_T, MEAN_S = (1.75 / 3, 1.25 / 3), (0.625, 0.375)
KL_MEANS = MEAN_T[0] * LOG(MEAN_T[0] / MEAN_S[0]) + MEAN_T[1] * LOG(MEAN_T[1] / MEAN_S[1])
AMAD_SUM = 0.7376320079694746  # sum over teacher heads of KL(t_i || sum_j a_ij s_j), a = softmax_j cos(t_i, s_j), by hand in numpy


def outputs(maps: torch.Tensor, layers: int = 1, qkv: list[QKV] | None = None) -> VLOutputs:
    return VLOutputs(logits=torch.zeros(maps.shape[0], 3), attentions={"self": [maps] * layers}, query_masks={}, key_masks={},
                     qkv={"self": qkv} if qkv else {})


def attention(method: str, normalization: str, **extra) -> float:
    objective = DistillationObjective(method=method, task_weight=0.0, logit_kd_weight=0.0, attention_weight=1.0,
                                      attention_normalization=normalization, **extra)
    return objective(outputs(T), outputs(S))["attention"].item()


@pytest.mark.parametrize(
    "method, extra, summed, targets",
    [
        ("one_to_one", {}, KL_T0_S0 + KL_T1_S1, 2),  # Hs aligned pairs; t2 dropped
        ("one_to_one", {"one_to_one_pairing": "origin", "head_origins": [[(0, 2), (0, 0)]]}, KL_T2_S0 + 0.0, 2),  # s0 <- t2, s1 <- t0
        ("head_mean", {}, KL_MEANS, 1),  # one divergence of the mean maps
        ("amad", {}, AMAD_SUM, 3),  # every one of the Ht teacher heads
    ],
)
def test_attention_terms_are_sums_by_default_and_means_per_aligned_teacher_target_when_normalised(method, extra, summed, targets):
    assert attention(method, "sum", **extra) == pytest.approx(summed, rel=1e-5)
    assert attention(method, "per_head", **extra) == pytest.approx(summed / targets, rel=1e-5)


def test_relation_term_normalised_is_the_mean_of_its_three_relations():
    generator = torch.Generator().manual_seed(0)
    teacher = QKV(*(torch.randn(2, 5, 12, generator=generator) for _ in range(3)))
    student = QKV(*(torch.randn(2, 5, 8, generator=generator) for _ in range(3)))
    summed = relation_loss(teacher, student, relation_heads=4).item()
    values = {}
    for normalization in ("sum", "per_head"):
        objective = DistillationObjective(method="relation", relation_heads=4, task_weight=0.0, logit_kd_weight=0.0,
                                          attention_normalization=normalization)
        values[normalization] = objective(outputs(T, qkv=[teacher]), outputs(S, qkv=[student]))["attention"].item()
    assert values["sum"] == pytest.approx(summed, rel=1e-6) and values["per_head"] == pytest.approx(summed / 3, rel=1e-6)


def test_one_to_one_loss_takes_the_teacher_head_of_each_student_head_and_refuses_bad_lists():
    assert one_to_one_loss(T, S, teacher_heads=[2, 0]).item() == pytest.approx(KL_T2_S0, rel=1e-5)
    assert one_to_one_loss(T, S, teacher_heads=[0, 1]).item() == pytest.approx(one_to_one_loss(T, S).item())
    for bad in ([0], [0, 0], [0, 3], [0, -1], [0, True]):
        with pytest.raises(ValueError, match=r"teacher_heads must list 2 distinct teacher head indices in \[0, 3\)"):
            one_to_one_loss(T, S, teacher_heads=bad)


def test_one_to_one_by_origin_needs_origins_that_fit_the_student_and_the_layer_map():
    with pytest.raises(ValueError, match="needs head_origins.*only a student pruned from its teacher"):
        DistillationObjective(method="one_to_one", one_to_one_pairing="origin")
    with pytest.raises(ValueError, match="applies to method='one_to_one' only"):
        DistillationObjective(method="amad", one_to_one_pairing="origin", head_origins=[[(0, 0)]])
    with pytest.raises(ValueError, match=r"head_origins\[0\] must hold \(teacher_layer, teacher_head\) pairs"):
        DistillationObjective(method="one_to_one", one_to_one_pairing="origin", head_origins=[[(0, "a")]])
    with pytest.raises(ValueError, match="attention_normalization must be one of"):
        DistillationObjective(attention_normalization="mean")
    two_layers = DistillationObjective(method="one_to_one", one_to_one_pairing="origin", head_origins=[[(0, 2), (0, 0)]] * 2,
                                      task_weight=0.0)
    with pytest.raises(ValueError, match="head_origins lists 2 student layers but the student returns 1"):
        two_layers(outputs(T), outputs(S))
    elsewhere = DistillationObjective(method="one_to_one", one_to_one_pairing="origin", head_origins=[[(1, 2), (1, 0)]], task_weight=0.0)
    with pytest.raises(ValueError, match=r"student layer 0 was pruned from teacher layer\(s\) \[1\] but layer_map pairs it with teacher layer 0"):
        elsewhere(outputs(T), outputs(S))


@pytest.fixture(scope="module")
def pruned_pair(tiny_teacher):
    """The tiny teacher (6 heads x 2 layers) and a student pruned from it to 2 heads x 1 layer."""
    from amad.data.benchmark import BenchmarkSpec, make_split
    from amad.data.text import load_tokenizer
    import json

    teacher = ViltAdapter.load(tiny_teacher).eval()
    spec = BenchmarkSpec.from_dict(json.loads((tiny_teacher / "benchmark.json").read_text()))
    train = make_split(spec, "train", load_tokenizer(tiny_teacher))
    importance = score(teacher, train.subset(torch.arange(64)).batches(32))
    return teacher, prune_from_plan(teacher, plan(importance, 2, 1, 1.0)), train


def test_one_to_one_by_origin_on_a_pruned_student_uses_its_recorded_heads(pruned_pair):
    teacher, student, train = pruned_pair
    origins = recorded_origins(student)
    (layer, _), = {(layer, None) for layer, _ in origins[0]}
    assert len(origins) == 1 and layer == 1  # one student layer, cut from the teacher's last (uniform map)
    batch = train.batch(torch.arange(8))
    with torch.no_grad():
        t_out, s_out = ViltAdapter.forward(teacher, batch), ViltAdapter.forward(student, batch)
    objective = DistillationObjective(method="one_to_one", one_to_one_pairing="origin", head_origins=origins,
                                      task_weight=0.0, logit_kd_weight=0.0, attention_normalization="per_head")
    expected = one_to_one_loss(t_out.attentions["self"][1], s_out.attentions["self"][0], s_out.query_masks["self"],
                               teacher_heads=[head for _, head in origins[0]]) / 2
    assert objective(t_out, s_out)["attention"].item() == pytest.approx(expected.item(), rel=1e-6)
    by_index = DistillationObjective(method="one_to_one", task_weight=0.0, logit_kd_weight=0.0, attention_normalization="per_head")
    if [head for _, head in origins[0]] != [0, 1]:  # the kept heads are not the first two: by index differs
        assert by_index(t_out, s_out)["attention"].item() != pytest.approx(expected.item(), rel=1e-6)


def test_a_student_without_a_pruning_record_has_no_recorded_origin(pruned_pair):
    teacher, _, _ = pruned_pair
    with pytest.raises(ValueError, match="this student has no recorded origin: one-to-one by origin needs a student pruned from the teacher"):
        recorded_origins(teacher)


# ---------------------------------------------------------------- the comparison and its page


def test_every_tuned_arm_gets_the_same_number_of_candidates():
    compare = load_script("compare_methods")
    weights, temperatures = [1.0, 4.0, 16.0], [0.3, 0.1]
    budgets = {arm: compare.candidates(arm, weights, temperatures, 0.3) for arm in compare.ARMS}
    assert budgets["task"] == budgets["logit_kd"] == [{}]
    assert {len(c) for arm, c in budgets.items() if arm not in compare.NO_ATTENTION} == {3}
    assert budgets["amad_tuned"] == [{"attention_weight": 1.0, "amad_temperature": 0.3}, {"attention_weight": 4.0, "amad_temperature": 0.1},
                                     {"attention_weight": 16.0, "amad_temperature": 0.3}]
    records = [{"heads": 4, "arm": "amad_t1", "params": {"attention_weight": w}, "val_accuracy": acc} for w, acc in ((1.0, 0.5), (4.0, 0.6), (16.0, 0.6))]
    assert compare.choose(records, ["amad_t1", "one_to_one"], [4]) == {"4": {"amad_t1": {"attention_weight": 4.0}}}  # a tie keeps the first


def test_a_logged_run_serves_any_stage_that_needs_no_more_than_it_recorded(tmp_path):
    """The run log keys runs by arm, settings, heads and seed: a final run serves tuning, a tuning run with its
    test split serves a final run, one logged before runs recorded the test split serves tuning only."""
    import json

    compare = load_script("compare_methods")
    run = {"arm": "amad_t1", "params": {"attention_weight": 1.0}, "heads": 4, "seed": 0, "val_accuracy": 0.6, "curve": [], "key": "k"}
    old_tune = {**run, "stage": "tune"}
    final = {**run, "stage": "final", "test": {"accuracy": 0.61}}
    log = tmp_path / "cm.runs.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in (final, old_tune, {**final, "key": "other"})) + "\n{cut sho")
    done = compare.read_run_log(log, "k")
    assert list(done.values()) == [final]  # the fuller record stays, whatever the order; other keys and a cut line are ignored
    rid = compare.run_id("amad_t1", {"attention_weight": 1.0}, 4, 0)
    assert compare.complete_for("tune", done[rid]) and compare.complete_for("final", done[rid])
    assert compare.complete_for("tune", old_tune) and not compare.complete_for("final", old_tune) and not compare.complete_for("tune", None)


def test_only_a_complete_grid_counts_as_a_tuning():
    """A default-weight final run is a grid member too; alone it must not make its head count look tuned."""
    import json

    compare = load_script("compare_methods")
    grid = [("amad_t1", json.dumps({"attention_weight": w})) for w in (4.0, 1.0, 0.25)]
    run = lambda w, h, seed=0: {"arm": "amad_t1", "params": {"attention_weight": w}, "heads": h, "seed": seed, "val_accuracy": 0.5}  # noqa: E731
    logged = [run(1.0, 6), run(0.25, 4), run(1.0, 4), run(4.0, 4), run(4.0, 2, seed=1)]
    records = compare.tuning_records(logged, grid, seed=0)
    assert [(r["heads"], r["params"]["attention_weight"]) for r in records] == [(4, 4.0), (4, 1.0), (4, 0.25)]  # grid order; 6 heads has 1 of 3
    assert compare.choose(records, ["amad_t1"], [4, 6]) == {"4": {"amad_t1": {"attention_weight": 4.0}}}  # all tie: the grid's first


def _results(accuracy: dict, regime: str = "pruned") -> dict:
    heads = sorted({int(h) for per_heads in accuracy.values() for h in per_heads})
    return {"regime": regime, "accuracy": accuracy, "teacher": {"accuracy": 0.85, "heads": 12, "layers": 4},
            "config": {"heads": heads, "seeds": [0, 1, 2], "methods": list(accuracy), "layers": 2, "head_dim": None, "steps": 1200,
                       "batch_size": 64, "lr": 1e-3, "teacher": "weights/teacher-default", "test_questions": 9995,
                       "threads": 1, "jobs": 2, "cpu_count": 2, "machine": "x86_64", "normalization": "per_head"},
            "seconds": 60.0, "train_seconds": 60.0, "reused_runs": 0}


def test_results_page_gives_verdicts_only_beyond_two_standard_errors(tmp_path):
    page = load_script("results_page")
    mean, se = page.paired_difference([0.50, 0.52, 0.54], [0.49, 0.50, 0.50])  # differences 1, 2, 4 points
    assert mean == pytest.approx(7 / 3) and se == pytest.approx((7 / 3) ** 0.5 / 3 ** 0.5)
    results = _results({
        "logit_kd": {"2": [0.49, 0.50, 0.50], "4": [0.40, 0.41, 0.42]},
        "one_to_one": {"2": [0.50, 0.52, 0.54], "4": [0.45, 0.45, 0.45]},
        "one_to_one_origin": {"2": [0.53, 0.55, 0.57], "4": [0.40, 0.45, 0.41]},
        "amad_t1": {"2": [0.50, 0.52, 0.54], "4": [0.40, 0.45, 0.41]},
    })
    found = page.verdicts(results)
    assert found[("amad_t1", "one_to_one", 2)] == (pytest.approx(0.0), pytest.approx(0.0), "no clear difference")
    assert found[("amad_t1", "one_to_one", 4)][2] == "no clear difference"  # -3.00 ± 1.53
    assert found[("amad_t1", "logit_kd", 2)][2] == "better"  # +2.33 ± 0.88
    assert found[("amad_t1", "one_to_one_origin", 2)][2] == "worse"  # -3.00 ± 0.00
    assert found[("amad_t1", "one_to_one_origin", 4)][2] == "no clear difference"  # identical runs: 0 ± 0
    path = tmp_path / "results.md"
    page.write_page(path, [results, _results({"logit_kd": {"2": [0.4]}, "amad_t1": {"2": [0.5]}}, regime="random")])
    text = path.read_text()
    assert text.startswith("<!-- generated by benchmarks/results_page.py")
    assert "| amad_t1 − one_to_one | +0.00 ± 0.00 (no clear difference) | -3.00 ± 1.53 (no clear difference) |" in text
    assert "| amad_t1 − logit_kd | +2.33 ± 0.88 (better) | +1.00 ± 1.53 (no clear difference) |" in text
    assert "| amad_t1 − one_to_one_origin | -3.00 ± 0.00 (worse) | +0.00 ± 0.00 (no clear difference) |" in text
    assert "- **amad_t1** vs one_to_one_origin: 2 heads worse (-3.00 ± 0.00), 4 heads no clear difference (+0.00 ± 0.00)" in text
    assert "## Students pruned from the teacher: 1200 steps, 3 seed(s)" in text and "## Students from random weights: 1200 steps, 3 seed(s)" in text
    assert "+10.00 (1 seed: no error bar)" in text and "2 heads 1 seed: no verdict (+10.00 ± nan)" in text
    # 4 arms x 2 head counts x 3 seeds; threads and groups at a time are the last command's (reused runs may have had others)
    assert ("Time: the 24 final runs took 1.0 min of lockstep training in all (each run's share of its group's wall time); the command "
            "that wrote these figures ran 1.0 min (1 thread(s) per group, 2 group(s) at a time, 2 CPUs, x86_64) and reused 0 finished runs.") in text


def test_the_captioning_claim_gets_its_section_with_cider_verdicts_against_the_same_kinds(tmp_path):
    page = load_script("results_page")
    cider = {"logit_kd": {"4": [1.00, 1.10, 1.20]}, "one_to_one_origin/all": {"4": [1.10, 1.20, 1.30]},
             "one_to_one/all": {"4": [1.25, 1.30, 1.45]}, "amad_t1/all": {"4": [1.20, 1.35, 1.50]},
             "one_to_one_origin/cross": {"4": [1.30, 1.40, 1.50]}, "amad_t1/cross": {"4": [1.30, 1.40, 1.50]}}
    results = {"task": "captioning", "cider_d": cider, "bleu_4": {arm: {"4": [0.5, 0.6, 0.7]} for arm in cider},
               "teacher": {"cider_d": 2.05, "bleu_4": 0.587},
               "config": {"heads": [4], "seeds": [0, 1, 2], "methods": list(cider), "layers": 2, "steps": 3000, "batch_size": 64,
                          "lr": 1e-3, "teacher": "weights/captioner-default", "test_images": 1000, "threads": 1, "jobs": 2,
                          "cpu_count": 2, "machine": "x86_64"},
               "params": {arm: {"4": {} if arm == "logit_kd" else {"attention_weight": 1.0}} for arm in cider},
               "tuning": {"seed": 0}, "seconds": 600.0, "reused_runs": 0, "command": "python benchmarks/compare_captioning.py --tune"}
    results["config"]["val_images"] = 200
    results["train_seconds"] = 1500.0
    # validation CIDEr-D every 750 steps; the quarters of 3,000 steps read the last evaluation at or before them
    results["curves"] = {arm: {"4": [[[750, 1.0], [1500, 1.4], [2250, 1.5], [3000, 1.6]], [[750, 1.2], [1500, 1.6], [2250, 1.7], [3000, 1.7]]]}
                         for arm in cider}
    results["tuning"] = {"seed": 0, "train_seconds": 3000.0, "chosen": {"4": {"amad_t1/all": {"attention_weight": 1.0}}},
                         "candidates": {"4": {"amad_t1/all": [{"params": {"attention_weight": 0.25}, "val_cider_d": 1.5, "curve": []},
                                                              {"params": {"attention_weight": 1.0}, "val_cider_d": 1.75, "curve": []}]}}}
    found = page.caption_verdicts(results)
    # amad_t1/all - one_to_one_origin/all: 0.10, 0.15, 0.20 -> +0.150 ± 0.029: beyond 2 SE
    assert found[("amad_t1/all", "one_to_one_origin/all", 4)] == (pytest.approx(0.15), pytest.approx(0.05 / 3 ** 0.5), "better")
    assert found[("amad_t1/all", "one_to_one/all", 4)][2] == "no clear difference"  # -0.05, 0.05, 0.05: +0.017 ± 0.033
    assert found[("amad_t1/all", "logit_kd", 4)][2] == "better"
    assert ("amad_t1/all", "one_to_one_origin/cross", 4) not in found  # baselines on the same kinds of maps only
    assert found[("amad_t1/cross", "one_to_one_origin/cross", 4)][2] == "no clear difference"  # identical: 0 ± 0
    path = tmp_path / "results.md"
    page.write_page(path, [_results({"logit_kd": {"2": [0.4]}, "amad_t1": {"2": [0.5]}}), results])
    text = path.read_text()
    assert "## Captioning, students pruned from the captioning teacher: 3000 steps, 3 seed(s)" in text
    assert "| amad_t1/all − one_to_one_origin/all | +0.150 ± 0.029 (better) |" in text
    assert "| amad_t1/all | 1.350 ± 0.150 |" in text and "| logit_kd | 60.00 ± 10.00 |" in text  # CIDEr-D; BLEU-4 x100
    assert "- **amad_t1/cross** vs one_to_one_origin/cross: 4 heads no clear difference (+0.000 ± 0.000)" in text
    assert "greedy test CIDEr-D **2.050**, BLEU-4 58.70 on the same 1000 test images" in text
    assert "| amad_t1/all | 1.100 | 1.500 | 1.600 | 1.650 | +0.050 |" in text  # the curves: mean over the 2 seeds
    assert "tuned alike on validation CIDEr-D with seed 0, 50 min of lockstep training" in text
    assert "| amad_t1/all | w 0.25: 1.500; **w 1: 1.750** |" in text
    assert "Time: the 18 final runs took 25.0 min of lockstep training in all" in text
    assert text.index("## Students pruned from the teacher") < text.index("## Captioning")


def test_the_positional_escape_is_the_first_step_each_positional_type_reaches_80_percent():
    compare = load_script("compare_methods")
    curve = [[250, {"left_half": 0.48, "top_half": 0.43, "left_of": 0.53, "shape": 0.9}],
             [500, {"left_half": 0.91, "top_half": 0.50, "left_of": 0.79, "shape": 1.0}],
             [750, {"left_half": 0.70, "top_half": 0.50, "left_of": 0.80, "shape": 1.0}]]  # a dip after 80 % does not undo it
    record = {"type_curve": curve, "test": {"accuracy": 0.8, "per_type": {"left_half": 0.98, "top_half": 0.65, "left_of": 0.89}}}
    assert compare.positional_escape(record) == {"first_step": {"left_half": 500, "top_half": None, "left_of": 750},
                                                 "test": {"left_half": 0.98, "top_half": 0.65, "left_of": 0.89}, "escaped": False}
    record["test"]["per_type"]["top_half"] = 0.8
    assert compare.positional_escape(record)["escaped"] is True
    assert compare.positional_escape({"curve": [[250, 0.7]], "test": {"accuracy": 0.7}}) is None  # logged before question types


def test_the_results_page_counts_the_seeds_that_learned_to_read_positions():
    page = load_script("results_page")
    results = _results({"logit_kd": {"4": [0.7, 0.8, 0.84]}, "amad_t1": {"4": [0.71, 0.83, 0.84]}})
    learned = {"first_step": {"left_half": 1250, "top_half": 3000, "left_of": 1500}, "test": {}, "escaped": True}
    half = {"first_step": {"left_half": 1750, "top_half": None, "left_of": 2000}, "test": {}, "escaped": False}
    results["positional"] = {"logit_kd": {"4": [None, half, learned]}, "amad_t1": {"4": [None, None, None]}}
    lines = page.positional_rows(results)
    assert "| logit_kd | 1 of 2 | n/a | 1,750 / — / 2,000 | 1,250 / 3,000 / 1,500 |" in lines
    assert "| amad_t1 | n/a | n/a | n/a | n/a |" in lines
    assert page.positional_rows({**results, "positional": {"amad_t1": {"4": [None, None, None]}}}) == []  # nothing logged: no table


def test_the_results_page_shows_every_tuning_candidate_by_weight_with_the_chosen_one_in_bold():
    page = load_script("results_page")
    results = _results({"logit_kd": {"4": [0.80]}, "amad_tuned": {"4": [0.82]}})
    results["params"] = {"logit_kd": {"4": {}}, "amad_tuned": {"4": {"attention_weight": 0.25, "amad_temperature": 0.1}}}
    results["tuning"] = {"seed": 0, "weights": [0.25, 1.0, 4.0], "temperatures": [0.1, 0.3], "train_seconds": 600.0,
                         "chosen": {"4": {"amad_tuned": {"attention_weight": 0.25, "amad_temperature": 0.1}}},
                         "candidates": {"4": {"amad_tuned": [  # logged in finishing order, not the grid's
                             {"params": {"attention_weight": 4.0, "amad_temperature": 0.1}, "val_accuracy": 0.7, "curve": []},
                             {"params": {"attention_weight": 0.25, "amad_temperature": 0.1}, "val_accuracy": 0.765, "curve": []},
                             {"params": {"attention_weight": 1.0, "amad_temperature": 0.3}, "val_accuracy": 0.7085, "curve": []}]}}}
    text = "\n".join(page.regime_section(results))
    assert "Tuning, 4 heads: validation accuracy of each candidate after the whole budget (seed 0, " in text
    assert "| amad_tuned | **w 0.25, τ 0.1: 76.50%**; w 1, τ 0.3: 70.85%; w 4, τ 0.1: 70.00% |" in text
    assert "10 min of lockstep training for the candidates at 4 heads):" in text
    # the tuning's minutes cover every head count tuned under the run key, not only the page's columns
    results["tuning"]["candidates"].update({"6": {}, "2": {}})
    assert "10 min of lockstep training for the candidates at 2, 4 and 6 heads):" in "\n".join(page.regime_section(results))
    del results["tuning"]["candidates"]  # a tuning file from before candidates were kept: settings only, no table
    text = "\n".join(page.regime_section(results))
    assert "Tuning, 4 heads" not in text and "10 min of lockstep training):" in text


def test_the_committed_results_page_is_what_the_generator_writes_from_the_committed_json(tmp_path):
    """docs/results.md is generated: regenerating it from benchmarks/results/ changes nothing."""
    page = load_script("results_page")
    sources = [path for path in page.DEFAULT_SOURCES if path.is_file()]
    assert sources, "no committed comparison results"
    import json

    page.write_page(tmp_path / "results.md", [json.loads(path.read_text()) for path in sources])
    assert (tmp_path / "results.md").read_text() == page.DEFAULT_MD.read_text()


# ---------------------------------------------------------------- the tuning as an `amad sweep`


def test_the_claim_sweep_yaml_is_the_benchmarks_tuning_grid_case_for_case():
    """tune_configs/claim/sweep.yaml searches exactly the candidates compare_methods.py tunes (weights 0.25 1 4,
    temperatures 0.1 0.3), each case giving the objective the script builds for that arm, field by field (a
    field a case and the script leave unset must be the objective's default), over the same students and
    optimiser; and every one of its 69 trials is a valid job for the committed teacher."""
    import inspect
    import json

    from pipeline.config import DistillJobConfig, load_config, parse_config
    from pipeline.sweep import check_sweep
    from pipeline.sweep_config import SweepConfig

    compare = load_script("compare_methods")
    cfg = load_config(Path(__file__).resolve().parents[1] / "tune_configs" / "claim" / "sweep.yaml", SweepConfig)
    args = compare.parse_args(["--start", "pruned"])
    defaults = {name: p.default for name, p in inspect.signature(DistillationObjective).parameters.items() if name != "head_origins"}

    def as_objective(settings: dict) -> dict:
        return {name: tuple(v) if isinstance(v, list) else v for name, v in {**defaults, **settings}.items() if name in defaults}

    wanted = {}
    for arm in compare.ARMS:
        for params in compare.candidates(arm, [0.25, 1.0, 4.0], [0.1, 0.3], args.sweep_temperature):
            settings = compare.objective_settings(arm, params, relation_heads=compare.relation_heads_for(96, 96), normalization=args.normalization)
            wanted[(arm, json.dumps(params, sort_keys=True))] = as_objective(settings)
    found = {}
    for label in cfg.space["arm"].cases:
        job = parse_config(cfg.trial_job({"arm": label, "student.heads": 4}), DistillJobConfig, label)
        objective = as_objective(job.objective.model_dump())
        matches = [key for key, settings in wanted.items() if settings == objective]
        assert len(matches) == 1, (label, objective)
        assert label.startswith(matches[0][0]), label  # the label names its arm
        found[matches[0]] = label
    assert set(found) == set(wanted) and len(cfg.space["arm"].cases) == len(wanted) == 23

    assert cfg.space["student.heads"].grid == [2, 4, 6] and cfg.scheduler.type == "fifo" and cfg.search.num_samples == 1
    student, train = cfg.job.student, cfg.job.train
    assert (student.init, student.layers, student.ffn_keep, student.importance_examples) == ("pruned", 2, 1.0, args.importance_examples)
    assert train.batch_size * cfg.job.scaling.num_workers == args.batch_size and (train.lr, train.warmup_steps) == (args.lr, args.warmup)
    assert (train.min_lr_ratio, train.weight_decay, train.grad_clip) == (0.1, 0.01, 1.0)  # benchmarks/lockstep.py's schedule and optimiser
    teacher = check_sweep(cfg)
    # the budget a trial gets, as its header states it (a sweep counts epochs, the script steps)
    questions = teacher.data.train_scenes * teacher.data.questions_per_scene
    steps = cfg.max_epochs * ((questions // cfg.job.scaling.num_workers) // (train.batch_size))
    header = (Path(__file__).resolve().parents[1] / "tune_configs" / "claim" / "sweep.yaml").read_text()
    assert steps == 4686 and f"3 x {steps // 3:,} = {steps:,} steps of 64" in header
