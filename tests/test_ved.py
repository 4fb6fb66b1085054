"""The encoder-decoder captioning family (issue 24): VedAdapter, its three attention kinds, and the objective on them."""

from __future__ import annotations

import pytest
import torch
from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

from amad.data.captions import CaptionSpec, caption_tokenizer, caption_training_set, decode_caption, make_caption_split
from amad.data.scenes import SceneSpec
from amad.data.text import CLS, PAD, SEP
from amad.losses import amad_loss, logit_kd_loss
from amad.models import StudentSpec
from amad.models_ved import VedAdapter, check_ved_config
from amad.objective import DistillationObjective

TOKENIZER = caption_tokenizer()
SPEC = CaptionSpec(train_scenes=8, val_scenes=2, test_scenes=2, references_per_image=2, scene=SceneSpec(grid=4, cell=8, min_objects=3, max_objects=4))


def tiny_config(heads: int = 4, layers: int = 2) -> VisionEncoderDecoderConfig:
    return VedAdapter.teacher_config(vocab_size=TOKENIZER.get_vocab_size(), image_size=32, patch_size=8, max_caption_length=SPEC.max_caption_length,
                                     pad_token_id=TOKENIZER.token_to_id(PAD), bos_token_id=TOKENIZER.token_to_id(CLS),
                                     eos_token_id=TOKENIZER.token_to_id(SEP), hidden_size=32, heads=heads, layers=layers)


@pytest.fixture(scope="module")
def batch():
    data = caption_training_set(make_caption_split(SPEC, "train"), TOKENIZER, SPEC.max_caption_length)
    return data.batch(torch.arange(6))


def test_the_three_kinds_of_maps_have_their_shapes_masks_and_a_causal_decoder(batch):
    model = VedAdapter.build(tiny_config(), seed=0)
    out = VedAdapter.forward(model, batch)
    B, T = batch["decoder_input_ids"].shape
    P = (32 // 8) ** 2 + 1
    assert out.logits.shape == (B, T, TOKENIZER.get_vocab_size())
    assert [tuple(m.shape) for m in out.attentions["encoder_self"]] == [(B, 4, P, P)] * 2
    assert [tuple(m.shape) for m in out.attentions["decoder_self"]] == [(B, 4, T, T)] * 2
    assert [tuple(m.shape) for m in out.attentions["cross"]] == [(B, 4, T, P)] * 2
    tokens = batch["decoder_attention_mask"].bool()
    predicting = batch["labels"] != -100  # the input [SEP] is a real token that predicts nothing
    assert (tokens & ~predicting).sum() == B and not (predicting & ~tokens).any()
    assert torch.equal(out.logit_mask, predicting) and torch.equal(out.query_masks["decoder_self"], predicting)
    assert torch.equal(out.key_masks["decoder_self"], tokens)
    assert torch.equal(out.query_masks["cross"], predicting) and out.key_masks["cross"].all() and out.query_masks["encoder_self"].all()
    for layer in out.attentions["decoder_self"]:
        # the upper triangle and padding keys hold exact zeros: they add nothing to cosines or divergences
        assert (layer.triu(diagonal=1) == 0).all()
        assert (layer.masked_select(~tokens[:, None, None, :].expand_as(layer)) == 0).all()
        rows = layer.sum(-1)[tokens[:, None, :].expand(B, 4, T)]
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_sdpa_attention_returns_no_maps_and_the_adapter_says_so(batch):
    model = VisionEncoderDecoderModel(config=tiny_config())
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"returned no 'encoder_self' attention maps: it must run with eager attention"):
        VedAdapter.forward(model, batch)


def test_configs_that_cannot_caption_are_refused_naming_the_key():
    config = tiny_config()
    config.decoder.add_cross_attention = False
    with pytest.raises(ValueError, match=r"decoder.add_cross_attention and decoder.is_decoder must both be true"):
        check_ved_config(config)
    with pytest.raises(ValueError, match=r"needs a VisionEncoderDecoderConfig"):
        check_ved_config(config.encoder)
    with pytest.raises(ValueError, match=r"heads=5 does not divide hidden_size=32"):
        VedAdapter.teacher_config(vocab_size=10, image_size=32, patch_size=8, max_caption_length=18, pad_token_id=0, bos_token_id=2,
                                  eos_token_id=3, hidden_size=32, heads=5)


def test_students_take_the_spec_in_both_stacks_and_keep_the_special_tokens():
    teacher = tiny_config(heads=4, layers=2)
    student = VedAdapter.student_config(teacher, StudentSpec(heads=2, layers=1))
    for part in (student.encoder, student.decoder):
        assert (part.num_attention_heads, part.num_hidden_layers, part.hidden_size, part.intermediate_size) == (2, 1, 16, 64)
    assert student.decoder.add_cross_attention and student.decoder.is_decoder
    assert (student.decoder_start_token_id, student.pad_token_id, student.eos_token_id) == (teacher.decoder_start_token_id, 0, teacher.eos_token_id)


def test_save_and_load_give_the_same_captioner(tmp_path, batch):
    model = VedAdapter.build(tiny_config(), seed=1).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = VedAdapter.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(VedAdapter.forward(model, batch).logits, VedAdapter.forward(loaded, batch).logits)
    config = (tmp_path / "m" / "config.json").read_text().replace('"add_cross_attention": true', '"add_cross_attention": false')
    (tmp_path / "m" / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"m/config.json: decoder.add_cross_attention"):
        VedAdapter.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"holds no config.json"):
        VedAdapter.load(tmp_path)
    vilt = tmp_path / "vilt"
    vilt.mkdir()
    (vilt / "config.json").write_text('{"model_type": "vilt"}')
    with pytest.raises(ValueError, match=r"vilt/config.json: model_type 'vilt' is not a captioner \('vision-encoder-decoder'\)"):
        VedAdapter.load(vilt)


def test_greedy_generation_is_the_argmax_of_teacher_forced_steps_and_beams_run(batch):
    model = VedAdapter.build(tiny_config(), seed=2).eval()
    pixels = batch["pixel_values"][:3]
    generated = VedAdapter.generate(model, pixels, max_length=8)
    start, eos, pad = model.config.decoder_start_token_id, model.config.eos_token_id, model.config.pad_token_id
    assert (generated[:, 0] == start).all() and generated.shape[1] <= 8
    with torch.no_grad():
        for row in range(3):
            ids = [start]
            while len(ids) < 8 and ids[-1] != eos:
                logits = model(pixel_values=pixels[row:row + 1], decoder_input_ids=torch.tensor([ids])).logits
                ids.append(int(logits[0, -1].argmax()))
            got = generated[row].tolist()
            assert got[:len(ids)] == ids and all(t == pad for t in got[len(ids):]), (got, ids)
    beams = VedAdapter.generate(model, pixels, max_length=8, num_beams=3)
    assert (beams[:, 0] == start).all()
    for row in torch.cat([generated, beams]).tolist():  # whole rows, start token first: no special token reaches the text
        words = decode_caption(TOKENIZER, row).split()
        assert not {"[CLS]", "[PAD]", "[SEP]"} & set(words), words
        assert words == [TOKENIZER.id_to_token(i) for i in row[1:row.index(eos) if eos in row else len(row)] if i != pad]
    with pytest.raises(ValueError, match=r"num_beams=0 >= 1"):
        VedAdapter.generate(model, pixels, max_length=8, num_beams=0)


def test_the_objective_on_captions_token_losses_per_kind_layer_maps_and_weights(batch):
    teacher = VedAdapter.build(tiny_config(heads=4, layers=2), seed=3).eval()
    student = VedAdapter.build(VedAdapter.student_config(teacher.config, StudentSpec(heads=2, layers=1)), seed=4)
    with torch.no_grad():
        t_out = VedAdapter.forward(teacher, batch)
    s_out = VedAdapter.forward(student, batch)
    labels = batch["labels"]

    task_only = DistillationObjective(task_weight=1.0, logit_kd_weight=0.0, attention_weight=0.0, method="none")
    hf_loss = student(pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"],
                      decoder_attention_mask=batch["decoder_attention_mask"], labels=labels).loss
    assert task_only(None, s_out, labels)["task"].item() == pytest.approx(hf_loss.item(), rel=1e-6)  # the model's own token CE

    tokens = batch["labels"] != -100
    assert torch.equal(s_out.logit_mask, tokens)
    per_token = torch.nn.functional.kl_div(s_out.logits.log_softmax(-1), t_out.logits.log_softmax(-1), reduction="none", log_target=True).sum(-1)
    assert logit_kd_loss(s_out.logits, t_out.logits, 1.0, tokens).item() == pytest.approx(per_token[tokens].mean().item(), rel=1e-6)
    assert logit_kd_loss(t_out.logits, t_out.logits, 1.0, tokens).item() == pytest.approx(0.0, abs=1e-6)

    kinds = ("encoder_self", "decoder_self", "cross")
    weights = {"encoder_self": 0.5, "decoder_self": 1.0, "cross": 2.0}
    objective = DistillationObjective(method="amad", kinds=kinds, kind_weights=weights, layer_maps={"cross": "last"}, logit_kd_weight=0.0,
                                      task_weight=0.0, attention_weight=1.0)
    got = objective(t_out, s_out, labels)["attention"]
    # one student layer each: "uniform" and "last" both pair it with teacher layer 1 (the last of 2)
    expected = sum(weights[k] * amad_loss(t_out.attentions[k][1], s_out.attentions[k][0], s_out.query_masks[k]) for k in kinds) / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    for stack in ("encoder", "decoder"):  # the maps of both stacks reach the loss
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for name, p in student.named_parameters() if name.startswith(stack)), stack

    cross_only = DistillationObjective(method="one_to_one", kinds=("cross",), logit_kd_weight=0.0, task_weight=0.0)
    assert cross_only(t_out, s_out, labels)["attention"].item() > 0
    with pytest.raises(ValueError, match=r"kind_weights names \['self'\], which kinds=\['cross'\] does not align"):
        DistillationObjective(kinds=("cross",), kind_weights={"self": 1.0})
    with pytest.raises(ValueError, match=r"layer_maps\['cross'\] must be 'uniform', 'last' or a list of pairs"):
        DistillationObjective(kinds=("cross",), layer_maps={"cross": "first"})
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) integer token ids"):
        task_only(None, s_out, labels[:, 0])
    with pytest.raises(ValueError, match=r"method 'relation' is not supported for the 'ved' family"):
        VedAdapter.forward(student, batch, need_qkv=True)
