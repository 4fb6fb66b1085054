"""The ViLT adapter: deterministic embedding, maps per kind and layer, student derivation, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import ViltForQuestionAnswering

from amad.data.benchmark import BenchmarkSpec, benchmark_tokenizer, make_split
from amad.models import StudentSpec, ViltAdapter, get_adapter


@pytest.fixture(scope="module")
def batch():
    split = make_split(BenchmarkSpec(train_scenes=2, val_scenes=2, test_scenes=3), "test", benchmark_tokenizer())
    return split.batch(torch.arange(5))


@pytest.fixture(scope="module")
def teacher_config():
    return ViltAdapter.teacher_config(
        vocab_size=benchmark_tokenizer().get_vocab_size(), answers=("no", "yes", "red"),
        image_size=48, patch_size=8, max_text_length=16, hidden_size=48, heads=6, layers=3,
    )


def test_two_forward_passes_give_identical_attention_maps(teacher_config, batch):
    model = ViltAdapter.build(teacher_config, seed=0).eval()
    first, second = ViltAdapter.forward(model, batch), ViltAdapter.forward(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(first.attentions["self"], second.attentions["self"]))


def test_stock_vilt_embedding_is_not_deterministic_which_is_why_we_replace_it(teacher_config, batch):
    stock = ViltForQuestionAnswering(teacher_config).eval()
    ours = ViltAdapter.build(teacher_config, seed=0).eval()
    ours.load_state_dict(stock.state_dict())
    maps = []
    for _ in range(3):
        with torch.no_grad():
            maps.append(stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"], output_attentions=True).attentions[0])
    assert any(not torch.equal(maps[0], m) for m in maps[1:])
    # same weights, raster patch order: the logits agree with the stock model's (patch order only permutes tokens)
    with torch.no_grad():
        stock_logits = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    assert torch.allclose(ViltAdapter.forward(ours, batch).logits, stock_logits, atol=1e-5)


def test_outputs_have_the_documented_shapes(teacher_config, batch):
    model = ViltAdapter.build(teacher_config, seed=0)
    out = ViltAdapter.forward(model, batch, need_qkv=True)
    tokens = 16 + 1 + (48 // 8) ** 2  # text + image CLS + patches
    assert out.logits.shape == (5, 3)
    assert len(out.attentions["self"]) == 3
    for attention in out.attentions["self"]:
        assert attention.shape == (5, 6, tokens, tokens)
        assert torch.allclose(attention.sum(-1), torch.ones(5, 6, tokens), atol=1e-5)
    assert out.query_masks["self"].shape == (5, tokens) and out.query_masks["self"].dtype == torch.bool
    assert torch.equal(out.query_masks["self"][:, :16], batch["attention_mask"].bool())
    assert out.query_masks["self"][:, 16:].all()
    assert len(out.qkv["self"]) == 3 and out.qkv["self"][0].key.shape == (5, tokens, 48)
    # padded keys get no attention: the mask reaches the softmax
    padded = ~out.key_masks["self"]
    assert out.attentions["self"][0].masked_select(padded[:, None, None, :]).abs().max() < 1e-6


def test_teacher_and_student_maps_index_the_same_tokens(teacher_config, batch):
    student_config = ViltAdapter.student_config(teacher_config, StudentSpec(heads=2, layers=1))
    teacher, student = ViltAdapter.build(teacher_config, seed=0), ViltAdapter.build(student_config, seed=1)
    t_out, s_out = ViltAdapter.forward(teacher, batch), ViltAdapter.forward(student, batch)
    assert t_out.attentions["self"][0].shape[2:] == s_out.attentions["self"][0].shape[2:]
    assert torch.equal(t_out.query_masks["self"], s_out.query_masks["self"])
    assert s_out.attentions["self"][0].shape[1] == 2


def test_student_derivation_shrinks_width_with_heads(teacher_config):
    student = ViltAdapter.student_config(teacher_config, StudentSpec(heads=2, layers=2))
    assert (student.num_attention_heads, student.num_hidden_layers, student.hidden_size) == (2, 2, 16)  # 2 x head dim 8
    assert student.intermediate_size == 4 * 16
    assert student.image_size == teacher_config.image_size and student.vocab_size == teacher_config.vocab_size
    assert student.id2label == teacher_config.id2label
    wide = ViltAdapter.student_config(teacher_config, StudentSpec(heads=2, layers=2, head_dim=24))
    assert wide.hidden_size == 48
    small, big = ViltAdapter.build(student), ViltAdapter.build(teacher_config)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())


def test_impossible_specs_are_clear_errors(teacher_config):
    with pytest.raises(ValueError, match="heads=0"):
        ViltAdapter.student_config(teacher_config, StudentSpec(heads=0, layers=2))
    with pytest.raises(ValueError, match="heads=5 does not divide hidden_size=48"):
        ViltAdapter.teacher_config(vocab_size=10, answers=("a",), image_size=48, patch_size=8, max_text_length=8, hidden_size=48, heads=5)
    with pytest.raises(ValueError, match="patch_size=7 does not divide image_size=48"):
        ViltAdapter.teacher_config(vocab_size=10, answers=("a",), image_size=48, patch_size=7, max_text_length=8)
    with pytest.raises(ValueError, match="unknown model family 'blip2'"):
        get_adapter("blip2")


def test_a_student_started_from_the_teacher_holds_its_uniformly_chosen_layers(teacher_config, batch):
    teacher = ViltAdapter.build(teacher_config, seed=0).eval()
    student = ViltAdapter.build(ViltAdapter.student_config(teacher_config, StudentSpec(heads=2, layers=2, head_dim=24)), seed=1).eval()
    assert ViltAdapter.init_from_teacher(student, teacher) == [(0, 1), (1, 2)]  # 3 teacher layers -> 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, value in s_state.items():
        origin = name
        if name.startswith("vilt.encoder.layer."):
            index = int(name.split(".")[3])
            origin = name.replace(f"layer.{index}.", f"layer.{(1, 2)[index]}.", 1)
        assert torch.equal(value, t_state[origin]), name
    # Same weights, fewer heads: a different function, but every head's map is still a distribution.
    maps = ViltAdapter.forward(student, batch).attentions["self"]
    assert [tuple(m.shape[:2]) for m in maps] == [(5, 2), (5, 2)]
    assert not torch.equal(ViltAdapter.forward(student, batch).logits, ViltAdapter.forward(teacher, batch).logits)


def test_starting_from_the_teacher_needs_its_width(teacher_config):
    teacher = ViltAdapter.build(teacher_config, seed=0)
    narrow = ViltAdapter.build(ViltAdapter.student_config(teacher_config, StudentSpec(heads=2, layers=2)), seed=1)
    with pytest.raises(ValueError, match=r"teacher's hidden size \(48\); the student has 16"):
        ViltAdapter.init_from_teacher(narrow, teacher)
    deep = ViltAdapter.student_config(teacher_config, StudentSpec(heads=2, layers=4, head_dim=24))
    with pytest.raises(ValueError, match="at most the teacher's 3 layers; the student has 4"):
        ViltAdapter.check_teacher_init(teacher_config, deep)


def test_wrong_image_size_is_a_clear_error(teacher_config, batch):
    model = ViltAdapter.build(teacher_config, seed=0)
    wrong = dict(batch, pixel_values=torch.zeros(5, 3, 64, 64))
    with pytest.raises(ValueError, match="configured for 36"):
        ViltAdapter.forward(model, wrong)


def test_save_and_load_round_trip_from_a_local_directory(teacher_config, batch, tmp_path):
    model = ViltAdapter.build(teacher_config, seed=0).eval()
    model.save_pretrained(tmp_path)
    loaded = ViltAdapter.load(tmp_path).eval()
    assert torch.equal(ViltAdapter.forward(model, batch).logits, ViltAdapter.forward(loaded, batch).logits)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ViltAdapter.load(tmp_path / "..")


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone(teacher_config):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ViltAdapter.build(teacher_config, seed=7)
    after = torch.rand(1)
    b = ViltAdapter.build(teacher_config, seed=7)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
