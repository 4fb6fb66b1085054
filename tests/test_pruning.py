"""amad.pruning: Michel head importance, FFN importance, pruning that removes weights, persistence, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from amad.data.benchmark import BenchmarkSpec, benchmark_tokenizer, make_split
from amad.models import PRUNING_KEY, ViltAdapter, head_counts, shape_summary
from amad.pruning import Importance, origins, parameter_count, plan, prune, prune_from_plan, score

HIDDEN, HEADS, LAYERS, FFN = 48, 6, 3, 96
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(scope="module")
def split():
    return make_split(BenchmarkSpec(train_scenes=8, val_scenes=2, test_scenes=2), "train", benchmark_tokenizer())


@pytest.fixture(scope="module")
def batch(split):
    return split.batch(torch.arange(6))


@pytest.fixture(scope="module")
def teacher(split):
    config = ViltAdapter.teacher_config(
        vocab_size=benchmark_tokenizer().get_vocab_size(), answers=split.answers, image_size=48, patch_size=8,
        max_text_length=16, hidden_size=HIDDEN, heads=HEADS, layers=LAYERS, intermediate_size=FFN,
    )
    return ViltAdapter.build(config, seed=0).eval()


@pytest.fixture(scope="module")
def importance(teacher, split):
    return score(teacher, split.subset(torch.arange(40)).batches(16))


def _logits(model, batch):
    with torch.no_grad():
        return ViltAdapter.forward(model.eval(), batch).logits


def test_pruning_to_every_head_layer_and_neuron_is_the_teacher(teacher, batch):
    full = prune(teacher, {})
    with torch.no_grad():
        t_out, f_out = ViltAdapter.forward(teacher, batch), ViltAdapter.forward(full.eval(), batch)
    assert torch.equal(t_out.logits, f_out.logits)
    assert all(torch.equal(a, b) for a, b in zip(t_out.attentions["self"], f_out.attentions["self"]))
    assert parameter_count(full) == parameter_count(teacher)


def test_kept_heads_see_the_same_inputs_and_give_the_teachers_maps(teacher, batch):
    """Layer 0 gets identical inputs, so its kept heads' maps are the teacher's; for every layer, the
    pruned attention module on the teacher's own hidden states gives the teacher's maps of the kept heads."""
    keep = {0: [1, 4], 1: [0, 2, 5], 2: [3]}
    pruned = prune(teacher, keep).eval()
    with torch.no_grad():
        t_out, p_out = ViltAdapter.forward(teacher, batch), ViltAdapter.forward(pruned, batch)
        torch.testing.assert_close(p_out.attentions["self"][0], t_out.attentions["self"][0][:, keep[0]], rtol=0, atol=1e-7)
        inputs = {}  # what each teacher self-attention module was called with
        handles = [layer.attention.attention.register_forward_pre_hook(
            lambda _m, args, kwargs, index=index: inputs.__setitem__(index, (args, kwargs)), with_kwargs=True)
            for index, layer in enumerate(teacher.vilt.encoder.layer)]
        try:
            ViltAdapter.forward(teacher, batch)
        finally:
            for handle in handles:
                handle.remove()
        for layer, heads in keep.items():
            args, kwargs = inputs[layer]
            kwargs = {**kwargs, "output_attentions": True}
            if len(args) > 2:
                args = args[:2]
            _, t_maps = teacher.vilt.encoder.layer[layer].attention.attention(*args, **kwargs)
            _, p_maps = pruned.vilt.encoder.layer[layer].attention.attention(*args, **kwargs)
            torch.testing.assert_close(p_maps, t_maps[:, heads], rtol=0, atol=1e-7)


def test_a_zero_gate_is_the_same_as_pruning_that_head(teacher, batch):
    layer, head = 1, 4

    def zero_head(_module, _inputs, output):
        context = output[0].clone()
        context[..., head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
        return (context, *output[1:])

    handle = teacher.vilt.encoder.layer[layer].attention.attention.register_forward_hook(zero_head)
    try:
        gated = _logits(teacher, batch)
    finally:
        handle.remove()
    pruned = prune(teacher, {layer: [h for h in range(HEADS) if h != head]})
    torch.testing.assert_close(_logits(pruned, batch), gated, rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(teacher, batch), gated, atol=1e-6)  # the head mattered at all


def test_parameter_counts_are_the_ones_computed_by_hand(teacher, importance):
    kept = plan(importance, heads=2, layers=2, ffn_keep=0.5)
    pruned = prune_from_plan(teacher, kept)
    inner, width = 2 * HEAD_DIM, FFN // 2
    per_layer = (
        3 * (HIDDEN * inner + inner)      # query, key, value
        + inner * HIDDEN + HIDDEN         # attention output
        + HIDDEN * width + width          # FFN in
        + width * HIDDEN + HIDDEN         # FFN out
        + 2 * 2 * HIDDEN                  # two LayerNorms
    )
    teacher_layer = 3 * (HIDDEN * HIDDEN + HIDDEN) + HIDDEN * HIDDEN + HIDDEN + HIDDEN * FFN + FFN + FFN * HIDDEN + HIDDEN + 4 * HIDDEN
    assert parameter_count(pruned) == parameter_count(teacher) - LAYERS * teacher_layer + 2 * per_layer
    assert head_counts(pruned.config) == [2, 2]
    assert shape_summary(pruned.config) | {} == {
        "heads": 2, "heads_per_layer": [2, 2], "layers": 2, "hidden_size": HIDDEN, "intermediate_sizes": [width, width], "pruned": True,
    }


def test_the_plan_keeps_the_most_important_heads_of_uniformly_chosen_layers(importance):
    kept = plan(importance, heads=2, layers=2, ffn_keep=0.25)
    assert kept.teacher_layers == [1, 2]  # the uniform layer map of 3 -> 2: round(1.5) - 1, round(3) - 1
    for student_layer, teacher_layer in enumerate(kept.teacher_layers):
        scores = importance.heads[teacher_layer]
        assert min(scores[kept.heads[student_layer]]) >= max(scores[[h for h in range(HEADS) if h not in kept.heads[student_layer]]])
        assert len(kept.neurons[student_layer]) == FFN // 4


def test_head_importance_is_l2_normalised_per_layer_and_zero_for_a_head_that_cannot_matter(teacher, split):
    silenced = ViltAdapter.build(teacher.config, seed=0).eval()
    silenced.load_state_dict(teacher.state_dict())  # a copy
    with torch.no_grad():  # head 3 of layer 1 writes nothing to the residual stream: its gradient is exactly 0
        silenced.vilt.encoder.layer[1].attention.output.dense.weight[:, 3 * HEAD_DIM : 4 * HEAD_DIM] = 0
        silenced.vilt.encoder.layer[2].intermediate.dense.weight[7] = 0  # neuron 7 of layer 2 sees only its bias
        silenced.vilt.encoder.layer[2].intermediate.dense.bias[7] = -20.0  # GELU(-20) = 0
    found = score(silenced, split.subset(torch.arange(32)).batches(16))
    assert found.heads.shape == (LAYERS, HEADS) and found.ffn.shape == (LAYERS, FFN) and found.examples == 32
    torch.testing.assert_close(found.heads.norm(dim=1), torch.ones(LAYERS))
    assert found.heads[1, 3] == 0 and (found.heads[1, [0, 1, 2, 4, 5]] > 0).all()
    assert found.ffn[2, 7] < 1e-6 < found.ffn[2].median()
    assert 7 not in plan(found, heads=HEADS, layers=LAYERS, ffn_keep=0.5).neurons[2]


def test_michel_importance_is_the_mean_absolute_per_example_gradient_of_the_gate(teacher, split):
    """Recomputed independently: one example at a time, with a scalar gate on one head."""
    examples = split.subset(torch.arange(4))
    found = score(teacher, examples.batches(4))
    layer = 2
    raw = torch.zeros(HEADS)
    for index in range(4):
        one = examples.batch(torch.tensor([index]))
        for head in range(HEADS):
            gate = torch.ones((), requires_grad=True)

            def hook(_module, _inputs, output, head=head, gate=gate):
                context = output[0]
                scale = torch.ones(context.shape[-1])
                scale = scale.index_put((torch.arange(head * HEAD_DIM, (head + 1) * HEAD_DIM),), gate.expand(HEAD_DIM))
                return (context * scale, *output[1:])

            handle = teacher.vilt.encoder.layer[layer].attention.attention.register_forward_hook(hook)
            try:
                logits = teacher(input_ids=one["input_ids"], attention_mask=one["attention_mask"], pixel_values=one["pixel_values"]).logits
                (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, one["labels"]), gate)
            finally:
                handle.remove()
            raw[head] += grad.abs() / 4
    torch.testing.assert_close(found.heads[layer], raw / raw.norm(), rtol=1e-4, atol=1e-6)


def test_save_and_load_give_identical_logits_and_the_origins_survive(teacher, importance, batch, tmp_path):
    pruned = prune_from_plan(teacher, plan(importance, heads=3, layers=2, ffn_keep=0.5))
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())[PRUNING_KEY]
    assert saved["teacher_layers"] == [1, 2] and [len(h) for h in saved["heads"]] == [3, 3]
    loaded = ViltAdapter.load(tmp_path)
    assert torch.equal(_logits(loaded, batch), _logits(pruned, batch))
    assert origins(loaded) == [[(1, h) for h in saved["heads"][0]], [(2, h) for h in saved["heads"][1]]]
    assert origins(teacher)[1] == [(1, h) for h in range(HEADS)]


def test_a_pruning_record_that_does_not_match_the_weights_is_a_clear_error(teacher, tmp_path):
    pruned = prune(teacher, {0: [0, 1], 1: [2, 3], 2: [4, 5]})
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[PRUNING_KEY]["heads"][1] = [2, 3, 4]  # three heads recorded, weights for two
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit config.json \(vilt.encoder.layer.1.attention.attention.key.bias: saved \(16,\), config.json builds \(24,\)"):
        ViltAdapter.load(tmp_path)
    config[PRUNING_KEY]["heads"][1] = [2, 9]  # a head the teacher never had
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"amad_pruning.heads\[1\]=\[2, 9\]: need distinct head indices in \[0, 6\)"):
        ViltAdapter.load(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": 7, "layers": 2}, r"student.heads=7: a pruned student keeps 1 to 6"),
        ({"heads": 2, "layers": 4}, r"student.layers=4: a pruned student keeps 1 to 3"),
        ({"heads": 2, "layers": 2, "ffn_keep": 0.0}, r"student.ffn_keep=0.0: .* must be in \(0, 1\]"),
        ({"heads": 2, "layers": 2, "ffn_keep": 1.5}, r"student.ffn_keep=1.5"),
    ],
)
def test_impossible_plans_name_the_setting(importance, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(importance, **kwargs)


def test_pruning_a_pruned_model_or_scoring_one_is_refused(teacher, split):
    pruned = prune(teacher, {0: [0]})
    with pytest.raises(ValueError, match="unpruned model"):
        prune(pruned, {})
    with pytest.raises(ValueError, match="unpruned model"):
        score(pruned, split.batches(8))


def test_importance_round_trips_through_a_dict(importance):
    again = Importance.from_dict(json.loads(json.dumps(importance.to_dict())))
    assert torch.equal(again.heads, importance.heads) and torch.equal(again.ffn, importance.ffn) and again.examples == importance.examples


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_pruned_student_exports_to_onnx_within_parity(teacher, importance, split, tmp_path, exporter):
    from pipeline import onnx_tools

    pruned = prune_from_plan(teacher, plan(importance, heads=2, layers=2, ffn_keep=0.5)).eval()
    example = split.batch(torch.arange(2))
    path = onnx_tools.export_onnx(pruned, tmp_path / "pruned.onnx", example, exporter=exporter)
    session = onnx_tools.open_session(path)
    batches = [split.batch(torch.arange(start, start + 8)) for start in (0, 8)]
    difference = np.abs(onnx_tools.ort_logits(session, batches) - onnx_tools.torch_logits(pruned, batches)).max()
    assert difference <= 1e-4, difference


def test_a_teacher_whose_attention_output_bypasses_the_gate_cannot_be_scored(teacher, split):
    """If a layer's gated self-attention output does not reach the logits (an attention
    implementation that computes its output elsewhere), scoring fails naming the layer, instead of
    ranking that layer's heads by zeros."""
    import copy

    bypassing = copy.deepcopy(teacher)
    handle = bypassing.vilt.encoder.layer[1].attention.output.register_forward_hook(lambda _m, _i, output: output.detach())
    with pytest.raises(ValueError, match=r"cannot score the teacher's heads: the self-attention output of layer\(s\) \[1\]"):
        score(bypassing, split.subset(torch.arange(8)).batches(8))
    handle.remove()
    assert score(bypassing, split.subset(torch.arange(8)).batches(8)).heads.shape == (LAYERS, HEADS)
