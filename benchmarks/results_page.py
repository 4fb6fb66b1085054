"""The generated results page (``docs/results.md``) from ``benchmarks/compare_methods.py``'s JSON, one section per regime,
and from ``benchmarks/compare_captioning.py``'s (the captioning claim: test CIDEr-D instead of accuracy).

Regenerate without training anything (the JSON files hold every figure):

    .venv/bin/python benchmarks/results_page.py            # reads benchmarks/results/compare_{methods,captioning}*.json

The claim is checked per regime, head count and pair (AMAD arm, baseline): the paired difference of
test accuracy over seeds (the students of one seed start from the same weights and see the same
batches, so seed-to-seed variation cancels), its standard error, and a verdict only where the
difference exceeds two standard errors (:func:`verdict`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SOURCES = (RESULTS / "compare_methods_pruned.json", RESULTS / "compare_methods_pruned_4000steps.json", RESULTS / "compare_methods.json",
                   RESULTS / "compare_captioning.json", RESULTS / "compare_captioning_random.json")
DEFAULT_MD = ROOT / "docs" / "results.md"
BASELINES = ("one_to_one_origin", "one_to_one", "logit_kd")
REGIME_TITLES = {"pruned": "Students pruned from the teacher", "random": "Students from random weights"}


def paired_difference(a: list[float], b: list[float], scale: float = 100.0) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over seeds, in points (``scale`` 100; 1 keeps the units: CIDEr-D)
    (NaN error with one seed)."""
    diffs = [scale * (x - y) for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def verdict(mean: float, se: float) -> str:
    """``better``/``worse`` only beyond 2 standard errors; else ``no clear difference``."""
    if math.isnan(se):
        return "1 seed: no verdict"
    return "better" if mean > 2 * se else "worse" if mean < -2 * se else "no clear difference"


def amad_arms(results: dict) -> list[str]:
    return [arm for arm in results["accuracy"] if arm.startswith("amad")]


def verdicts(results: dict) -> dict[tuple[str, str, int], tuple[float, float, str]]:
    """``(amad_arm, baseline, heads) -> (mean, se, verdict)`` for every baseline the results hold."""
    accuracy, found = results["accuracy"], {}
    for arm in amad_arms(results):
        for baseline in (b for b in BASELINES if b in accuracy):
            for h in results["config"]["heads"]:
                mean, se = paired_difference(accuracy[arm][str(h)], accuracy[baseline][str(h)])
                found[(arm, baseline, h)] = (mean, se, verdict(mean, se))
    return found


def run_seconds(records) -> float:
    """The training time of these runs (one record each): every run's share of its lockstep group's wall
    time (the group's time over its students). A group whose runs serve two stages (a chosen candidate's
    tuning run is also its seed-0 final run) or that ``--group-size`` split is then counted right."""
    return sum(r["group_seconds"] / r["group_size"] for r in records)


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2%} ± {std:.2%}"


def _table(heads: list[int], rows: list[tuple[str, list[str]]], first: str) -> list[str]:
    lines = [f"| {first} | " + " | ".join(f"{h} heads" for h in heads) + " |", "| --- | " + " | ".join("---" for _ in heads) + " |"]
    return lines + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]


def title(results: dict) -> str:
    """The section title: the regime, its budget and its seeds."""
    config = results["config"]
    regime = REGIME_TITLES.get(results.get("regime", "random"), results.get("regime"))
    return f"{regime}: {config['steps']} steps, {len(config['seeds'])} seed(s)"


def verdict_summary(results: dict) -> list[str]:
    """One line per AMAD arm: where it beats, loses to or ties each baseline."""
    heads, lines = results["config"]["heads"], []
    found = verdicts(results)
    for arm in amad_arms(results):
        parts = []
        for baseline in (b for b in BASELINES if b in results["accuracy"]):
            cells = [f"{h} heads {found[(arm, baseline, h)][2]} ({found[(arm, baseline, h)][0]:+.2f} ± {found[(arm, baseline, h)][1]:.2f})"
                     for h in heads]
            parts.append(f"vs {baseline}: " + ", ".join(cells))
        lines.append(f"- **{arm}** " + "; ".join(parts) + ".")
    return lines


def curve_rows(results: dict, metric: str = "validation accuracy", shown=lambda v: f"{v:.2%}",
               gained=lambda d: f"{100 * d:+.2f} points") -> list[str]:
    """``metric`` (mean over seeds) at a quarter, half, three quarters and the end of the budget; ``shown`` formats a
    value and ``gained`` a difference (accuracy by default; CIDEr-D for the captioning claim)."""
    curves = results.get("curves")
    if not curves:
        return []
    heads, steps = results["config"]["heads"], results["config"]["steps"]
    lines = ["", f"Learning curves: {metric}, mean over seeds, at each quarter of the budget, and the gain over its "
                 "last quarter (a plateau shows as a gain near 0):", ""]
    for h in heads:
        lines += [f"{h} heads:", "", "| arm | " + " | ".join(f"step {steps * q // 4}" for q in (1, 2, 3, 4)) + " | last-quarter gain |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for arm, per_heads in curves.items():
            runs = per_heads[str(h)]

            def at(step: int) -> float:  # the last evaluation at or before ``step``, mean over seeds; NaN before the first
                return statistics.mean(max((p for p in run if p[0] <= step), key=lambda p: p[0], default=[0, float("nan")])[1] for run in runs)

            points = [at(steps * q // 4) for q in (1, 2, 3, 4)]
            gain = points[3] - points[2]
            lines.append(f"| {arm} | " + " | ".join("—" if math.isnan(p) else shown(p) for p in points)
                         + (" | — |" if math.isnan(gain) else f" | {gained(gain)} |"))
        lines.append("")
    return lines


def positional_rows(results: dict) -> list[str]:
    """Per head count and arm: how many seeds' students learned to read positions (every positional question type
    at >= 80 % on the test split), and per seed the first validation step at which each positional type reached
    80 % (``—``: never; ``n/a``: a run logged before the run log kept question types)."""
    positional = results.get("positional")
    if not positional or not any(run for per_heads in positional.values() for runs in per_heads.values() for run in runs):
        return []
    heads, seeds = results["config"]["heads"], results["config"]["seeds"]
    kinds = ("left_half", "top_half", "left_of")
    lines = ["", "Reading positions (the plateau: `left_half`, `top_half`, `left_of` at chance until a student learns them): "
                 "seeds whose student ends with all three at >= 80 % on the test split, and per seed the first validation step "
                 f"at which each reached 80 % ({' / '.join(kinds)}; — never, n/a not logged):", ""]
    for h in heads:
        lines += [f"{h} heads:", "", "| arm | learned all three | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
        for arm, per_heads in positional.items():
            runs = per_heads[str(h)]
            logged = [run for run in runs if run]
            learned = f"{sum(run['escaped'] for run in logged)} of {len(logged)}" if logged else "n/a"
            cells = ["n/a" if not run else " / ".join("—" if run["first_step"][k] is None else f"{run['first_step'][k]:,}" for k in kinds)
                     for run in runs]
            lines.append(f"| {arm} | {learned} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def alignment_rows(results: dict) -> list[str]:
    alignment = results.get("alignment") or {}
    if not alignment:
        peaks = results.get("alignment_peak") or {}  # results written before the alignment summary existed
        alignment = {arm: {h: [{"peak": v} for v in values] for h, values in per_heads.items()} for arm, per_heads in peaks.items()}
    if not alignment:
        return []
    keys = [("peak", "peak max_j a_ij"), ("kept_weight", "kept head on its own student head"), ("kept_top", "kept head's top is its own"),
            ("dropped_peak", "dropped head peak"), ("dropped_entropy", "dropped head spread (entropy / log Hs)")]
    lines = ["", "Alignment weights of the AMAD students on validation questions (mean over seeds; uniform over student heads "
                 "would give 1/Hs for weights and peaks, 1 for spread):", "",
             "| arm | heads (1/Hs) | " + " | ".join(title for _, title in keys) + " |", "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for arm, per_heads in alignment.items():
        for h, runs in per_heads.items():
            cells = []
            for key, _ in keys:
                values = [run[key] for run in runs if run and key in run]
                cells.append(f"{statistics.mean(values):.3f}" if values else "n/a")
            lines.append(f"| {arm} | {h} ({1 / int(h):.3f}) | " + " | ".join(cells) + " |")
    return lines


def regime_section(results: dict) -> list[str]:
    config, heads = results["config"], results["config"]["heads"]
    regime = results.get("regime", "random")
    teacher = results["teacher"]
    normalization = config.get("normalization", "sum")
    lines = [f"## {title(results)}", ""]
    lines += [(f"Command: `{results['command']}`" + (f" ({results['command_note']})" if results.get("command_note") else ""))
              if results.get("command") else "Command: not recorded in this JSON (written by an earlier version of the script)", ""]
    shape = (f"pruned from the teacher to {config['layers']} layers (its most important heads, the whole FFN)" if regime == "pruned"
             else f"{config['layers']} layers, head_dim {config['head_dim']}, random weights")
    lines += [
        f"Teacher: {config['teacher']} ({teacher['heads']} heads x {teacher['layers']} layers), test accuracy **{teacher['accuracy']:.2%}** "
        f"on the same {config['test_questions']} test questions"
        + (f" ({teacher['relational_accuracy']:.2%} on relational questions)." if teacher.get("relational_accuracy") is not None else "."),
        f"Students: {shape}; {config['steps']} steps of batch {config['batch_size']} per run (lr {config['lr']}); "
        f"{len(config['seeds'])} seed(s); attention terms normalised `{normalization}`"
        + (" (each a mean per aligned teacher target)" if normalization == "per_head" else " (the papers' sums over heads: not on one scale)") + ".",
        "", "Test accuracy, mean ± std over seeds:", "",
    ]
    lines += _table(heads, [(arm, [_mean_std(per_heads[str(h)]) for h in heads]) for arm, per_heads in results["accuracy"].items()], "arm")
    if results.get("relational_accuracy"):
        lines += ["", "Accuracy on relational questions only (where heads should matter), mean ± std over seeds:", ""]
        lines += _table(heads, [(arm, [_mean_std(per_heads[str(h)]) for h in heads]) for arm, per_heads in results["relational_accuracy"].items()], "arm")
    found = verdicts(results)
    if found:
        lines += ["", "AMAD minus each baseline, test accuracy points: mean ± standard error of the per-seed (paired) difference; "
                      "a verdict only beyond 2 standard errors:", ""]
        rows = []
        for arm in amad_arms(results):
            for baseline in (b for b in BASELINES if b in results["accuracy"]):
                rows.append((f"{arm} − {baseline}", [f"{found[(arm, baseline, h)][0]:+.2f} ± {found[(arm, baseline, h)][1]:.2f} ({found[(arm, baseline, h)][2]})"
                                                     if not math.isnan(found[(arm, baseline, h)][1]) else f"{found[(arm, baseline, h)][0]:+.2f} (1 seed: no error bar)"
                                                     for h in heads]))
        lines += _table(heads, rows, "comparison")
    if results.get("params"):
        tuning = results.get("tuning")
        how = (f"tuned on the validation split with seed {tuning['seed']}, {len(tuning['weights'])} candidates per arm "
               f"(attention weights {tuning['weights']}; amad_tuned pairs them with temperatures {tuning['temperatures']} in turn), "
               f"{tuning['train_seconds'] / 60:.0f} min of lockstep training{_tuned_heads(tuning)}" if tuning else "not tuned: attention weight 1 for every arm")
        lines += ["", f"Settings of each arm ({how}):", ""]
        lines += _table(heads, [(arm, [_settings(per_heads[str(h)]) for h in heads]) for arm, per_heads in results["params"].items()], "arm")
        lines += candidate_rows(results, evaluated_on=f"{config.get('val_questions', 'the')} validation questions")
    lines += curve_rows(results)
    lines += positional_rows(results)
    lines += alignment_rows(results)
    lines += time_rows(results, heads)
    return lines


def _tuned_heads(tuning: dict) -> str:
    """Which head counts the tuning's minutes cover: every head count tuned under the run key, which may be more
    than the page's columns. Empty for a tuning file from before candidates were kept."""
    tuned = sorted(tuning.get("candidates") or {}, key=int)
    if not tuned:
        return ""
    return f" for the candidates at {', '.join(tuned[:-1]) + ' and ' if len(tuned) > 1 else ''}{tuned[-1]} heads"


def time_rows(results: dict, heads: list[int]) -> list[str]:
    """The page's "Time" line. Threads and groups at a time are the last command's settings: reused runs may have been
    trained under others (the run log does not record them), so they are attributed to that command only."""
    config = results["config"]
    trained = (f"the {len(heads) * len(config['seeds']) * len(config['methods'])} final runs took {results['train_seconds'] / 60:.1f} min of "
               "lockstep training in all (each run's share of its group's wall time); " if results.get("train_seconds") is not None else "")
    return ["", f"Time: {trained}the command that wrote these figures ran {results['seconds'] / 60:.1f} min ({config['threads']} thread(s) "
                f"per group, {config['jobs']} group(s) at a time, {config['cpu_count']} CPUs, {config['machine']}) and reused "
                f"{results['reused_runs']} finished runs.", ""]


def is_captioning(results: dict) -> bool:
    return results.get("task") == "captioning"


def caption_baselines(arm: str) -> list[str]:
    """What an AMAD captioning arm (``amad_t1/all``) is compared with: one-to-one by origin and by index on the
    same kinds of maps, and logit KD."""
    scope = arm.split("/")[1]
    return [f"one_to_one_origin/{scope}", f"one_to_one/{scope}", "logit_kd"]


def caption_verdicts(results: dict) -> dict[tuple[str, str, int], tuple[float, float, str]]:
    """``(amad_arm, baseline, heads) -> (mean, se, verdict)`` of the paired test CIDEr-D difference (CIDEr-D units)."""
    cider, found = results["cider_d"], {}
    for arm in (a for a in cider if a.startswith("amad")):
        for baseline in (b for b in caption_baselines(arm) if b in cider):
            for h in results["config"]["heads"]:
                mean, se = paired_difference(cider[arm][str(h)], cider[baseline][str(h)], scale=1.0)
                found[(arm, baseline, h)] = (mean, se, verdict(mean, se))
    return found


CAPTION_REGIME_TITLES = {"pruned": "students pruned from the captioning teacher",
                         "random": "students of the pruned shapes from random weights"}


def caption_title(results: dict) -> str:
    config = results["config"]
    regime = CAPTION_REGIME_TITLES[results.get("regime", "pruned")]
    return f"Captioning, {regime}: {config['steps']} steps, {len(config['seeds'])} seed(s)"


def caption_verdict_summary(results: dict) -> list[str]:
    found, heads, lines = caption_verdicts(results), results["config"]["heads"], []
    for arm in (a for a in results["cider_d"] if a.startswith("amad")):
        parts = []
        for baseline in (b for b in caption_baselines(arm) if b in results["cider_d"]):
            cells = [f"{h} heads {found[(arm, baseline, h)][2]} ({found[(arm, baseline, h)][0]:+.3f} ± {found[(arm, baseline, h)][1]:.3f})" for h in heads]
            parts.append(f"vs {baseline}: " + ", ".join(cells))
        lines.append(f"- **{arm}** " + "; ".join(parts) + ".")
    return lines


def _mean_std_plain(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


def captioning_section(results: dict) -> list[str]:
    """The captioning claim (``benchmarks/compare_captioning.py``'s JSON): test CIDEr-D and BLEU-4 per arm and head
    count, AMAD minus each baseline on CIDEr-D with verdicts, the arms' settings and the time."""
    config, heads, teacher = results["config"], results["config"]["heads"], results["teacher"]
    shapes_only = (" (those shapes only: every weight random, drawn with the seed, which also orders the data)"
                   if results.get("regime") == "random" else "")
    lines = [f"## {caption_title(results)}", "", f"Command: `{results['command']}`", "",
             f"Teacher: {config['teacher']}, greedy test CIDEr-D **{teacher['cider_d']:.3f}**, BLEU-4 {100 * teacher['bleu_4']:.2f} "
             f"on the same {config['test_images']} test images. Students: pruned to {config['layers']} layers per stack, the most important "
             f"heads of each kind{shapes_only}; {config['steps']} steps of batch {config['batch_size']} (lr {config['lr']}); {len(config['seeds'])} seed(s). "
             "`/all` aligns encoder self-, decoder self- and cross-attention, `/cross` cross-attention only.", "",
             "Test CIDEr-D (greedy), mean ± std over seeds:", ""]
    lines += _table(heads, [(arm, [_mean_std_plain(per_heads[str(h)]) for h in heads]) for arm, per_heads in results["cider_d"].items()], "arm")
    lines += ["", "Test BLEU-4 (×100), mean ± std over seeds:", ""]
    lines += _table(heads, [(arm, [_mean_std_plain(per_heads[str(h)], 100, 2) for h in heads]) for arm, per_heads in results["bleu_4"].items()], "arm")
    found = caption_verdicts(results)
    if found:
        lines += ["", "AMAD minus each baseline, test CIDEr-D: mean ± standard error of the per-seed (paired) difference; a verdict "
                      "only beyond 2 standard errors:", ""]
        rows = [(f"{arm} − {baseline}", [f"{found[(arm, baseline, h)][0]:+.3f} ± {found[(arm, baseline, h)][1]:.3f} ({found[(arm, baseline, h)][2]})"
                                         if not math.isnan(found[(arm, baseline, h)][1]) else f"{found[(arm, baseline, h)][0]:+.3f} (1 seed: no error bar)"
                                         for h in heads])
                for arm in (a for a in results["cider_d"] if a.startswith("amad")) for baseline in caption_baselines(arm) if baseline in results["cider_d"]]
        lines += _table(heads, rows, "comparison")
    if results.get("params"):
        tuning = results.get("tuning")
        how = (f"tuned alike on validation CIDEr-D with seed {tuning['seed']}" if tuning else "not tuned: attention weight 1 for every arm")
        if tuning and tuning.get("train_seconds") is not None:
            how += f", {tuning['train_seconds'] / 60:.0f} min of lockstep training"
        lines += ["", f"Settings of each arm ({how}):", ""]
        lines += _table(heads, [(arm, [_settings(per_heads[str(h)]) for h in heads]) for arm, per_heads in results["params"].items()], "arm")
        lines += candidate_rows(results, "val_cider_d", lambda v: f"{v:.3f}", "validation CIDEr-D",
                                f"{config.get('val_images', 'the')} validation images")
    lines += curve_rows(results, "validation CIDEr-D (greedy)", lambda v: f"{v:.3f}", lambda d: f"{d:+.3f}")
    lines += time_rows(results, heads)
    return lines


def _settings(params: dict) -> str:
    return ", ".join(f"{k.replace('attention_weight', 'w').replace('amad_temperature', 'τ')} {v:g}" for k, v in params.items()) or "—"


def candidate_rows(results: dict, field: str = "val_accuracy", shown=lambda v: f"{v:.2%}", metric: str = "validation accuracy",
                   evaluated_on: str | None = None) -> list[str]:
    """The tuning behind an arm's settings: every candidate's ``field`` (its last evaluation, on the validation split) per
    head count, by attention weight (then temperature), the chosen one in bold. Tuning files written before candidates were kept give no rows."""
    tuning = results.get("tuning") or {}
    found = tuning.get("candidates")
    if not found:
        return []
    lines = []
    for h, per_arm in found.items():
        chosen = tuning["chosen"].get(h, {})
        lines += ["", f"Tuning, {h} heads: {metric} of each candidate after the whole budget (seed {tuning['seed']}"
                      + (f", {evaluated_on}" if evaluated_on else "") + "; chosen in bold):", "",
                  "| arm | candidates |", "| --- | --- |"]
        for arm, runs in per_arm.items():
            in_grid_order = sorted(runs, key=lambda r: (r["params"].get("attention_weight", 0.0), r["params"].get("amad_temperature", 0.0)))
            cells = [(f"**{_settings(r['params'])}: {shown(r[field])}**" if r["params"] == chosen.get(arm)
                      else f"{_settings(r['params'])}: {shown(r[field])}") for r in in_grid_order]
            lines.append(f"| {arm} | " + "; ".join(cells) + " |")
    return lines


def write_page(path: Path, regimes: list[dict]) -> None:
    """``docs/results.md`` from the results of each regime (pruned first, as ``DEFAULT_SOURCES`` orders them) and of the
    captioning claim (``benchmarks/compare_captioning.py``'s JSON, recognised by its ``task``)."""
    lines = ["<!-- generated by benchmarks/results_page.py from benchmarks/compare_methods.py's and compare_captioning.py's JSON: "
             "do not edit by hand -->",
             "# Distillation methods on the built-in benchmark", "",
             "Does AMAD beat the baselines? Per regime and head count (test accuracy, or CIDEr-D for captioning; paired over seeds, "
             "verdict only beyond 2 standard errors):", ""]
    for results in regimes:
        if is_captioning(results):
            lines += [f"{caption_title(results)}:", ""] + caption_verdict_summary(results) + [""]
        else:
            lines += [f"{title(results)}:", ""] + verdict_summary(results) + [""]
    for results in regimes:
        lines += captioning_section(results) if is_captioning(results) else regime_section(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=[str(p) for p in DEFAULT_SOURCES])
    parser.add_argument("--out", default=str(DEFAULT_MD))
    args = parser.parse_args(argv)
    found = [Path(p) for p in args.sources if Path(p).is_file()]
    if not found:
        sys.exit(f"no results to write a page from: none of {args.sources} exists (run benchmarks/compare_methods.py first)")
    write_page(Path(args.out), [json.loads(p.read_text()) for p in found])
    print(f"wrote {args.out} from {', '.join(map(str, found))}")


if __name__ == "__main__":
    main()
