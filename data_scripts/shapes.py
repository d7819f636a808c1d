"""Synthetic captioned scenes: one or two coloured shapes, five paraphrased captions each.

The point of this data set is to train and test the whole pipeline anywhere, without a download,
on a task that is easy to state but cannot be solved by bag-of-words matching: with 6 colours,
4 shapes, 2 sizes, 9 single-shape positions and 4 two-shape relations, an image's nearest
competitors differ only in a swapped colour, a swapped side or the shape count, so a model must
bind attributes to objects and read spatial relations. An untrained model is at chance.

Every scene is drawn from ``random.Random(f"{seed}:{index}")``, so image ``index`` is the same
whatever the number of images, and the same seed gives the same bytes.

Vocabulary: colours red/green/blue/yellow/purple/orange; shapes circle/square/triangle/star;
sizes small (also "little", "tiny") / large (also "big"); relations left/right/above/below.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (0.08, 0.11), "large": (0.16, 0.21)}  # radius as a fraction of the image side
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
RELATION_OF_IT = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
SIDE_WORDS = {"left": "on the left", "right": "on the right", "above": "at the top", "below": "at the bottom"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
PROBABILITY_TWO_SHAPES = 0.6


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    x: float  # centre, pixels
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """What an image shows. For two shapes, ``relation`` is where the first is relative to the second."""

    shapes: tuple[Shape, ...]
    relation: str = ""
    cell: tuple[int, int] = (1, 1)  # (row, col) of a single shape on a 3x3 grid
    background: tuple[int, int, int] = (255, 255, 255)


def make_example(index: int, seed: int, image_size: int) -> tuple[bytes, list[str], Scene]:
    """Image ``index`` of the set with ``seed``: PNG bytes, five distinct captions, the scene."""
    rng = random.Random(f"{seed}:{index}")
    scene = sample_scene(rng, image_size)
    return encode_png(draw_scene(scene, image_size, rng)), write_captions(scene, rng), scene


def sample_scene(rng: random.Random, size: int) -> Scene:
    background = tuple(rng.randint(225, 255) for _ in range(3))
    if rng.random() < PROBABILITY_TWO_SHAPES:
        return _two_shape_scene(rng, size, background)
    row, col = rng.randrange(3), rng.randrange(3)
    shape = _attributes(rng, size)
    cell = size / 3
    slack = max(0.0, cell / 2 - shape[3] - 1)
    x = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.5
    y = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.5
    x, y = _clamp(x, shape[3], size), _clamp(y, shape[3], size)
    return Scene((Shape(*shape[:3], x, y, shape[3]),), cell=(row, col), background=background)


def _attributes(rng: random.Random, size: int, avoid: tuple[str, str, str] = None):
    while True:
        colour, shape, size_name = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))
        if (colour, shape, size_name) != avoid:
            lo, hi = SIZES[size_name]
            return colour, shape, size_name, rng.uniform(lo, hi) * size


def _two_shape_scene(rng: random.Random, size: int, background) -> Scene:
    """Two non-overlapping shapes whose relation along one axis dominates the other axis."""
    first = _attributes(rng, size)
    second = _attributes(rng, size, avoid=first[:3])
    horizontal = rng.random() < 0.5
    r1, r2 = first[3], second[3]
    gap = 0.04 * size
    for _ in range(100):
        a1 = rng.uniform(r1, size - r1)  # along the relation axis
        a2 = rng.uniform(r2, size - r2)
        b1 = rng.uniform(r1, size - r1)  # across it
        b2 = rng.uniform(r2, size - r2)
        along, across = abs(a1 - a2), abs(b1 - b2)
        if along >= r1 + r2 + gap and across <= 0.5 * along:
            break
    else:  # tiny images: fall back to a fixed, valid arrangement
        a1, a2, b1, b2 = r1, size - r2, size / 2, size / 2
    if horizontal:
        s1, s2 = Shape(*first[:3], a1, b1, r1), Shape(*second[:3], a2, b2, r2)
        relation = "left" if a1 < a2 else "right"
    else:
        s1, s2 = Shape(*first[:3], b1, a1, r1), Shape(*second[:3], b2, a2, r2)
        relation = "above" if a1 < a2 else "below"
    return Scene((s1, s2), relation=relation, background=background)


def _clamp(v: float, r: float, size: int) -> float:
    return min(max(v, r), size - r)


def draw_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[s.colour])
        _draw_shape(draw, s, fill, rng.uniform(0, 2 * math.pi))
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill, angle: float) -> None:
    x, y, r = s.x, s.y, s.radius
    if s.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif s.shape == "square":
        h = r * 0.85
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif s.shape == "triangle":  # pointing up, so it never reads as a different shape
        draw.polygon([(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=fill)
    else:  # five-pointed star, randomly rotated
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = angle + k * math.pi / 5
            points.append((x + radius * math.sin(a), y - radius * math.cos(a)))
        draw.polygon(points, fill=fill)


def encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=1)  # fast; flat colours compress well anyway
    return buffer.getvalue()


# ---- captions ----------------------------------------------------------------------------


def write_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """``count`` distinct captions, each from a different template with random word choices."""
    templates = _two_shape_templates if len(scene.shapes) == 2 else _one_shape_templates
    options = templates(scene)
    rng.shuffle(options)
    captions: list[str] = []
    for make in options:
        caption = make(rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            return captions
    raise AssertionError("caption grammar produced too few distinct captions")  # templates >= count


def _noun_phrase(s: Shape, rng: random.Random, need_size: bool = False, article: bool = True) -> str:
    words = [s.colour, s.shape]
    if need_size or rng.random() < 0.5:
        words.insert(0, rng.choice(SIZE_WORDS[s.size]))
    phrase = " ".join(words)
    if not article:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _two_shape_templates(scene: Scene):
    a, b = scene.shapes
    rel, inv = scene.relation, OPPOSITE[scene.relation]
    need = a.colour == b.colour and a.shape == b.shape  # then only the size tells them apart

    def np_(s, rng):
        return _noun_phrase(s, rng, need)

    def the(s, rng):
        return "the " + _noun_phrase(s, rng, need, article=False)

    return [
        lambda rng: f"{np_(a, rng)} {rng.choice(RELATION_WORDS[rel])} {np_(b, rng)}",
        lambda rng: f"{np_(b, rng)} {rng.choice(RELATION_WORDS[inv])} {np_(a, rng)}",
        lambda rng: f"there is {np_(a, rng)} {rng.choice(RELATION_WORDS[rel])} {np_(b, rng)}",
        lambda rng: f"two shapes: {np_(b, rng)} {rng.choice(RELATION_WORDS[inv])} {np_(a, rng)}",
        lambda rng: f"{np_(a, rng)} and {np_(b, rng)}, with {the(a, rng)} {SIDE_WORDS[rel]}",
        lambda rng: f"{SIDE_WORDS[rel]} {np_(a, rng)}, {SIDE_WORDS[inv]} {np_(b, rng)}",
        lambda rng: f"{np_(b, rng)} with {np_(a, rng)} {RELATION_OF_IT[rel]}",
    ]


def _position_phrase(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "in the center"
    if row == 1:
        return f"on the {COLS[col]}"
    if col == 1:
        return "at the top" if row == 0 else "at the bottom"
    return f"in the {ROWS[row]} {COLS[col]} corner"


def _one_shape_templates(scene: Scene):
    """Every caption names the position, so no caption fits the same shape elsewhere."""
    (s,) = scene.shapes
    where = _position_phrase(*scene.cell)
    return [
        lambda rng: f"{_noun_phrase(s, rng)} {where}",
        lambda rng: f"a single {_noun_phrase(s, rng, article=False)} {where}",
        lambda rng: f"one {_noun_phrase(s, rng, need_size=True, article=False)} {where} on a plain background",
        lambda rng: f"there is only {_noun_phrase(s, rng)} {where}",
        lambda rng: f"{where}, {_noun_phrase(s, rng, need_size=True)}",
        lambda rng: f"just one shape: {_noun_phrase(s, rng)}, {where}",
        lambda rng: f"a picture of {_noun_phrase(s, rng)} {where}",
    ]
