"""Captioning students pruned from the teacher (issue 24): encoder, decoder self- and cross-attention heads
each scored and kept separately, layers dropped, FFNs narrowed -- :mod:`amad.pruning` for the ``ved`` family.

Head importance is Michel et al.'s (NeurIPS 2019, Eq. 2), ``I_h = E_x |dL(x) / d xi_h|`` with a gate
``xi_h = 1`` on each head's context and ``L`` the captioner's token cross-entropy (summed over an
example's real tokens), l2-normalised within each layer; the gate is a pre-hook on the attention's output
projection (ViT ``o_proj``, BERT ``attention.output.dense`` / ``crossattention.output.dense``), so a gate of
0 is exactly removing the head. FFN neurons are ranked by mean activation magnitude over real tokens.

A pruned captioner records where everything came from in its config (``amad_pruning``)::

    {"encoder": {"teacher_layers": [...], "heads": [[...] per layer], "intermediate_sizes": [...]},
     "decoder": {"teacher_layers": [...], "self_heads": [[...]], "cross_heads": [[...]], "intermediate_sizes": [...]}}

:class:`AmadVisionEncoderDecoder` rebuilds those shapes from the record, so it saves and loads like any
checkpoint (:meth:`amad.models_ved.VedAdapter.load`). Head size and hidden sizes stay the teacher's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

from amad.models_ved import PRUNING_KEY, AmadVisionEncoderDecoder, decoder_layers as _decoder_layers, encoder_layers as _encoder_layers
from amad.objective import resolve_layer_map
from amad.pruning import _head_rows

GATED = ("encoder", "decoder_self", "cross")  # the three kinds of heads, scored and kept separately
ORIGIN_KINDS = {"encoder": "encoder_self", "decoder_self": "decoder_self", "cross": "cross"}  # -> VLOutputs kinds


@dataclass(frozen=True)
class VedImportance:
    """Scores of a captioner's parts: ``heads[kind]`` ``(layers, heads)`` per kind of head (encoder,
    decoder_self, cross), ``ffn[stack]`` ``(layers, intermediate_size)`` per stack (encoder, decoder)."""

    heads: dict[str, Tensor]
    ffn: dict[str, Tensor]
    examples: int

    def to_dict(self) -> dict:
        return {"heads": {k: v.tolist() for k, v in self.heads.items()}, "ffn": {k: v.tolist() for k, v in self.ffn.items()},
                "examples": self.examples}

    @staticmethod
    def from_dict(values: dict) -> "VedImportance":
        return VedImportance({k: torch.tensor(v) for k, v in values["heads"].items()}, {k: torch.tensor(v) for k, v in values["ffn"].items()},
                             int(values["examples"]))


def _gated_projection(layer: nn.Module, kind: str) -> nn.Linear:
    """The output projection whose input is the concatenated head contexts ``(B, T, heads * head_dim)``."""
    return {"encoder": lambda: layer.attention.o_proj, "decoder_self": lambda: layer.attention.output.dense,
            "cross": lambda: layer.crossattention.output.dense}[kind]()


def score(model: VisionEncoderDecoderModel, batches: Iterable[dict[str, Tensor]]) -> VedImportance:
    """Head importance per kind and FFN importance per stack, in one pass over caption ``batches``
    (:class:`amad.data.captions.CaptionTrainingSet` batches: ``labels`` with -100 on padding)."""
    if getattr(model.config, PRUNING_KEY, None):
        raise ValueError("score() takes an unpruned captioner: this one already carries a pruning record")
    config = model.config
    layers = {"encoder": _encoder_layers(model), "decoder_self": _decoder_layers(model), "cross": _decoder_layers(model)}
    heads = {"encoder": config.encoder.num_attention_heads, "decoder_self": config.decoder.num_attention_heads,
             "cross": config.decoder.num_attention_heads}
    head_sum = {kind: torch.zeros(len(layers[kind]), heads[kind], dtype=torch.float64) for kind in GATED}
    widths = {"encoder": config.encoder.intermediate_size, "decoder": config.decoder.intermediate_size}
    ffn_sum = {"encoder": torch.zeros(len(layers["encoder"]), widths["encoder"], dtype=torch.float64),
               "decoder": torch.zeros(len(layers["decoder_self"]), widths["decoder"], dtype=torch.float64)}
    gates: dict[str, list[Tensor]] = {}
    decoder_tokens: list[Tensor] = []
    counted = {"encoder": 0, "decoder": 0}
    examples = 0

    def gate(kind: str, index: int):
        def hook(_module, inputs):
            context = inputs[0]  # (B, T, heads * head_dim)
            b, t, width = context.shape
            h = heads[kind]
            return (context.view(b, t, h, width // h) * gates[kind][index][:, None, :, None]).view(b, t, width),
        return hook

    def record(stack: str, index: int):
        def hook(_module, _inputs, output):
            if stack == "encoder":
                ffn_sum[stack][index] += output.detach().abs().sum(dim=(0, 1)).double().cpu()
            else:
                mask = decoder_tokens[0].to(output.dtype)[..., None]
                ffn_sum[stack][index] += (output.detach().abs() * mask).sum(dim=(0, 1)).double().cpu()
        return hook

    handles = []
    for kind in GATED:
        for index, layer in enumerate(layers[kind]):
            handles.append(_gated_projection(layer, kind).register_forward_pre_hook(gate(kind, index)))
    for index, layer in enumerate(layers["encoder"]):
        handles.append(layer.mlp.activation_fn.register_forward_hook(record("encoder", index)))
    for index, layer in enumerate(layers["decoder_self"]):
        handles.append(layer.intermediate.register_forward_hook(record("decoder", index)))
    device = next(model.parameters()).device
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            size = batch["labels"].shape[0]
            gates.clear()
            gates.update({kind: [torch.ones(size, heads[kind], device=device, requires_grad=True) for _ in layers[kind]] for kind in GATED})
            decoder_tokens[:] = [batch["labels"] != -100]  # positions that predict a token (not padding, not the input [SEP])
            logits = model(pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"],
                           decoder_attention_mask=batch["decoder_attention_mask"], return_dict=True).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
            flat = [g for kind in GATED for g in gates[kind]]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            if any(grad is None for grad in grads):
                raise ValueError("cannot score the captioner's heads: a gated attention output does not reach the logits")
            position = 0
            for kind in GATED:
                count = len(layers[kind])
                head_sum[kind] += torch.stack([g.abs().sum(dim=0) for g in grads[position:position + count]]).double().cpu()
                position += count
            counted["encoder"] += size * _encoder_tokens(model)
            counted["decoder"] += int(decoder_tokens[0].sum())
            examples += size
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    if examples == 0:
        raise ValueError("score() got no batches: importance needs training examples")
    scores = {}
    for kind in GATED:
        mean = head_sum[kind] / examples
        scores[kind] = (mean / mean.norm(dim=1, keepdim=True).clamp(min=1e-20)).float()  # l2 per layer (Michel Sec. 4.1)
    return VedImportance(scores, {stack: (ffn_sum[stack] / max(1, counted[stack])).float() for stack in ffn_sum}, examples)


def _encoder_tokens(model) -> int:
    """Image tokens per example: the patches and the CLS token."""
    size, patch = model.config.encoder.image_size, model.config.encoder.patch_size
    return (size // patch) ** 2 + 1


@dataclass(frozen=True)
class VedPruningPlan:
    """What a pruned captioner keeps, by teacher index (sorted): per stack its teacher layers and FFN
    neurons, per kind of head the heads of each kept layer."""

    encoder_layers: list[int]
    decoder_layers: list[int]
    heads: dict[str, list[list[int]]]  # "encoder", "decoder_self", "cross"
    neurons: dict[str, list[list[int]]]  # "encoder", "decoder"


def plan(importance: VedImportance, heads: int, layers: int, ffn_keep: float = 1.0) -> VedPruningPlan:
    """The ``heads`` most important heads of each kind in ``layers`` layers of each stack (uniform layer map) and
    the ``ffn_keep`` most active FFN neurons; ValueError names the setting that cannot be met."""
    kept_layers = {}
    for stack, kind in (("encoder", "encoder"), ("decoder", "decoder_self")):
        total_layers, total_heads = importance.heads[kind].shape
        if not 1 <= layers <= total_layers:
            raise ValueError(f"student.layers={layers}: a pruned student keeps 1 to {total_layers} of the teacher's {stack} layers")
        if not 1 <= heads <= total_heads:
            raise ValueError(f"student.heads={heads}: a pruned student keeps 1 to {total_heads} of the teacher's {stack} heads per layer")
        kept_layers[stack] = [t for _, t in resolve_layer_map("uniform", total_layers, layers)]
    if not 0 < ffn_keep <= 1:
        raise ValueError(f"student.ffn_keep={ffn_keep}: the fraction of FFN neurons kept must be in (0, 1]")
    stack_of = {"encoder": "encoder", "decoder_self": "decoder", "cross": "decoder"}
    kept_heads = {kind: [sorted(importance.heads[kind][t].topk(heads).indices.tolist()) for t in kept_layers[stack_of[kind]]] for kind in GATED}
    neurons = {}
    for stack in ("encoder", "decoder"):
        width = importance.ffn[stack].shape[1]
        count = max(1, round(ffn_keep * width))
        neurons[stack] = [sorted(importance.ffn[stack][t].topk(count).indices.tolist()) for t in kept_layers[stack]]
    return VedPruningPlan(kept_layers["encoder"], kept_layers["decoder"], kept_heads, neurons)


def prune_from_plan(model: VisionEncoderDecoderModel, kept: VedPruningPlan) -> AmadVisionEncoderDecoder:
    """A new, smaller captioner made of ``model``'s weights (``model`` untouched), recording its origins."""
    config = model.config
    if getattr(config, PRUNING_KEY, None):
        raise ValueError("prune() takes an unpruned captioner: this one already carries a pruning record")
    values = config.to_dict()
    values["encoder"]["num_hidden_layers"] = len(kept.encoder_layers)
    values["decoder"]["num_hidden_layers"] = len(kept.decoder_layers)
    values[PRUNING_KEY] = {
        "encoder": {"teacher_layers": list(kept.encoder_layers), "heads": kept.heads["encoder"],
                    "intermediate_sizes": [len(n) for n in kept.neurons["encoder"]]},
        "decoder": {"teacher_layers": list(kept.decoder_layers), "self_heads": kept.heads["decoder_self"], "cross_heads": kept.heads["cross"],
                    "intermediate_sizes": [len(n) for n in kept.neurons["decoder"]]},
    }
    for key in ("architectures", "transformers_version", "_name_or_path"):
        values.pop(key, None)
    pruned_config = VisionEncoderDecoderConfig.from_dict(values)
    for part in (pruned_config, pruned_config.encoder, pruned_config.decoder):
        part._attn_implementation = "eager"
    pruned = AmadVisionEncoderDecoder(pruned_config)
    enc_dim = config.encoder.hidden_size // config.encoder.num_attention_heads
    dec_dim = config.decoder.hidden_size // config.decoder.num_attention_heads
    source, target = model.state_dict(), {}
    enc_prefix, dec_prefix = "encoder.layers.", "decoder.bert.encoder.layer."
    for name, tensor in pruned.state_dict().items():
        if name.startswith(enc_prefix):
            index, rest = name[len(enc_prefix):].split(".", 1)
            layer = int(index)
            value = _slice_encoder(rest, source[f"{enc_prefix}{kept.encoder_layers[layer]}.{rest}"],
                                   _head_rows(kept.heads["encoder"][layer], enc_dim), torch.tensor(kept.neurons["encoder"][layer]))
        elif name.startswith(dec_prefix):
            index, rest = name[len(dec_prefix):].split(".", 1)
            layer = int(index)
            value = _slice_decoder(rest, source[f"{dec_prefix}{kept.decoder_layers[layer]}.{rest}"],
                                   _head_rows(kept.heads["decoder_self"][layer], dec_dim), _head_rows(kept.heads["cross"][layer], dec_dim),
                                   torch.tensor(kept.neurons["decoder"][layer]))
        else:
            value = source[name].clone()
        if value.shape != tensor.shape:  # a bug here, not a user error
            raise RuntimeError(f"pruned {name}: got {tuple(value.shape)}, expected {tuple(tensor.shape)}")
        target[name] = value
    pruned.load_state_dict(target)
    return pruned.to(next(model.parameters()).device).train(model.training)


def _slice_encoder(name: str, tensor: Tensor, rows: Tensor, neurons: Tensor) -> Tensor:
    if name.startswith("attention.") and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
        return tensor[rows].clone()
    if name == "attention.o_proj.weight":
        return tensor[:, rows].clone()
    if name.startswith("mlp.fc1."):
        return tensor[neurons].clone()
    if name == "mlp.fc2.weight":
        return tensor[:, neurons].clone()
    return tensor.clone()


def _slice_decoder(name: str, tensor: Tensor, self_rows: Tensor, cross_rows: Tensor, neurons: Tensor) -> Tensor:
    for block, rows in (("attention.", self_rows), ("crossattention.", cross_rows)):
        if name.startswith(block + "self.") and name.split(".")[2] in ("query", "key", "value"):
            return tensor[rows].clone()
        if name == block + "output.dense.weight":
            return tensor[:, rows].clone()
    if name.startswith("intermediate.dense."):
        return tensor[neurons].clone()
    if name == "output.dense.weight":
        return tensor[:, neurons].clone()
    return tensor.clone()


def recorded_origins(model: nn.Module) -> dict[str, list[list[tuple[int, int]]]]:
    """Per attention kind (``encoder_self``, ``decoder_self``, ``cross``), for each student layer the teacher
    ``(layer, head)`` each of its heads came from; ValueError for a captioner that was not pruned."""
    record = getattr(model.config, PRUNING_KEY, None)
    if not record:
        raise ValueError(f"this captioner has no recorded origin: one-to-one by origin needs a student pruned from the teacher "
                         f"(student.init: pruned), whose config carries {PRUNING_KEY!r}")
    encoder, decoder = record["encoder"], record["decoder"]
    return {
        "encoder_self": [[(t, h) for h in heads] for t, heads in zip(encoder["teacher_layers"], encoder["heads"])],
        "decoder_self": [[(t, h) for h in heads] for t, heads in zip(decoder["teacher_layers"], decoder["self_heads"])],
        "cross": [[(t, h) for h in heads] for t, heads in zip(decoder["teacher_layers"], decoder["cross_heads"])],
    }
