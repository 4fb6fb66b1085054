"""Tests for amad.objective.

Expected values are pinned constants or come from small naive float64 references written here
(independent of amad.losses), so a wiring bug and a loss bug cannot cancel out.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amad.objective import DistillationObjective, resolve_layer_map
from amad.outputs import QKV, VLOutputs

torch.set_num_threads(1)
EPS = 1e-8
B, C, Q, K = 2, 5, 4, 6


# ------------------------------------------------------------------------------------------
# Fake outputs and naive references
# ------------------------------------------------------------------------------------------


def fake_outputs(gen, *, heads, layers, kinds=("self",), hidden=None, grad=False):
    """VLOutputs from random tensors; ``layers`` is an int or {kind: count}."""
    counts = layers if isinstance(layers, dict) else {k: layers for k in kinds}

    def leaf(x):
        return x.requires_grad_() if grad else x

    def attn():
        return leaf(
            torch.softmax(2 * torch.randn(B, heads, Q, K, generator=gen, dtype=torch.float64), -1)
        )

    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    qkv = {}
    if hidden is not None:
        qkv = {
            k: [
                QKV(
                    *(
                        leaf(torch.randn(B, Q, hidden, generator=gen, dtype=torch.float64))
                        for _ in range(3)
                    )
                )
                for _ in range(n)
            ]
            for k, n in counts.items()
        }
    return VLOutputs(
        logits=leaf(torch.randn(B, C, generator=gen, dtype=torch.float64)),
        attentions={k: [attn() for _ in range(n)] for k, n in counts.items()},
        query_masks={k: mask for k in counts},
        key_masks={k: mask for k in counts},
        qkv=qkv,
    )


def naive_row_kl(p, q):
    return sum(p[k] * (math.log(p[k] + EPS) - math.log(q[k] + EPS)) for k in range(len(p)))


def naive_amad(T, S, mask, temperature=1.0):
    """KL variant, float: sum over teacher heads, mean over valid rows and batch (paper Eq. 9)."""
    T, S = T.detach().tolist(), S.detach().tolist()
    total = 0.0
    for b in range(len(T)):
        rows = [q for q in range(len(mask[b])) if mask[b][q]]
        flat_t = [[v for q in rows for v in head[q]] for head in T[b]]
        flat_s = [[v for q in rows for v in head[q]] for head in S[b]]
        norm = [math.sqrt(sum(v * v for v in x)) for x in flat_t + flat_s]
        nt = norm[: len(flat_t)]
        ns = norm[len(flat_t) :]
        for i, t in enumerate(flat_t):
            cos = [
                sum(x * y for x, y in zip(t, s, strict=True)) / (nt[i] * ns[j])
                for j, s in enumerate(flat_s)
            ]
            e = [math.exp(c / temperature) for c in cos]
            a = [x / sum(e) for x in e]
            kl = 0.0
            for q in rows:
                m = [
                    sum(a[j] * S[b][j][q][k] for j in range(len(a))) for k in range(len(T[b][i][q]))
                ]
                kl += naive_row_kl(T[b][i][q], m)
            total += kl / len(rows)
    return total / len(T)


def naive_head_mean(T, S, mask):
    total = 0.0
    for b in range(T.shape[0]):
        rows = [q for q in range(T.shape[2]) if mask[b, q]]
        tm, sm = T[b].mean(0).tolist(), S[b].mean(0).tolist()
        total += sum(naive_row_kl(tm[q], sm[q]) for q in rows) / len(rows)
    return total / T.shape[0]


def naive_one_to_one(T, S, mask):
    total = 0.0
    for b in range(T.shape[0]):
        rows = [q for q in range(T.shape[2]) if mask[b, q]]
        for k in range(S.shape[1]):
            t, s = T[b, k].tolist(), S[b, k].tolist()
            total += sum(naive_row_kl(t[q], s[q]) for q in rows) / len(rows)
    return total / T.shape[0]


def naive_ce(logits, labels):
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return total / len(labels)


def naive_kd(s, t, T):
    total = 0.0
    for rs, rt in zip(s.tolist(), t.tolist(), strict=True):
        ps = [math.exp(v / T) for v in rs]
        pt = [math.exp(v / T) for v in rt]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    return total * T * T / len(s.tolist())


LABELS = torch.tensor([1, 3])


# ------------------------------------------------------------------------------------------
# Layer maps
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lt, ls, want",
    [
        (4, 2, [(0, 1), (1, 3)]),
        (12, 6, [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]),
        (12, 4, [(0, 2), (1, 5), (2, 8), (3, 11)]),
        (6, 4, [(0, 1), (1, 2), (2, 4), (3, 5)]),  # halves (1.5, 4.5) round up
        (3, 3, [(0, 0), (1, 1), (2, 2)]),
        (2, 4, [(0, 0), (1, 0), (2, 1), (3, 1)]),  # student deeper than teacher
        (1, 3, [(0, 0), (1, 0), (2, 0)]),
    ],
)
def test_uniform_layer_map_pinned(lt, ls, want):
    assert resolve_layer_map("uniform", lt, ls) == want


@settings(max_examples=50, deadline=None)
@given(lt=st.integers(1, 48), ls=st.integers(1, 48))
def test_uniform_layer_map_is_monotone_in_range_and_ends_at_last(lt, ls):
    pairs = resolve_layer_map("uniform", lt, ls)
    assert [s for s, _ in pairs] == list(range(ls))
    teachers = [t for _, t in pairs]
    assert all(0 <= t < lt for t in teachers)
    assert teachers == sorted(teachers)
    assert teachers[-1] == lt - 1


def test_last_and_explicit_layer_maps():
    assert resolve_layer_map("last", 12, 4) == [(3, 11)]
    assert resolve_layer_map([(0, 5), (3, 11)], 12, 4) == [(0, 5), (3, 11)]
    assert resolve_layer_map([[1, 2]], 3, 2) == [(1, 2)]


@pytest.mark.parametrize("pair", [(4, 0), (0, 12), (-1, 0)])
def test_layer_map_out_of_range(pair):
    with pytest.raises(
        ValueError, match=rf"\(student={pair[0]}, teacher={pair[1]}\).*4 layers.*teacher 12"
    ):
        resolve_layer_map([pair], 12, 4)


@pytest.mark.parametrize("bad", ["middle", [], [(0,)], [(0, 1.0)]])
def test_layer_map_bad_values(bad):
    with pytest.raises(ValueError, match="layer_map"):
        resolve_layer_map(bad, 4, 2)
    with pytest.raises(ValueError, match="layer_map"):
        DistillationObjective(layer_map=bad)


# ------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------


def test_weights_combine_and_components_match_naive():
    gen = torch.Generator().manual_seed(0)
    teacher = fake_outputs(gen, heads=4, layers=4)
    student = fake_outputs(gen, heads=2, layers=2)
    obj = DistillationObjective(
        task_weight=0.3,
        logit_kd_weight=0.7,
        attention_weight=2.0,
        logit_temperature=3.0,
        method="amad",
        layer_map="uniform",
    )
    out = obj(teacher, student, LABELS)
    assert set(out) == {"loss", "task", "logit_kd", "attention"}
    assert all(v.shape == () for v in out.values())
    mask = student.query_masks["self"]
    want_task = naive_ce(student.logits, LABELS)
    want_kd = naive_kd(student.logits, teacher.logits, 3.0)
    t, s = teacher.attentions["self"], student.attentions["self"]
    want_attn = (naive_amad(t[1], s[0], mask) + naive_amad(t[3], s[1], mask)) / 2  # uniform 4->2
    assert out["task"].item() == pytest.approx(want_task, rel=1e-9)
    assert out["logit_kd"].item() == pytest.approx(want_kd, rel=1e-9)
    assert out["attention"].item() == pytest.approx(want_attn, rel=1e-7)
    assert out["loss"].item() == pytest.approx(
        0.3 * want_task + 0.7 * want_kd + 2.0 * want_attn, rel=1e-7
    )


def test_last_map_amad_temperature_and_two_kinds():
    gen = torch.Generator().manual_seed(1)
    kinds = ("self", "cross")
    teacher = fake_outputs(gen, heads=3, layers={"self": 3, "cross": 2})
    student = fake_outputs(gen, heads=2, layers={"self": 2, "cross": 1})
    obj = DistillationObjective(method="amad", kinds=kinds, layer_map="last", amad_temperature=0.5)
    got = obj(teacher, student, LABELS)["attention"].item()
    mask = student.query_masks["self"]
    want = (
        naive_amad(teacher.attentions["self"][2], student.attentions["self"][1], mask, 0.5)
        + naive_amad(teacher.attentions["cross"][1], student.attentions["cross"][0], mask, 0.5)
    ) / 2
    assert got == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize(
    "method, naive", [("head_mean", naive_head_mean), ("one_to_one", naive_one_to_one)]
)
def test_baseline_methods_with_explicit_map(method, naive):
    gen = torch.Generator().manual_seed(2)
    teacher = fake_outputs(gen, heads=3, layers=3)
    student = fake_outputs(gen, heads=2, layers=2)
    obj = DistillationObjective(method=method, layer_map=[(0, 0), (1, 2), (1, 1)])
    t, s = teacher.attentions["self"], student.attentions["self"]
    mask = student.query_masks["self"]
    want = (naive(t[0], s[0], mask) + naive(t[2], s[1], mask) + naive(t[1], s[1], mask)) / 3
    assert obj(teacher, student, LABELS)["attention"].item() == pytest.approx(want, rel=1e-9)


def test_student_query_mask_is_used():
    gen = torch.Generator().manual_seed(3)
    teacher = fake_outputs(gen, heads=2, layers=1)
    student = fake_outputs(gen, heads=2, layers=1)
    obj = DistillationObjective(method="head_mean")
    base = obj(teacher, student, LABELS)["attention"]
    # The student's mask hides row 3 of element 0; garbage there must not matter, and the
    # teacher's own mask entry is not consulted.
    teacher.attentions["self"][0][0, :, 3] = torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    student.attentions["self"][0][0, :, 3] = torch.tensor([0.0, 0, 0, 0, 0, 1], dtype=torch.float64)
    teacher.query_masks["self"] = torch.ones(B, Q, dtype=torch.bool)
    torch.testing.assert_close(obj(teacher, student, LABELS)["attention"], base)


def test_relation_needs_qkv_and_works_with_it():
    gen = torch.Generator().manual_seed(4)
    obj = DistillationObjective(method="relation", relation_heads=2)
    assert obj.needs_qkv and not DistillationObjective().needs_qkv
    with pytest.raises(ValueError, match="need_qkv=True"):
        obj(fake_outputs(gen, heads=2, layers=2), fake_outputs(gen, heads=2, layers=2), LABELS)
    teacher = fake_outputs(gen, heads=4, layers=4, hidden=8)
    student = fake_outputs(gen, heads=2, layers=2, hidden=4)
    assert obj(teacher, student, LABELS)["attention"].item() > 1e-3
    # teacher layers 1 and 3 (uniform 4->2) replaced by the student's own projections -> zero
    teacher.qkv["self"][1], teacher.qkv["self"][3] = student.qkv["self"]
    assert abs(obj(teacher, student, LABELS)["attention"].item()) < 1e-12


def test_zero_weight_component_is_reported_without_graph_when_asked():
    gen = torch.Generator().manual_seed(5)
    teacher = fake_outputs(gen, heads=3, layers=2)
    student = fake_outputs(gen, heads=2, layers=2, grad=True)
    obj = DistillationObjective(
        task_weight=1.0, logit_kd_weight=0.0, attention_weight=0.0, report_zero_weight_terms=True
    )
    out = obj(teacher, student, LABELS)
    assert out["attention"].item() > 0 and out["logit_kd"].item() > 0
    assert not out["attention"].requires_grad and not out["logit_kd"].requires_grad
    assert out["loss"].item() == pytest.approx(naive_ce(student.logits, LABELS), rel=1e-9)
    out["loss"].backward()
    assert all(a.grad is None for a in student.attentions["self"])


class _CallCounter:
    """Wraps a loss function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("method", ["amad", "one_to_one", "head_mean", "relation"])
def test_zero_weight_component_is_not_computed_by_default(monkeypatch, method):
    import amad.objective as objective

    counters = {}
    names = ("logit_kd_loss", "amad_loss", "one_to_one_loss", "head_mean_loss", "relation_loss")
    for name in names:
        counters[name] = _CallCounter(getattr(objective, name))
        monkeypatch.setattr(objective, name, counters[name])
    gen = torch.Generator().manual_seed(10)
    hidden = 4 if method == "relation" else None
    teacher = fake_outputs(gen, heads=3, layers=2, hidden=hidden)
    student = fake_outputs(gen, heads=2, layers=2, hidden=hidden, grad=True)
    obj = DistillationObjective(
        logit_kd_weight=0.0, attention_weight=0.0, method=method, relation_heads=2
    )
    out = obj(teacher, student, LABELS)
    assert all(c.calls == 0 for c in counters.values()), {k: c.calls for k, c in counters.items()}
    for key in ("logit_kd", "attention"):
        assert out[key].shape == () and out[key].item() == 0.0 and not out[key].requires_grad
    assert out["loss"].item() == pytest.approx(naive_ce(student.logits, LABELS), rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["task"].item(), rel=1e-12)

    # Opting in computes them (once per layer pair for the attention loss), without a graph.
    loss_fn = {"amad": "amad_loss", "one_to_one": "one_to_one_loss", "head_mean": "head_mean_loss"}
    loss_fn = loss_fn.get(method, "relation_loss")
    reported = DistillationObjective(
        logit_kd_weight=0.0,
        attention_weight=0.0,
        method=method,
        relation_heads=2,
        report_zero_weight_terms=True,
    )(teacher, student, LABELS)
    assert counters["logit_kd_loss"].calls == 1 and counters[loss_fn].calls == 2
    assert reported["logit_kd"].item() > 0 and reported["attention"].item() > 0
    assert not reported["logit_kd"].requires_grad and not reported["attention"].requires_grad
    assert reported["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-12)

    # A zero task weight is reported as 0 too.
    no_task = DistillationObjective(task_weight=0.0, method=method, relation_heads=2)
    assert no_task(teacher, student, LABELS)["task"].item() == 0.0


def test_teacher_may_be_none_only_when_no_term_needs_it():
    gen = torch.Generator().manual_seed(11)
    teacher = fake_outputs(gen, heads=3, layers=2)
    student = fake_outputs(gen, heads=2, layers=2, grad=True)
    task_only = DistillationObjective(logit_kd_weight=0.0, attention_weight=0.0)
    assert not task_only.needs_teacher
    out = task_only(None, student, LABELS)
    assert out["loss"].item() == pytest.approx(naive_ce(student.logits, LABELS), rel=1e-9)
    assert out["logit_kd"].item() == 0.0 and out["attention"].item() == 0.0
    out["loss"].backward()
    assert student.logits.grad is not None
    # Reporting zero-weight terms needs the teacher: without one they stay 0.
    reporting = DistillationObjective(
        logit_kd_weight=0.0, attention_weight=0.0, report_zero_weight_terms=True
    )
    out = reporting(None, student, LABELS)
    assert out["logit_kd"].item() == 0.0 and out["attention"].item() == 0.0
    assert reporting(teacher, student, LABELS)["attention"].item() > 0
    # method="none" reads no maps, so only the logit KD weight matters.
    none_method = DistillationObjective(method="none", logit_kd_weight=0.0, attention_weight=3.0)
    assert not none_method.needs_teacher
    assert none_method(None, student, LABELS)["attention"].item() == 0.0

    for kwargs in (
        dict(attention_weight=0.0),  # logit KD needs the teacher's logits
        dict(logit_kd_weight=0.0),  # AMAD needs the teacher's maps
        dict(logit_kd_weight=0.0, method="one_to_one"),
        dict(logit_kd_weight=0.0, method="relation", relation_heads=2),
    ):
        obj = DistillationObjective(**kwargs)
        assert obj.needs_teacher
        with pytest.raises(ValueError, match="teacher is None"):
            obj(None, student, LABELS)


def test_labels_none_needs_zero_task_weight():
    gen = torch.Generator().manual_seed(6)
    teacher, student = fake_outputs(gen, heads=2, layers=1), fake_outputs(gen, heads=2, layers=1)
    with pytest.raises(ValueError, match="labels"):
        DistillationObjective()(teacher, student, None)
    out = DistillationObjective(task_weight=0.0)(teacher, student, None)
    assert out["task"].item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        DistillationObjective()(teacher, student, torch.tensor([0.5, 1.0]))


def test_teacher_is_treated_as_constant():
    gen = torch.Generator().manual_seed(7)
    for method, hidden in (("amad", None), ("one_to_one", None), ("relation", 4)):
        teacher = fake_outputs(gen, heads=2, layers=2, hidden=hidden, grad=True)
        student = fake_outputs(gen, heads=2, layers=2, hidden=hidden, grad=True)
        obj = DistillationObjective(method=method, relation_heads=2)
        obj(teacher, student, LABELS)["loss"].backward()
        leaves = [teacher.logits, *teacher.attentions["self"]]
        leaves += [x for q in teacher.qkv.get("self", []) for x in (q.query, q.key, q.value)]
        assert all(x.grad is None for x in leaves), method
        assert student.logits.grad is not None


def test_method_none_gives_zero_attention():
    gen = torch.Generator().manual_seed(8)
    teacher, student = fake_outputs(gen, heads=2, layers=1), fake_outputs(gen, heads=2, layers=1)
    out = DistillationObjective(method="none", attention_weight=5.0)(teacher, student, LABELS)
    assert out["attention"].item() == 0.0
    assert out["loss"].item() == pytest.approx(
        out["task"].item() + out["logit_kd"].item(), rel=1e-12
    )


def test_missing_kind_is_a_clear_error():
    gen = torch.Generator().manual_seed(9)
    teacher, student = fake_outputs(gen, heads=2, layers=1), fake_outputs(gen, heads=2, layers=1)
    with pytest.raises(ValueError, match="'cross'"):
        DistillationObjective(kinds=("cross",))(teacher, student, LABELS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="attention"), "method"),
        (dict(method="relation"), "relation_heads"),
        (dict(method="relation", relation_heads=0), "relation_heads"),
        (dict(task_weight=0, logit_kd_weight=0, attention_weight=0), "weight"),
        (dict(attention_weight=-1.0), "attention_weight"),
        (dict(logit_temperature=0.0), "logit_temperature"),
        (dict(amad_temperature=-2.0), "amad_temperature"),
        (dict(amad_variant="l1"), "amad_variant"),
        (dict(kinds=()), "kinds"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationObjective(**kwargs)
