"""Model adapters: build teachers and students from ``transformers`` configs and expose their attention.

An adapter is the only place that knows a model family's internals. Distillation code sees
:class:`~amad.outputs.VLOutputs` (logits, attention maps per kind and layer, masks) and a
:class:`StudentSpec`; adding a family (BLIP, with cross-attention) means one more adapter class.

ViLT is the first family. Its stock ``visual_embed`` samples the patch order with
``torch.multinomial`` even in eval mode, so two forward passes (or a teacher and a student) see
patches in different orders and ONNX export fails; :class:`DeterministicViltEmbeddings` embeds
fixed-size images in raster order instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import ViltConfig, ViltForQuestionAnswering
from transformers.models.vilt.modeling_vilt import ViltEmbeddings

from amad.outputs import QKV, VLOutputs


class DeterministicViltEmbeddings(ViltEmbeddings):
    """ViLT embeddings with every patch in raster order, no sampling.

    Two input modes, fixed when the model is called (so an exported graph has one of them):

    * **square** (no ``pixel_mask`` given): images are the configured ``image_size``, every patch is
      real, the position embeddings are added as they are. Our own teachers and students run so.
    * **masked** (a ``pixel_mask`` ``(B, H, W)`` given, as ``ViltImageProcessor`` produces for an
      aspect-preserving resize padded per batch): each image's valid patch grid ``h x w`` is read
      from the mask as stock ViLT reads it, the position grid is interpolated to ``h x w``
      (bilinear, ``align_corners=True``, as stock ViLT), padding patches get a zero position and
      mask 0. Stock ViLT then *samples* which patches enter, in random order; attention is
      permutation-equivariant and masked patches take no part, so the logits equal stock ViLT's
      whenever it keeps every valid patch (``config.max_image_length`` < 0, the ViLT default).
    """

    masked_images = False  # set per call by AmadViltForQuestionAnswering.forward

    def visual_embed(self, pixel_values, pixel_mask, max_image_length=-1):
        """``(B, 3, H, W)`` pixels -> ``(B, 1 + Gh * Gw, D)`` embeddings (image CLS first) and a ``(B, 1 + Gh * Gw)`` mask."""
        patches = self.patch_embeddings(pixel_values)  # (B, D, Gh, Gw)
        batch, _, grid_h, grid_w = patches.shape
        if self.masked_images:
            positions, cells = self._masked_positions(pixel_mask, grid_h, grid_w)  # (B, Gh*Gw, D), (B, Gh*Gw)
        else:
            expected = self.position_embeddings.shape[1] - 1
            if grid_h * grid_w != expected:
                raise ValueError(
                    f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {grid_h}x{grid_w} patches but the model"
                    f" was configured for {expected} (image_size={self.config.image_size}, patch_size={self.config.patch_size});"
                    " pass a pixel_mask for images of other sizes"
                )
            positions = self.position_embeddings[:, 1:]
            cells = torch.ones(batch, grid_h * grid_w, dtype=torch.long, device=patches.device)
        tokens = patches.flatten(2).transpose(1, 2) + positions  # (B, P, D)
        cls = self.cls_token + self.position_embeddings[:, :1]
        tokens = self.dropout(torch.cat([cls.expand(batch, -1, -1), tokens], dim=1))
        mask = torch.cat([cells.new_ones(batch, 1), cells], dim=1)
        return tokens, mask, (None, (grid_h, grid_w))

    def _masked_positions(self, pixel_mask: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image interpolated position embeddings ``(B, Gh * Gw, D)`` and patch validity ``(B, Gh * Gw)`` long.

        Vectorised (no loop over images, no data-dependent shapes) so that it exports with dynamic
        image height and width; equal to stock ViLT's per-image ``interpolate`` + ``pad``.
        """
        # nearest-neighbour reduction of the pixel mask to the patch grid, exactly as stock ViLT
        cells = nn.functional.interpolate(pixel_mask[:, None].float(), size=(grid_h, grid_w))[:, 0]  # (B, Gh, Gw)
        rows = cells[:, :, 0].sum(dim=1)  # (B,) valid patch rows, counted down the first column as stock
        cols = cells[:, 0, :].sum(dim=1)  # (B,) valid patch columns
        side = self.config.image_size // self.config.patch_size
        spatial = self.position_embeddings[0, 1:].reshape(side, side, -1)  # (S, S, D)
        row_lo, row_hi, row_t, row_ok = _align_corners_axis(rows, grid_h, side)  # (B, Gh) each
        col_lo, col_hi, col_t, col_ok = _align_corners_axis(cols, grid_w, side)  # (B, Gw) each
        # rows first: (B, Gh, S, D), then columns: (B, Gh, Gw, D)
        by_row = spatial[row_lo] * (1 - row_t)[..., None, None] + spatial[row_hi] * row_t[..., None, None]
        batch_index = torch.arange(by_row.shape[0], device=by_row.device)[:, None, None]
        row_index = torch.arange(grid_h, device=by_row.device)[None, :, None]
        left = by_row[batch_index, row_index, col_lo[:, None, :]]  # (B, Gh, Gw, D)
        right = by_row[batch_index, row_index, col_hi[:, None, :]]
        grid = left * (1 - col_t)[:, None, :, None] + right * col_t[:, None, :, None]
        inside = (row_ok[:, :, None] & col_ok[:, None, :]).to(grid.dtype)  # (B, Gh, Gw)
        grid = grid * inside[..., None]
        return grid.flatten(1, 2), cells.flatten(1).long()


def _align_corners_axis(count: torch.Tensor, size: int, side: int):
    """Source indices and weights of a bilinear ``align_corners=True`` resize of ``side`` cells to ``count`` cells.

    ``count`` ``(B,)`` float: valid cells per image; ``size``: the padded axis length. Returns
    ``lo``, ``hi`` ``(B, size)`` long, the weight ``t`` of ``hi`` ``(B, size)`` float, and
    ``inside`` ``(B, size)`` bool (the cell is within the image). Follows PyTorch's kernel:
    ``source = index * (side - 1) / (count - 1)`` (0 for a single cell).
    """
    index = torch.arange(size, device=count.device, dtype=torch.float32)[None, :]  # (1, size)
    count = count.to(torch.float32)[:, None]  # (B, 1)
    scale = torch.where(count > 1, (side - 1) / (count - 1).clamp(min=1), torch.zeros_like(count))
    source = (index * scale).clamp(max=side - 1)
    lo = source.floor().long()
    hi = (lo + 1).clamp(max=side - 1)
    return lo, hi, source - lo.to(source.dtype), index < count


# The config attribute that records a pruned model's per-layer shapes (see amad/pruning.py). It is
# saved in config.json, so ``from_pretrained`` builds the pruned shapes before loading the weights.
PRUNING_KEY = "amad_pruning"


class AmadViltForQuestionAnswering(ViltForQuestionAnswering):
    """``ViltForQuestionAnswering`` with deterministic image embedding; loads and saves like it.

    A config carrying ``amad_pruning`` (written by :func:`amad.pruning.prune`) builds each layer with
    its own head count and FFN width, so a pruned student saves and loads like any checkpoint.
    """

    def __init__(self, config: ViltConfig):
        super().__init__(config)
        stock = self.vilt.embeddings
        self.vilt.embeddings = DeterministicViltEmbeddings(config)
        self.vilt.embeddings.load_state_dict(stock.state_dict())
        pruning = getattr(config, PRUNING_KEY, None)
        if pruning:
            _apply_pruned_shapes(self, config, pruning)

    def forward(self, *args, pixel_mask: torch.Tensor | None = None, **kwargs):
        """As ``ViltForQuestionAnswering.forward``; a ``pixel_mask`` selects the masked image mode
        (:class:`DeterministicViltEmbeddings`), none the square mode."""
        positional_mask = args[4] if len(args) > 4 else None  # (input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, ...)
        self.vilt.embeddings.masked_images = pixel_mask is not None or positional_mask is not None
        if len(args) > 4:
            return super().forward(*args, **kwargs)
        return super().forward(*args, pixel_mask=pixel_mask, **kwargs)


def check_pruning_record(config: ViltConfig, pruning: dict) -> tuple[list[list[int]], list[int]]:
    """The ``(heads per layer, FFN width per layer)`` a pruning record asks for; ValueError naming the problem.

    ``pruning`` = ``{"teacher_layers": [l...], "heads": [[h...] per layer], "intermediate_sizes": [n...]}``;
    head indices are the teacher's (the head each student head came from).
    """
    try:
        heads = [[int(h) for h in layer] for layer in pruning["heads"]]
        widths = [int(n) for n in pruning["intermediate_sizes"]]
        origins = [int(layer) for layer in pruning["teacher_layers"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{PRUNING_KEY} needs lists 'teacher_layers', 'heads' and 'intermediate_sizes' ({err!r})") from None
    layers = config.num_hidden_layers
    if not (len(heads) == len(widths) == len(origins) == layers):
        raise ValueError(
            f"{PRUNING_KEY} describes {len(heads)} head lists, {len(widths)} FFN widths and {len(origins)} teacher layers"
            f" but num_hidden_layers={layers}"
        )
    total_heads = config.num_attention_heads
    for index, kept in enumerate(heads):
        if not kept or len(set(kept)) != len(kept) or not all(0 <= h < total_heads for h in kept):
            raise ValueError(f"{PRUNING_KEY}.heads[{index}]={kept}: need distinct head indices in [0, {total_heads})")
    if any(n < 1 for n in widths):
        raise ValueError(f"{PRUNING_KEY}.intermediate_sizes={widths}: every FFN needs at least one neuron")
    return heads, widths


def _apply_pruned_shapes(model: AmadViltForQuestionAnswering, config: ViltConfig, pruning: dict) -> None:
    """Rebuild each layer's attention projections ``(hidden, heads_l * head_dim)`` and FFN ``(hidden, width_l)``.

    The residual width and the head size stay the teacher's; fresh modules are initialised like the
    stock ones (``from_pretrained`` or :func:`amad.pruning.prune` then load the real weights).
    """
    heads, widths = check_pruning_record(config, pruning)
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    for layer, kept, width in zip(model.vilt.encoder.layer, heads, widths):
        attention = layer.attention.attention
        inner = len(kept) * head_dim
        for name in ("query", "key", "value"):
            setattr(attention, name, nn.Linear(hidden, inner, bias=config.qkv_bias))
        attention.num_attention_heads, attention.all_head_size = len(kept), inner
        layer.attention.output.dense = nn.Linear(inner, hidden)
        layer.intermediate.dense = nn.Linear(hidden, width)
        layer.output.dense = nn.Linear(width, hidden)
    for module in model.vilt.encoder.modules():
        if isinstance(module, nn.Linear):
            model._init_weights(module)


@dataclass(frozen=True)
class StudentSpec:
    """A student as the sweep searches it; everything else is copied from the teacher's config.

    ``head_dim`` defaults to the teacher's, so ``hidden = heads * head_dim`` and fewer heads also
    means a smaller, faster model (at a fixed hidden size fewer heads change nothing in size).
    """

    heads: int
    layers: int
    head_dim: int | None = None
    intermediate_ratio: float | None = None  # FFN width / hidden; default: the teacher's ratio


class ViltAdapter:
    """The ViLT family: self-attention only, one map per layer over text + image tokens."""

    family = "vilt"
    kinds = ("self",)

    @staticmethod
    def teacher_config(
        *,
        vocab_size: int,
        answers: tuple[str, ...] | list[str],
        image_size: int,
        patch_size: int,
        max_text_length: int,
        hidden_size: int = 192,
        heads: int = 12,
        layers: int = 4,
        intermediate_size: int | None = None,
        initializer_range: float | None = None,
        dropout: float = 0.0,
    ) -> ViltConfig:
        """A ViLT config for our data. ``initializer_range`` defaults to ``1/sqrt(hidden)``.

        The transformers default (0.02) left small from-scratch models at the answer prior: the image
        barely reached the classifier (../shared/FIELD-NOTES.md); ~1/sqrt(hidden) trains.
        """
        _check_divides(hidden_size, heads, "hidden_size", "heads")
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}")
        return ViltConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            initializer_range=initializer_range or hidden_size**-0.5,
            image_size=image_size,
            patch_size=patch_size,
            max_position_embeddings=max_text_length,
            num_labels=len(answers),
            id2label=dict(enumerate(answers)),
            label2id={a: i for i, a in enumerate(answers)},
            pad_token_id=0,
            attn_implementation="eager",
        )

    @staticmethod
    def student_config(teacher: ViltConfig, spec: StudentSpec) -> ViltConfig:
        """Derive a student's config from the teacher's; a clear ValueError for impossible specs."""
        if spec.heads < 1 or spec.layers < 1:
            raise ValueError(f"student heads={spec.heads} and layers={spec.layers} must be >= 1")
        teacher_head_dim = teacher.hidden_size // teacher.num_attention_heads
        head_dim = spec.head_dim or teacher_head_dim
        if head_dim < 1:
            raise ValueError(f"student head_dim={head_dim} must be >= 1")
        hidden = spec.heads * head_dim
        ratio = spec.intermediate_ratio or teacher.intermediate_size / teacher.hidden_size
        values = teacher.to_dict()
        values.update(
            hidden_size=hidden,
            num_attention_heads=spec.heads,
            num_hidden_layers=spec.layers,
            intermediate_size=max(1, round(ratio * hidden)),
            initializer_range=hidden**-0.5,
        )
        for key in ("architectures", "transformers_version", "model_type", "_name_or_path"):
            values.pop(key, None)
        config = ViltConfig(**values)
        config._attn_implementation = "eager"
        return config

    @staticmethod
    def build(config: ViltConfig, seed: int | None = None) -> AmadViltForQuestionAnswering:
        """A randomly initialised model (reproducible when ``seed`` is given).

        Image position embeddings start as a 2D sin-cos grid instead of ViLT's zeros, so where a
        patch is (row, column, distance to another patch) is readable from the first step.
        """
        config._attn_implementation = "eager"  # maps are needed; ViLT only implements eager anyway
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = AmadViltForQuestionAnswering(config)
        with torch.no_grad():
            positions = model.vilt.embeddings.position_embeddings  # (1, 1 + P, D)
            grid = round((positions.shape[1] - 1) ** 0.5)
            positions[0, 1:] = sincos_2d(grid, positions.shape[2])
        return model

    @staticmethod
    def check_teacher_init(teacher: ViltConfig, student: ViltConfig) -> None:
        """ValueError unless every student weight has a same-shaped teacher weight to start from."""
        for what, t, s in (("hidden size", teacher.hidden_size, student.hidden_size),
                           ("FFN width (intermediate_size)", teacher.intermediate_size, student.intermediate_size)):
            if t != s:
                raise ValueError(
                    f"starting the student from the teacher's weights needs the teacher's {what} ({t}); "
                    f"the student has {s} (give student.hidden_size={teacher.hidden_size} and no intermediate_ratio)"
                )
        if student.num_hidden_layers > teacher.num_hidden_layers:
            raise ValueError(
                f"starting the student from the teacher's weights needs at most the teacher's {teacher.num_hidden_layers} "
                f"layers; the student has {student.num_hidden_layers}"
            )

    @staticmethod
    def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
        """Copy the teacher's weights into a student of the same width (DistilBERT-style initialisation).

        Embeddings, the final LayerNorm, pooler and classifier are copied as they are; student layer
        ``i`` starts as teacher layer ``round((i+1) * Lt / Ls) - 1`` (the ``uniform`` layer map, so
        the last layers line up). The attention projections keep their ``(hidden, hidden)`` shape, so
        fewer heads only regroup the same dimensions (``head_dim = hidden / heads``); the student
        starts close to the teacher and distillation adapts it to its head count. Returns the
        ``(student_layer, teacher_layer)`` pairs used.
        """
        from amad.objective import resolve_layer_map

        ViltAdapter.check_teacher_init(teacher.config, student.config)
        pairs = resolve_layer_map("uniform", teacher.config.num_hidden_layers, student.config.num_hidden_layers)
        source, teacher_layer = teacher.state_dict(), dict(pairs)
        prefix = "vilt.encoder.layer."

        def origin(name: str) -> str:
            if not name.startswith(prefix):
                return name
            index, rest = name[len(prefix):].split(".", 1)
            return f"{prefix}{teacher_layer[int(index)]}.{rest}"

        student.load_state_dict({name: source[origin(name)].clone() for name in student.state_dict()})
        return pairs

    @staticmethod
    def load(path: str | Path) -> AmadViltForQuestionAnswering:
        """Load from a local directory (``config.json`` + ``model.safetensors``) or a hub name.

        ValueError naming the directory when its weights do not fit its config (e.g. a pruning record
        that does not match the saved tensors).
        """
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json: not a saved model directory")
        try:
            # transformers 5.x re-initialises mismatched tensors with only a logged warning: ask for the
            # loading report and refuse any tensor that did not load
            model, info = AmadViltForQuestionAnswering.from_pretrained(
                str(path), attn_implementation="eager", ignore_mismatched_sizes=True, output_loading_info=True
            )
        except ValueError as err:
            if PRUNING_KEY in str(err):
                raise ValueError(f"{path}/config.json: {err}") from None
            raise
        problems = [f"{name}: saved {tuple(saved)}, config.json builds {tuple(built)}" for name, saved, built in sorted(info["mismatched_keys"])]
        problems += [f"{name}: not in the saved weights" for name in sorted(info["missing_keys"])]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise ValueError(f"{path}: the weights in model.safetensors do not fit config.json ({shown})")
        return model

    @staticmethod
    def heads(model: nn.Module) -> int:
        """The largest head count of any layer (every layer's, unless the model was pruned)."""
        return max(head_counts(model.config))

    @staticmethod
    def layers(model: nn.Module) -> int:
        return model.config.num_hidden_layers

    @staticmethod
    def forward(
        model: AmadViltForQuestionAnswering,
        batch: dict[str, torch.Tensor],
        *,
        need_attentions: bool = True,
        need_qkv: bool = False,
    ) -> VLOutputs:
        """Run the model on a batch (see ``amad.data.dataset``) and collect what distillation needs.

        A batch with ``pixel_mask`` ``(B, H, W)`` runs the masked image mode (images of any size,
        padded per batch); without one, images must be the configured square size.

        Returns logits ``(B, num_labels)``; ``attentions["self"]``: one ``(B, H, T, T)`` map per
        layer with ``T = L + 1 + P`` (text tokens, image CLS, patches); masks ``(B, T)`` (padding
        text tokens and padding patches False); and, with
        ``need_qkv``, per-layer query/key/value projections ``(B, T, hidden)``.
        """
        masks: list[torch.Tensor] = []
        # the embeddings return the token mask (text, image CLS, patches; padding patches 0)
        hook = model.vilt.embeddings.register_forward_hook(lambda _m, _i, output: masks.append(output[1]))
        try:
            with _capture_qkv(model, need_qkv) as captured:
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    pixel_mask=batch.get("pixel_mask"),
                    output_attentions=need_attentions,
                    return_dict=True,
                )
        finally:
            hook.remove()
        mask = masks[0].bool()  # (B, T)
        attentions = {"self": list(out.attentions)} if need_attentions else {}
        qkv = {"self": [QKV(*layer) for layer in captured]} if need_qkv else {}
        return VLOutputs(out.logits, attentions, {"self": mask}, {"self": mask}, qkv)


@contextmanager
def _capture_qkv(model: AmadViltForQuestionAnswering, enabled: bool):
    """Forward hooks that record each layer's query/key/value projections ``(B, T, hidden)``."""
    captured: list[list[torch.Tensor]] = []
    handles = []
    if enabled:
        for layer in model.vilt.encoder.layer:
            slot: list[torch.Tensor] = []
            captured.append(slot)
            attention = layer.attention.attention
            for projection in (attention.query, attention.key, attention.value):
                handles.append(projection.register_forward_hook(lambda _m, _i, output, slot=slot: slot.append(output)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def head_counts(config: ViltConfig) -> list[int]:
    """Attention heads per layer: the config's head count, or what a pruning record kept."""
    pruning = getattr(config, PRUNING_KEY, None)
    if pruning:
        return [len(kept) for kept in pruning["heads"]]
    return [config.num_attention_heads] * config.num_hidden_layers


def shape_summary(config: ViltConfig) -> dict:
    """How big a model is, for reports and registry tags: heads (one number if every layer has the
    same), per-layer heads, layers, hidden size and FFN widths."""
    heads = head_counts(config)
    pruning = getattr(config, PRUNING_KEY, None)
    widths = list(pruning["intermediate_sizes"]) if pruning else [config.intermediate_size] * config.num_hidden_layers
    return {
        "heads": heads[0] if len(set(heads)) == 1 else max(heads),
        "heads_per_layer": heads,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_sizes": widths,
        "pruned": bool(pruning),
    }


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position codes ``(grid * grid, dim)`` in raster order (as in MAE).

    Half the channels encode the row, half the column; frequencies are spaced for a ``grid``-wide
    lattice so that neighbouring cells differ in the fastest channels and the slowest stay monotonic.
    """
    quarter = dim // 4
    if quarter < 1:
        return torch.zeros(grid * grid, dim)
    frequencies = torch.pi / grid * (grid ** (-torch.arange(quarter, dtype=torch.float32) / quarter)) * grid / 2
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]  # (P, quarter)
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)  # (P, 4 * quarter)
    return torch.nn.functional.pad(codes, (0, dim - codes.shape[1]))


def _check_divides(total: int, parts: int, total_name: str, parts_name: str) -> None:
    if parts < 1 or total % parts:
        raise ValueError(f"{parts_name}={parts} does not divide {total_name}={total}")


ADAPTERS = {ViltAdapter.family: ViltAdapter}


def get_adapter(family: str):
    """The adapter for a model family name: ``"vilt"`` (VQA) or ``"ved"`` (captioning, :mod:`amad.models_ved`);
    a ``config.json``'s ``model_type`` names them too (``vilt``, ``vision-encoder-decoder``)."""
    if family in ("ved", "vision-encoder-decoder"):
        from amad.models_ved import VedAdapter  # imports this module: resolved at call time

        return VedAdapter
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {sorted([*ADAPTERS, 'ved'])}") from None
