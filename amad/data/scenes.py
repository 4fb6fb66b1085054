"""Sort-of-CLEVR-style scenes and templated questions: the built-in VQA benchmark.

After Santoro et al. 2017 ("A simple neural network module for relational reasoning"): RGB scenes
of coloured shapes, every colour at most once per scene, so a question names an object by its colour.

Design choice (see docs/method.md, "The built-in benchmark"): objects sit on a ``grid x grid`` lattice and
each fills one cell. With the model's patch size equal to the cell size, one object is one image
token. That keeps the task a real VQA task (find the object a question names, read its attributes,
relate it to others) while letting a small ViLT learn it on CPU; free-floating objects spread over
several patches made a from-scratch teacher fall back to the answer prior (../shared/FIELD-NOTES.md).

Everything is a pure function of the seed: the same seed gives the same pixels and questions on
every machine (numpy's PCG64 and integer-only rendering).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MAX_OBJECTS = 6
COUNT_WORDS: tuple[str, ...] = tuple(str(n) for n in range(MAX_OBJECTS + 1))

# The answer vocabulary is fixed and ordered: label ids are stable across data sets and models.
ANSWERS: tuple[str, ...] = ("no", "yes", *SHAPES, *COLOURS, *COUNT_WORDS)

# question type -> (is relational, template). Placeholders: {c}, {c2} colours; {s} a shape.
QUESTION_TYPES: dict[str, tuple[bool, str]] = {
    "shape": (False, "what shape is the {c} object ?"),
    "left_half": (False, "is the {c} object on the left ?"),
    "top_half": (False, "is the {c} object on the top ?"),
    "exists": (False, "is there a {c} {s} ?"),
    "count_shape": (False, "how many {s} objects are there ?"),
    "closest_shape": (True, "what shape is the object closest to the {c} object ?"),
    "furthest_shape": (True, "what shape is the object furthest from the {c} object ?"),
    "closest_colour": (True, "what colour is the object closest to the {c} object ?"),
    "left_of": (True, "is the {c} object left of the {c2} object ?"),
    "count_same_shape": (True, "how many other objects have the same shape as the {c} object ?"),
}


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are drawn. ``image_size = grid * cell`` pixels square."""

    grid: int = 6
    cell: int = 8
    min_objects: int = 4
    max_objects: int = 6

    def __post_init__(self) -> None:
        if self.grid < 3 or self.cell < 4:
            raise ValueError(f"grid={self.grid} must be >= 3 and cell={self.cell} >= 4")
        if not 2 <= self.min_objects <= self.max_objects <= min(MAX_OBJECTS, len(COLOURS)):
            raise ValueError(
                f"need 2 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects})"
                f" <= {min(MAX_OBJECTS, len(COLOURS))}"
            )
        if self.max_objects > self.grid * self.grid:
            raise ValueError(f"max_objects={self.max_objects} does not fit a {self.grid}x{self.grid} grid")

    @property
    def image_size(self) -> int:
        return self.grid * self.cell


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    col: int


@dataclass(frozen=True)
class Question:
    """One question about one scene. ``answer`` is a member of :data:`ANSWERS`."""

    scene: int
    qtype: str
    text: str
    answer: str

    @property
    def relational(self) -> bool:
        return QUESTION_TYPES[self.qtype][0]


@lru_cache(maxsize=None)
def _shape_mask(shape: str, cell: int) -> np.ndarray:
    """(cell, cell) bool mask of a shape centred in its cell with a one-pixel margin (read-only, cached)."""
    yy, xx = np.mgrid[0:cell, 0:cell]
    inner = cell - 2  # pixels the shape may use
    centre = (cell - 1) / 2
    if shape == "square":
        return (yy >= 1) & (yy <= cell - 2) & (xx >= 1) & (xx <= cell - 2)
    if shape == "circle":
        return (yy - centre) ** 2 + (xx - centre) ** 2 <= (inner / 2) ** 2 + 0.25
    if shape == "triangle":
        # apex at the top row, base on the bottom row: half-width grows linearly downwards
        depth = (yy - 1) / max(inner - 1, 1)
        return (yy >= 1) & (yy <= cell - 2) & (np.abs(xx - centre) <= depth * inner / 2 + 0.01)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(objects: list[SceneObject], spec: SceneSpec) -> np.ndarray:
    """Draw a scene: ``(H, W, 3)`` uint8 on a dark grey background."""
    size = spec.image_size
    image = np.full((size, size, 3), 40, dtype=np.uint8)
    masks = {s: _shape_mask(s, spec.cell) for s in SHAPES}
    for obj in objects:
        y0, x0 = obj.row * spec.cell, obj.col * spec.cell
        patch = image[y0 : y0 + spec.cell, x0 : x0 + spec.cell]
        patch[masks[obj.shape]] = COLOURS[obj.colour]
    return image


def sample_scene(rng: np.random.Generator, spec: SceneSpec) -> list[SceneObject]:
    """Distinct colours, distinct cells, shapes drawn independently."""
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    cells = rng.choice(spec.grid * spec.grid, size=n, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=n)
    names = list(COLOURS)
    return [
        SceneObject(names[c], SHAPES[s], int(cell) // spec.grid, int(cell) % spec.grid)
        for c, s, cell in zip(colours, shapes, cells)
    ]


def _dist2(a: SceneObject, b: SceneObject) -> int:
    return (a.row - b.row) ** 2 + (a.col - b.col) ** 2


def _unique_extreme(anchor: SceneObject, others: list[SceneObject], pick_max: bool) -> SceneObject | None:
    """The other object closest to (furthest from) ``anchor``; None on a distance tie."""
    dists = [_dist2(anchor, o) for o in others]
    best = max(dists) if pick_max else min(dists)
    winners = [o for o, d in zip(others, dists) if d == best]
    return winners[0] if len(winners) == 1 else None


def ask(qtype: str, objects: list[SceneObject], spec: SceneSpec, rng: np.random.Generator) -> tuple[str, str] | None:
    """Instantiate one question of ``qtype`` about a scene: ``(text, answer)``.

    Returns None when this scene cannot give the question an unambiguous answer (a distance tie,
    an object in the middle column); the caller draws again.
    """
    template = QUESTION_TYPES[qtype][1]
    anchor = objects[int(rng.integers(len(objects)))]
    others = [o for o in objects if o is not anchor]
    half = spec.grid / 2
    if qtype == "shape":
        return template.format(c=anchor.colour), anchor.shape
    if qtype == "left_half":
        if spec.grid % 2 and anchor.col == spec.grid // 2:
            return None
        return template.format(c=anchor.colour), "yes" if anchor.col < half else "no"
    if qtype == "top_half":
        if spec.grid % 2 and anchor.row == spec.grid // 2:
            return None
        return template.format(c=anchor.colour), "yes" if anchor.row < half else "no"
    if qtype == "exists":
        # Half the time ask about an object that is there, half the time about a near miss, so
        # "yes" and "no" are equally likely and the colour alone does not give the answer away.
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        if rng.random() < 0.5:
            colour, shape = anchor.colour, anchor.shape
        present = any(o.colour == colour and o.shape == shape for o in objects)
        return template.format(c=colour, s=shape), "yes" if present else "no"
    if qtype == "count_shape":
        shape = str(rng.choice(SHAPES))
        return template.format(s=shape), str(sum(o.shape == shape for o in objects))
    if qtype in ("closest_shape", "furthest_shape", "closest_colour"):
        target = _unique_extreme(anchor, others, pick_max=qtype == "furthest_shape")
        if target is None:
            return None
        answer = target.colour if qtype == "closest_colour" else target.shape
        return template.format(c=anchor.colour), answer
    if qtype == "left_of":
        other = others[int(rng.integers(len(others)))]
        if other.col == anchor.col:
            return None
        return template.format(c=anchor.colour, c2=other.colour), "yes" if anchor.col < other.col else "no"
    if qtype == "count_same_shape":
        return template.format(c=anchor.colour), str(sum(o.shape == anchor.shape for o in others))
    raise ValueError(f"unknown question type {qtype!r}; known: {sorted(QUESTION_TYPES)}")


def generate(
    num_scenes: int,
    questions_per_scene: int,
    seed: int,
    spec: SceneSpec = SceneSpec(),
    qtypes: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, list[Question]]:
    """Generate a split: images ``(N, H, W, 3)`` uint8 and its questions.

    Question types cycle in a fixed order per scene so every split has the same mix.
    """
    if num_scenes < 1 or questions_per_scene < 1:
        raise ValueError(f"num_scenes={num_scenes} and questions_per_scene={questions_per_scene} must be >= 1")
    qtypes = tuple(qtypes or QUESTION_TYPES)
    unknown = set(qtypes) - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; known: {sorted(QUESTION_TYPES)}")
    rng = np.random.default_rng(seed)
    images = np.empty((num_scenes, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    questions: list[Question] = []
    for index in range(num_scenes):
        objects = sample_scene(rng, spec)
        images[index] = render(objects, spec)
        for k in range(questions_per_scene):
            qtype = qtypes[(index * questions_per_scene + k) % len(qtypes)]
            for _ in range(32):  # draws that hit a tie are redrawn; 32 misses in a row never happens in practice
                asked = ask(qtype, objects, spec, rng)
                if asked is not None:
                    questions.append(Question(index, qtype, *asked))
                    break
    return images, questions


def vocabulary() -> list[str]:
    """Every word any template can produce, sorted (the tokenizer's word list)."""
    words: set[str] = set()
    for _, template in QUESTION_TYPES.values():
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update(COLOURS)
    words.update(SHAPES)
    return sorted(words)
