"""Captioning students pruned from the teacher (issue 24): scores, plans, exact slicing, saving, origins."""

from __future__ import annotations

import json

import pytest
import torch

from amad.data.captions import caption_training_set, make_caption_split
from amad.losses import one_to_one_loss
from amad.models_ved import PRUNING_KEY, VedAdapter, decoder_layers, encoder_layers
from amad.objective import DistillationObjective
from amad.pruning_ved import VedPruningPlan, plan, prune_from_plan, recorded_origins, score
from test_ved import SPEC, TOKENIZER, tiny_config


@pytest.fixture(scope="module")
def teacher_and_batches():
    teacher = VedAdapter.build(tiny_config(heads=4, layers=2), seed=5).eval()
    data = caption_training_set(make_caption_split(SPEC, "train"), TOKENIZER, SPEC.max_caption_length)
    return teacher, [data.batch(torch.arange(i, i + 4)) for i in range(0, 12, 4)]


def _everything(teacher) -> VedPruningPlan:
    enc, dec = teacher.config.encoder, teacher.config.decoder
    heads = {"encoder": [list(range(enc.num_attention_heads))] * enc.num_hidden_layers,
             "decoder_self": [list(range(dec.num_attention_heads))] * dec.num_hidden_layers,
             "cross": [list(range(dec.num_attention_heads))] * dec.num_hidden_layers}
    neurons = {"encoder": [list(range(enc.intermediate_size))] * enc.num_hidden_layers,
               "decoder": [list(range(dec.intermediate_size))] * dec.num_hidden_layers}
    return VedPruningPlan(list(range(enc.num_hidden_layers)), list(range(dec.num_hidden_layers)), heads, neurons)


def test_scores_are_per_kind_and_l2_normalised_per_layer(teacher_and_batches):
    teacher, batches = teacher_and_batches
    importance = score(teacher, batches)
    assert set(importance.heads) == {"encoder", "decoder_self", "cross"} and importance.examples == 12
    for kind, heads in importance.heads.items():
        assert heads.shape == (2, 4) and torch.allclose(heads.norm(dim=1), torch.ones(2)), kind
    assert importance.ffn["encoder"].shape == (2, 128) and importance.ffn["decoder"].shape == (2, 128)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_keeping_everything_is_the_teacher_and_dropping_a_head_is_gating_it_to_zero(teacher_and_batches):
    teacher, batches = teacher_and_batches
    batch = batches[0]
    with torch.no_grad():
        reference = VedAdapter.forward(teacher, batch, need_attentions=False).logits
        whole = prune_from_plan(teacher, _everything(teacher)).eval()
        assert torch.allclose(VedAdapter.forward(whole, batch, need_attentions=False).logits, reference, atol=1e-5)
        # drop encoder head 1 of layer 0, decoder self head 2 of layer 1, cross head 0 of layer 0
        cut = _everything(teacher)
        heads = {kind: [list(h) for h in lists] for kind, lists in cut.heads.items()}
        heads["encoder"][0].remove(1)
        heads["decoder_self"][1].remove(2)
        heads["cross"][0].remove(0)
        pruned = prune_from_plan(teacher, VedPruningPlan(cut.encoder_layers, cut.decoder_layers, heads, cut.neurons)).eval()
        zeroed = {("encoder", 0): 1, ("decoder_self", 1): 2, ("cross", 0): 0}
        projections = {("encoder", 0): encoder_layers(teacher)[0].attention.o_proj,
                       ("decoder_self", 1): decoder_layers(teacher)[1].attention.output.dense,
                       ("cross", 0): decoder_layers(teacher)[0].crossattention.output.dense}
        handles = []
        for key, head in zeroed.items():
            def hook(_module, inputs, head=head):
                context = inputs[0].clone()
                context[..., head * 8:(head + 1) * 8] = 0  # head_dim 32 / 4
                return (context,)
            handles.append(projections[key].register_forward_pre_hook(hook))
        try:
            gated = VedAdapter.forward(teacher, batch, need_attentions=False).logits
        finally:
            for handle in handles:
                handle.remove()
        assert torch.allclose(VedAdapter.forward(pruned, batch, need_attentions=False).logits, gated, atol=1e-5)
        assert not torch.allclose(gated, reference, atol=1e-3)


def test_a_planned_student_saves_loads_and_records_its_origins(teacher_and_batches, tmp_path):
    teacher, batches = teacher_and_batches
    kept = plan(score(teacher, batches), heads=2, layers=1, ffn_keep=0.5)
    assert kept.encoder_layers == kept.decoder_layers == [1] and all(len(h[0]) == 2 for h in kept.heads.values())
    student = prune_from_plan(teacher, kept).eval()
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    student.save_pretrained(tmp_path / "s")
    loaded = VedAdapter.load(tmp_path / "s").eval()
    with torch.no_grad():
        out = VedAdapter.forward(loaded, batches[0])
        assert torch.equal(out.logits, VedAdapter.forward(student, batches[0]).logits)
    assert [m.shape[1] for kind in ("encoder_self", "decoder_self", "cross") for m in out.attentions[kind]] == [2, 2, 2]
    origins = recorded_origins(loaded)
    assert origins["cross"] == [[(1, h) for h in kept.heads["cross"][0]]]
    assert origins["encoder_self"] == [[(1, h) for h in kept.heads["encoder"][0]]]

    # one-to-one by origin: each kind's student heads learn the teacher heads they were cut from
    with torch.no_grad():
        t_out = VedAdapter.forward(teacher, batches[0])
    objective = DistillationObjective(method="one_to_one", one_to_one_pairing="origin", head_origins=origins,
                                      kinds=("encoder_self", "decoder_self", "cross"), task_weight=0.0, logit_kd_weight=0.0)
    expected = sum(one_to_one_loss(t_out.attentions[k][1], out.attentions[k][0], out.query_masks[k], teacher_heads=[h for _, h in origins[k][0]])
                   for k in ("encoder_self", "decoder_self", "cross")) / 3
    assert objective(t_out, out)["attention"].item() == pytest.approx(expected.item(), rel=1e-6)

    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config[PRUNING_KEY]["decoder"]["cross_heads"] = [[0, 9]]
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"amad_pruning.decoder.cross_heads\[0\]=\[0, 9\]: need distinct head indices in \[0, 4\)"):
        VedAdapter.load(tmp_path / "s")


def test_plans_that_cannot_be_met_and_unpruned_origins_are_named(teacher_and_batches):
    teacher, batches = teacher_and_batches
    importance = score(teacher, batches[:1])
    with pytest.raises(ValueError, match=r"student.heads=5: a pruned student keeps 1 to 4 of the teacher's encoder heads"):
        plan(importance, heads=5, layers=1)
    with pytest.raises(ValueError, match=r"student.layers=3: a pruned student keeps 1 to 2"):
        plan(importance, heads=2, layers=3)
    with pytest.raises(ValueError, match=r"this captioner has no recorded origin"):
        recorded_origins(teacher)
    with pytest.raises(ValueError, match=r"score\(\) takes an unpruned captioner"):
        score(prune_from_plan(teacher, plan(importance, 2, 1)), batches[:1])
