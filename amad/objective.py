"""The training objective: task loss + logit KD + attention distillation over mapped layers.

Following "No Head Left Behind – Multi-Head Alignment Distillation for Transformers" (AAAI 2024),
the student is trained on ``task_weight * CE + logit_kd_weight * KD + attention_weight * L_attn``,
where ``L_attn`` is AMAD (:func:`amad.losses.amad_loss`) or one of the baselines it is compared
with. Everything model-specific arrives as :class:`~amad.outputs.VLOutputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from amad.losses import (
    AMAD_VARIANTS,
    amad_loss,
    head_mean_loss,
    logit_kd_loss,
    one_to_one_loss,
    relation_loss,
)
from amad.outputs import QKV, VLOutputs

__all__ = ["METHODS", "NORMALIZATIONS", "PAIRINGS", "TASK_LOSSES", "DistillationObjective", "resolve_layer_map"]

METHODS = ("amad", "one_to_one", "head_mean", "relation", "none")
TASK_LOSSES = ("ce", "vqa_bce")
NORMALIZATIONS = ("sum", "per_head")
PAIRINGS = ("index", "origin")

HeadOrigins = Sequence[Sequence[tuple[int, int]]]

LayerMap = str | Sequence[tuple[int, int]]


def _uniform_teacher_layer(i: int, teacher_layers: int, student_layers: int) -> int:
    # round((i+1)*Lt/Ls) - 1 in exact integer arithmetic, rounding halves up: Python's round()
    # rounds halves to even, which can map student layer 0 to teacher layer -1 (Lt=2, Ls=4).
    # The clamp only matters for a student deeper than twice its teacher.
    return max(0, (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1)


def resolve_layer_map(
    layer_map: LayerMap, teacher_layers: int, student_layers: int
) -> list[tuple[int, int]]:
    """Turn a layer-map setting into ``(student_layer, teacher_layer)`` pairs.

    Args:
        layer_map: ``"uniform"`` (TinyBERT: student layer ``i`` learns from teacher layer
            ``round((i+1) * Lt / Ls) - 1``, evenly spaced and ending at the last layer; halves
            round up), ``"last"`` (last student layer from last teacher layer), or explicit
            ``(student_layer, teacher_layer)`` pairs, 0-based.
        teacher_layers: ``Lt`` >= 1.
        student_layers: ``Ls`` >= 1.

    Returns:
        The pairs, in order.
    """
    if teacher_layers < 1 or student_layers < 1:
        raise ValueError(
            f"need at least one layer on each side; got teacher_layers={teacher_layers}, "
            f"student_layers={student_layers}"
        )
    if layer_map == "uniform":
        return [
            (i, _uniform_teacher_layer(i, teacher_layers, student_layers))
            for i in range(student_layers)
        ]
    if layer_map == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    if isinstance(layer_map, str):
        raise ValueError(
            f"layer_map must be 'uniform', 'last' or a list of pairs; got {layer_map!r}"
        )
    pairs = _check_pairs(layer_map)
    for s, t in pairs:
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(
                f"layer_map pair (student={s}, teacher={t}) is out of range: the student has "
                f"{student_layers} layers and the teacher {teacher_layers} (0-based indices)"
            )
    return pairs


def _check_pairs(layer_map: Sequence) -> list[tuple[int, int]]:
    pairs = []
    for pair in layer_map:
        ok = (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        )
        if not ok:
            raise ValueError(
                f"layer_map entries must be (student_layer, teacher_layer) int pairs; got {pair!r}"
            )
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise ValueError("layer_map is an empty list: the attention loss would have no terms")
    return pairs


def _detach_qkv(qkv: QKV) -> QKV:
    return replace(qkv, query=qkv.query.detach(), key=qkv.key.detach(), value=qkv.value.detach())


class DistillationObjective:
    """``task_weight * L_task + logit_kd_weight * KD + attention_weight * L_attn``.

    All settings are fixed at construction; calling it is a pure function of the outputs.

    Args:
        task_weight: weight of the task loss of the student's logits against the labels.
        task_loss: ``"ce"``: cross-entropy against ``(B,)`` class indices; ``"vqa_bce"``: ViLT's
            VQA loss, binary cross-entropy against ``(B, A)`` soft targets (each answer's VQA score
            from the human answers) times ``A``, as ViLT trains (``F.binary_cross_entropy_with_logits
            (logits, targets) * A``).
        logit_kd_weight: weight of :func:`~amad.losses.logit_kd_loss`.
        attention_weight: weight of the attention loss.
        logit_temperature: temperature of the logit KD.
        method: attention loss, one of ``"amad"``, ``"one_to_one"``, ``"head_mean"``,
            ``"relation"`` (MiniLMv2; needs ``qkv`` in the outputs) or ``"none"``.
        amad_variant: ``"kl"`` (paper Eq. 9) or ``"mse"`` (Eq. 4–5), for ``method="amad"``.
        amad_temperature: alignment softmax temperature (Eq. 2), for ``method="amad"``.
        detach_weights: stop gradients through AMAD's alignment weights.
        relation_heads: number of relation heads, required for ``method="relation"``.
        kinds: attention kinds to align (keys of ``VLOutputs.attentions``), e.g. ``("self",)`` or
            ``("self", "cross")``.
        layer_map: see :func:`resolve_layer_map`; resolved per kind against that kind's layer
            counts when called.
        layer_maps: kind -> its own layer map, for kinds whose stacks differ (an encoder's and a
            decoder's); kinds not listed use ``layer_map``.
        kind_weights: kind -> weight of that kind's term (default 1 each). The attention term is the
            mean over ``kinds`` of ``weight * (mean over that kind's aligned layers)``; with one
            kind it is the mean over its layers.
        attention_normalization: how one layer's attention term is scaled. ``"sum"`` (the
            papers' forms): AMAD sums over the ``Ht`` teacher heads, one-to-one over the ``Hs``
            aligned pairs, head-mean is one divergence of the mean maps and MiniLMv2 sums its three
            relations. ``"per_head"`` divides each by the number of teacher targets it aligns --
            ``Ht`` for AMAD, ``Hs`` for one-to-one, 1 for head-mean, 3 for relation (each relation
            is already a mean over relation heads) -- so every method's term is a mean divergence
            per aligned teacher target and one ``attention_weight`` means the same for all.
        one_to_one_pairing: for ``method="one_to_one"``: ``"index"`` (student head ``k`` learns
            teacher head ``k``, the extra teacher heads are dropped) or ``"origin"`` (each student
            head learns the teacher head it was pruned from; needs ``head_origins``).
        head_origins: per student layer, the teacher ``(layer, head)`` each of its heads came from
            (:func:`amad.pruning.recorded_origins`); required by ``one_to_one_pairing="origin"``,
            whose teacher layer for each student layer must be the one ``layer_map`` maps it to.
        report_zero_weight_terms: a component whose weight is 0 is left out of ``"loss"`` and, by
            default, not computed at all: it is reported as a 0 tensor. True computes it under
            ``no_grad`` for monitoring (at the cost of computing it); terms that need the teacher
            are still reported as 0 when it is None.

    The task term is reported as 0 when ``labels`` is None (allowed only when ``task_weight == 0``).
    The teacher may be None when no computed term reads it (:attr:`needs_teacher` is False), e.g.
    task-only training.
    """

    def __init__(
        self,
        *,
        task_weight: float = 1.0,
        task_loss: str = "ce",
        logit_kd_weight: float = 1.0,
        attention_weight: float = 1.0,
        logit_temperature: float = 1.0,
        method: str = "amad",
        amad_variant: str = "kl",
        amad_temperature: float = 1.0,
        detach_weights: bool = False,
        relation_heads: int | None = None,
        kinds: Sequence[str] = ("self",),
        layer_map: LayerMap = "uniform",
        layer_maps: Mapping[str, LayerMap] | None = None,
        kind_weights: Mapping[str, float] | None = None,
        attention_normalization: str = "sum",
        one_to_one_pairing: str = "index",
        head_origins: HeadOrigins | Mapping[str, HeadOrigins] | None = None,
        report_zero_weight_terms: bool = False,
    ) -> None:
        weights = {
            "task_weight": task_weight,
            "logit_kd_weight": logit_kd_weight,
            "attention_weight": attention_weight,
        }
        for name, w in weights.items():
            if not (float(w) >= 0 and float(w) != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0; got {w}")
        if not any(float(w) > 0 for w in weights.values()):
            raise ValueError(f"at least one weight must be > 0; got {weights}")
        for name, v in (
            ("logit_temperature", logit_temperature),
            ("amad_temperature", amad_temperature),
        ):
            if not (float(v) > 0 and float(v) != float("inf")):
                raise ValueError(f"{name} must be a finite number > 0; got {v}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {TASK_LOSSES}; got {task_loss!r}")
        if amad_variant not in AMAD_VARIANTS:
            raise ValueError(f"amad_variant must be one of {AMAD_VARIANTS}; got {amad_variant!r}")
        if method == "relation" and (
            isinstance(relation_heads, bool)
            or not isinstance(relation_heads, int)
            or relation_heads < 1
        ):
            raise ValueError(
                f"method='relation' needs relation_heads, an int >= 1; got {relation_heads!r}"
            )
        if attention_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"attention_normalization must be one of {NORMALIZATIONS}; got {attention_normalization!r}"
            )
        if one_to_one_pairing not in PAIRINGS:
            raise ValueError(f"one_to_one_pairing must be one of {PAIRINGS}; got {one_to_one_pairing!r}")
        if one_to_one_pairing == "origin" and method != "one_to_one":
            raise ValueError(
                f"one_to_one_pairing='origin' applies to method='one_to_one' only; method is {method!r}"
            )
        if one_to_one_pairing == "origin":
            head_origins = _check_origins(head_origins)
        if isinstance(kinds, str):
            kinds = (kinds,)  # ("self") is a common slip for ("self",)
        kinds = tuple(kinds)
        if method != "none" and not kinds:
            raise ValueError(f"kinds is empty: method={method!r} would have nothing to align")
        layer_map = _checked_layer_map(layer_map, "layer_map")
        layer_maps = {kind: _checked_layer_map(m, f"layer_maps[{kind!r}]") for kind, m in (layer_maps or {}).items()}
        kind_weights = {kind: float(w) for kind, w in (kind_weights or {}).items()}
        for name, given in (("layer_maps", layer_maps), ("kind_weights", kind_weights)):
            stray = sorted(set(given) - set(kinds))
            if stray:
                raise ValueError(f"{name} names {stray}, which kinds={list(kinds)} does not align")
        for kind, w in kind_weights.items():
            if not (w >= 0 and w != float("inf")):
                raise ValueError(f"kind_weights[{kind!r}] must be a finite number >= 0; got {w}")
        if kinds and kind_weights and not any(kind_weights.get(kind, 1.0) > 0 for kind in kinds):
            raise ValueError(f"kind_weights={kind_weights} leaves no kind with a weight > 0")

        self.task_weight = float(task_weight)
        self.task_loss = task_loss
        self.logit_kd_weight = float(logit_kd_weight)
        self.attention_weight = float(attention_weight)
        self.logit_temperature = float(logit_temperature)
        self.method = method
        self.amad_variant = amad_variant
        self.amad_temperature = float(amad_temperature)
        self.detach_weights = bool(detach_weights)
        self.relation_heads = relation_heads
        self.kinds = kinds
        self.layer_map = layer_map
        self.layer_maps = layer_maps
        self.kind_weights = kind_weights
        self.attention_normalization = attention_normalization
        self.one_to_one_pairing = one_to_one_pairing
        self.head_origins = head_origins
        self.report_zero_weight_terms = bool(report_zero_weight_terms)

    @property
    def needs_qkv(self) -> bool:
        """True when the model adapters must be called with ``need_qkv=True``."""
        return self.method == "relation"

    @property
    def needs_teacher(self) -> bool:
        """True when a term of ``"loss"`` reads the teacher's outputs; else it may be None."""
        return self.logit_kd_weight != 0 or (self.attention_weight != 0 and self.method != "none")

    def __call__(
        self, teacher: VLOutputs | None, student: VLOutputs, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Compute the objective.

        Args:
            teacher: the teacher's outputs; treated as constants (detached here). May be None when
                :attr:`needs_teacher` is False.
            student: the student's outputs; same batch as the teacher.
            labels: ``(B,)`` integer class indices (``task_loss="ce"``), ``(B, A)`` float soft
                targets (``task_loss="vqa_bce"``), or None when ``task_weight == 0``.

        Returns:
            ``{"loss", "task", "logit_kd", "attention"}``, each a 0-dim tensor; ``"loss"`` is the
            weighted sum of the other three. A zero-weight term is 0 unless
            ``report_zero_weight_terms`` is set.
        """
        if teacher is None and self.needs_teacher:
            raise ValueError(
                f"teacher is None but logit_kd_weight={self.logit_kd_weight} and "
                f"attention_weight={self.attention_weight} (method={self.method!r}) need its "
                "outputs: pass them, or set both weights to 0 for task-only training"
            )
        parts = {
            "task": self._weighted(self.task_weight, student, lambda: self._task(student, labels)),
            "logit_kd": self._weighted(
                self.logit_kd_weight,
                student,
                lambda: logit_kd_loss(
                    student.logits, teacher.logits.detach(), self.logit_temperature, student.logit_mask
                ),
                teacher_missing=teacher is None,
            ),
            "attention": self._weighted(
                self.attention_weight,
                student,
                lambda: self._attention(teacher, student),
                teacher_missing=teacher is None and self.method != "none",
            ),
        }
        weights = {
            "task": self.task_weight,
            "logit_kd": self.logit_kd_weight,
            "attention": self.attention_weight,
        }
        # Zero-weight terms are skipped rather than multiplied by 0, so a NaN in a reported-only
        # term cannot poison the loss.
        terms = [weights[k] * v for k, v in parts.items() if weights[k] != 0]
        return {"loss": torch.stack(terms).sum(), **parts}

    def _weighted(
        self,
        weight: float,
        student: VLOutputs,
        compute: Callable[[], Tensor],
        *,
        teacher_missing: bool = False,
    ) -> Tensor:
        """A term with a non-zero weight; a zero-weight one only when reporting them.

        ``teacher_missing``: the term would read a teacher that is None (only ever a zero-weight
        term: ``__call__`` has checked); it is reported as 0.
        """
        if weight != 0:
            return compute()
        if not self.report_zero_weight_terms or teacher_missing:
            return student.logits.new_zeros((), dtype=torch.float32)
        with torch.no_grad():  # reported only: keep no graph
            return compute()

    def _task(self, student: VLOutputs, labels: Tensor | None) -> Tensor:
        logits = student.logits
        if labels is None:
            if self.task_weight != 0:
                raise ValueError(
                    f"labels is None but task_weight={self.task_weight}: pass labels or set "
                    "task_weight=0"
                )
            return logits.new_zeros((), dtype=torch.float32)
        if self.task_loss == "vqa_bce":
            if labels.shape != logits.shape or not labels.is_floating_point():
                raise ValueError(
                    f"task_loss='vqa_bce' needs (B, A) float soft targets like the logits {tuple(logits.shape)}; "
                    f"got shape {tuple(labels.shape)}, dtype {labels.dtype}"
                )
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return F.binary_cross_entropy_with_logits(wide, labels.to(wide.dtype)) * labels.shape[1]
        if logits.dim() == 3:
            # per-token logits (B, T, V) against (B, T) token ids, -100 where there is no token to predict
            if labels.shape != logits.shape[:2] or labels.is_floating_point():
                raise ValueError(
                    f"labels must be (B, T) integer token ids (-100: ignored) for per-token logits {tuple(logits.shape)}; "
                    f"got shape {tuple(labels.shape)}, dtype {labels.dtype}"
                )
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)
            total = F.cross_entropy(wide, labels.flatten(), ignore_index=-100, reduction="sum")
            return total / (labels != -100).sum().clamp_min(1)
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"labels must be (B,) integer class indices; got shape {tuple(labels.shape)}, "
                f"dtype {labels.dtype}, for student logits of shape {tuple(logits.shape)}"
            )
        # Upcast half-precision logits (autocast) but never downcast float64.
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)

    def _attention(self, teacher: VLOutputs, student: VLOutputs) -> Tensor:
        if self.method == "none":
            return student.logits.new_zeros((), dtype=torch.float32)
        per_kind: list[Tensor] = []
        for kind in self.kinds:
            weight = self.kind_weights.get(kind, 1.0)
            if weight == 0:
                continue
            if self.method == "relation":
                terms = self._relation_terms(teacher, student, kind)
            else:
                terms = self._map_terms(teacher, student, kind)
            per_kind.append(weight * torch.stack(terms).mean())
        return torch.stack(per_kind).sum() / len(self.kinds)

    def _map_terms(self, teacher: VLOutputs, student: VLOutputs, kind: str) -> list[Tensor]:
        t_maps = _get(teacher.attentions, kind, "teacher", "attentions")
        s_maps = _get(student.attentions, kind, "student", "attentions")
        # A kind without a mask (e.g. fixed-length image patches) has no padding rows.
        mask = student.query_masks.get(kind)
        if self.method == "amad":

            def loss(t: Tensor, s: Tensor, si: int, ti: int) -> Tensor:
                return amad_loss(
                    t,
                    s,
                    mask,
                    variant=self.amad_variant,
                    temperature=self.amad_temperature,
                    detach_weights=self.detach_weights,
                )
        elif self.method == "one_to_one":

            def loss(t: Tensor, s: Tensor, si: int, ti: int) -> Tensor:
                return one_to_one_loss(t, s, mask, teacher_heads=self._origin_heads(si, ti, len(s_maps), kind))
        else:

            def loss(t: Tensor, s: Tensor, si: int, ti: int) -> Tensor:
                return head_mean_loss(t, s, mask)

        pairs = resolve_layer_map(self.layer_maps.get(kind, self.layer_map), len(t_maps), len(s_maps))
        terms = []
        for si, ti in pairs:
            t, s = t_maps[ti].detach(), s_maps[si]
            terms.append(loss(t, s, si, ti) / self._aligned_targets(t, s))
        return terms

    def _aligned_targets(self, t: Tensor, s: Tensor) -> int:
        """What a layer's map term is divided by: 1 for ``"sum"``; the teacher targets it aligns else
        (relation terms are scaled in :meth:`_relation_terms`)."""
        if self.attention_normalization == "sum":
            return 1
        return {"amad": t.shape[1], "one_to_one": s.shape[1], "head_mean": 1}[self.method]

    def _origin_heads(self, si: int, ti: int, student_layers: int, kind: str = "self") -> list[int] | None:
        """The teacher heads of student layer ``si`` by origin (None: by index)."""
        if self.one_to_one_pairing == "index":
            return None
        origins = self.head_origins
        if isinstance(origins, dict):  # per kind (a captioner's encoder, decoder and cross-attention heads)
            if kind not in origins:
                raise ValueError(f"head_origins has no {kind!r} entry (it has {sorted(origins)}): one-to-one by origin needs every aligned kind's")
            origins = origins[kind]
        if len(origins) != student_layers:
            raise ValueError(
                f"head_origins lists {len(origins)} student layers but the student returns "
                f"{student_layers} attention layers: they are not this student's origins"
            )
        layers = {layer for layer, _ in origins[si]}
        if layers != {ti}:
            raise ValueError(
                f"student layer {si} was pruned from teacher layer(s) {sorted(layers)} but layer_map "
                f"pairs it with teacher layer {ti}: one-to-one by origin needs the layer map the "
                "student was pruned with (layer_map='uniform' for amad.pruning's students)"
            )
        return [head for _, head in origins[si]]

    def _relation_terms(self, teacher: VLOutputs, student: VLOutputs, kind: str) -> list[Tensor]:
        lists = []
        for who, out in (("teacher", teacher), ("student", student)):
            if not out.qkv.get(kind):
                raise ValueError(
                    f"method='relation' needs the {who}'s {kind!r} query/key/value projections but "
                    f"its VLOutputs.qkv has none (kinds present: {sorted(out.qkv)}): the model "
                    "adapter must be called with need_qkv=True "
                    "(see DistillationObjective.needs_qkv)"
                )
            lists.append(out.qkv[kind])
        t_qkv, s_qkv = lists
        key_mask = student.key_masks.get(kind)
        pairs = resolve_layer_map(self.layer_maps.get(kind, self.layer_map), len(t_qkv), len(s_qkv))
        scale = 3 if self.attention_normalization == "per_head" else 1  # the Q-Q, K-K, V-V relations
        return [
            relation_loss(
                _detach_qkv(t_qkv[ti]), s_qkv[si], key_mask, relation_heads=self.relation_heads
            )
            / scale
            for si, ti in pairs
        ]


def _checked_layer_map(layer_map: LayerMap, name: str) -> LayerMap:
    if not isinstance(layer_map, str):
        return tuple(_check_pairs(layer_map))
    if layer_map not in ("uniform", "last"):
        raise ValueError(f"{name} must be 'uniform', 'last' or a list of pairs; got {layer_map!r}")
    return layer_map


def _check_origins(head_origins):
    """Validated origins: one list per student layer of ``(teacher_layer, teacher_head)``, or a mapping
    kind -> such lists (checked each)."""
    if isinstance(head_origins, Mapping):
        if not head_origins:
            raise ValueError("head_origins is an empty mapping: it needs the origins of every aligned kind")
        return {kind: _check_origins(origins) for kind, origins in head_origins.items()}
    if head_origins is None:
        raise ValueError(
            "one_to_one_pairing='origin' needs head_origins, the teacher (layer, head) of every "
            "student head: only a student pruned from its teacher (student.init: pruned) records them"
        )
    checked = []
    for index, layer in enumerate(head_origins):
        pairs = []
        for pair in layer:
            ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair
            )
            if not ok:
                raise ValueError(
                    f"head_origins[{index}] must hold (teacher_layer, teacher_head) pairs of ints >= 0; "
                    f"got {pair!r}"
                )
            pairs.append((pair[0], pair[1]))
        if not pairs:
            raise ValueError(f"head_origins[{index}] is empty: every student layer has at least one head")
        checked.append(tuple(pairs))
    if not checked:
        raise ValueError("head_origins is empty: it needs one entry per student layer")
    return tuple(checked)


def _get(by_kind: dict[str, list[Tensor]], kind: str, who: str, field: str) -> list[Tensor]:
    maps = by_kind.get(kind)
    if not maps:
        raise ValueError(
            f"the {who}'s VLOutputs.{field} has no {kind!r} layers (kinds present: "
            f"{sorted(by_kind)}); set kinds= to the attention kinds both models return"
        )
    return maps
