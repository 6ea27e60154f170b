"""A procedural image-text world: coloured shapes on backgrounds, with English captions.

Every image is a pure function of ``(seed, split, index)`` (plus the requested class and the domain): item
``i`` of split ``s`` with seed ``k`` draws all its factors from ``numpy.random.default_rng([k, s, i])`` and
always renders the same pixels. Class-conditional images (the downstream task) are keyed by
``(k, s, combo_id(colour, shape), j)`` instead, so the j-th "red star" never depends on the task's layout.

Factors of a scene: shape (8), colour (8), size (small / large), position (4 corners + center; large objects
are centred), fill style (solid / striped / outlined), background, rotation (small jitter, not captioned).

Two domains (:data:`DOMAINS`):

* ``clean``: the pretraining domain. Plain black / grey / white backgrounds, crisp anti-aliased rendering.
* ``shifted``: the downstream domain. A systematic colour cast (every image's hues rotated by 25 degrees
  about the grey axis, so red drifts towards orange, blue towards purple; white stays white), random
  low-contrast textured backgrounds (gradients, checkerboards, low-frequency blobs; grey with a faint random
  tint), stronger colour jitter of the object, global brightness / contrast jitter, slight blur and pixel
  noise. None of this appears in pretraining: zero-shot accuracy drops a lot but stays far above chance,
  and the systematic part is what prompt tuning on the downstream data can learn to undo.

Captions come from varied templates with optional attributes ("a small red star on a grey background",
"red striped star, top left", "a photo of a red star."); every word is a common English word that the CLIP
BPE tokenizer keeps whole (except "outlined", two tokens).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
"""Side of the rendered images in pixels (the toy CLIP's input size)."""

SUPERSAMPLE = 4
"""Shapes are drawn at ``SUPERSAMPLE`` times the resolution and box-filtered down (anti-aliasing)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 85, 225),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 20),
    "purple": (130, 50, 185),
    "pink": (250, 125, 195),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon")
SIZES: dict[str, float] = {"small": 0.21, "large": 0.37}  # radius as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.29, 0.29),
    "top right": (0.71, 0.29),
    "bottom left": (0.29, 0.71),
    "bottom right": (0.71, 0.71),
    "center": (0.5, 0.5),
}
FILLS: tuple[str, ...] = ("solid", "striped", "outlined")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18),
    "grey": (125, 125, 125),
    "white": (238, 238, 238),
}
TEXTURED = "textured"
"""The background name of every image in the shifted domain (never captioned, never in the vocabulary)."""


class Split(IntEnum):
    """Stream ids: the second element of every item's seed, so splits never share an image."""

    PRETRAIN = 0
    PRETRAIN_EVAL = 1
    TRAIN = 2
    TEST = 3
    NOVEL_TEST = 4
    CAPTION = 5


@dataclass(frozen=True)
class Domain:
    """How images are rendered beyond the scene itself (the distribution shift knobs)."""

    name: str
    textured_background: bool
    background_saturation: float  # textured backgrounds: weight of a random colour mixed into grey (0..1)
    colour_jitter: float  # max per-channel shift of the object colour, in 0..255 units
    brightness: tuple[float, float]  # global multiplicative factor range
    contrast: tuple[float, float]  # global contrast factor range (around the image mean)
    blur: tuple[float, float]  # Gaussian blur radius range in output pixels (0 = none)
    noise_std: tuple[float, float]  # additive Gaussian pixel-noise std range, in 0..255 units
    hue_shift: float = 0.0  # a fixed hue rotation of the whole image, degrees (a systematic colour cast)
    texture_contrast: float = 1.0  # textured backgrounds: amplitude of the pattern around its mean (0..1)
    background_kinds: tuple[int, ...] = (0, 1, 2)  # textured backgrounds: 0 gradient, 1 checkerboard, 2 blobs


DOMAINS: dict[str, Domain] = {
    "clean": Domain(
        name="clean",
        textured_background=False,
        background_saturation=0.0,
        colour_jitter=8.0,
        brightness=(1.0, 1.0),
        contrast=(1.0, 1.0),
        blur=(0.0, 0.0),
        noise_std=(0.0, 3.0),
    ),
    "shifted": Domain(
        name="shifted",
        textured_background=True,
        background_saturation=0.1,
        colour_jitter=25.0,
        brightness=(0.75, 1.2),
        contrast=(0.7, 1.05),
        blur=(0.0, 0.5),
        noise_std=(2.0, 8.0),
        hue_shift=25.0,
        texture_contrast=0.4,
    ),
}


def get_domain(domain: str | Domain) -> Domain:
    """Resolve a domain name (``clean`` / ``shifted``) or pass a :class:`Domain` through."""
    if isinstance(domain, Domain):
        return domain
    try:
        return DOMAINS[domain]
    except KeyError:
        raise ValueError(f"unknown toy-world domain {domain!r}: use one of {sorted(DOMAINS)}") from None


@dataclass(frozen=True)
class Scene:
    """The semantic content of one image (what a caption may talk about) plus its geometric jitter."""

    shape: str
    colour: str
    size: str
    position: str
    fill: str
    background: str
    rotation: float  # degrees
    offset: tuple[float, float]  # centre jitter, fraction of the image side
    scale: float  # radius jitter factor


def item_rng(seed: int, split: int, *index: int) -> np.random.Generator:
    """The generator that owns item ``index`` (one or more ints) of ``split`` for ``seed``."""
    return np.random.default_rng([int(seed), int(split), *(int(i) for i in index)])


def sample_scene(
    rng: np.random.Generator,
    domain: str | Domain = "clean",
    colour: str | None = None,
    shape: str | None = None,
) -> Scene:
    """Draw a scene; ``colour`` / ``shape`` fix the class, every other factor is random."""
    dom = get_domain(domain)
    shape = shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour if colour is not None else list(COLOURS)[int(rng.integers(len(COLOURS)))]
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown shape/colour {shape!r}/{colour!r}")
    size = "small" if rng.random() < 0.6 else "large"
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))] if size == "small" else "center"
    fill = FILLS[int(rng.integers(len(FILLS)))]
    if dom.textured_background:
        background = TEXTURED
    else:
        options = [b for b in BACKGROUNDS if b != colour]
        background = options[int(rng.integers(len(options)))]
    rotation = float(rng.uniform(-15.0, 15.0))
    offset = (float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04)))
    scale = float(rng.uniform(0.9, 1.1))
    return Scene(shape, colour, size, position, fill, background, rotation, offset, scale)


# ---------------------------------------------------------------------------------------------------------
# rendering


def _rotate(points: list[tuple[float, float]], degrees: float) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _shape_polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a polygonal shape, y pointing down (image coordinates)."""
    if shape == "square":
        h = 0.8
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(math.cos(math.radians(a)), -math.sin(math.radians(a)) + 0.15) for a in (90, 210, 330)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = math.radians(90 + 36 * k)
            pts.append((r * math.cos(a), -r * math.sin(a) + 0.08))
        return pts
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -(y + 2.5) / 15.0))
        return pts
    if shape == "cross":
        w = 0.32
        return [
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        ]  # fmt: skip
    if shape == "diamond":
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    raise ValueError(shape)


def _shape_mask(scene: Scene, side: int) -> Image.Image:
    """The object's silhouette as an 8-bit mask of ``side`` x ``side`` pixels."""
    px, py = POSITIONS[scene.position]
    cx = (px + scene.offset[0]) * side
    cy = (py + scene.offset[1]) * side
    r = SIZES[scene.size] * scene.scale * side
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif scene.shape == "moon":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ((dx, dy),) = _rotate([(0.5 * r, -0.12 * r)], scene.rotation)
        r2 = 0.82 * r
        draw.ellipse((cx + dx - r2, cy + dy - r2, cx + dx + r2, cy + dy + r2), fill=0)
    else:
        pts = _rotate(_shape_polygon(scene.shape), scene.rotation)
        draw.polygon([(cx + r * x, cy + r * y) for x, y in pts], fill=255)
    return mask


@functools.lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row / column coordinates (float32, read-only), cached per size."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grey-scale erosion with a (2 radius + 1)^2 square (separable running minimum, zero padding)."""
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        n = out.shape[axis]
        acc = padded.take(range(0, n), axis=axis)
        for shift in range(1, 2 * radius + 1):
            acc = np.minimum(acc, padded.take(range(shift, shift + n), axis=axis))
        out = acc
    return out


def _background(scene: Scene, rng: np.random.Generator, dom: Domain, side: int) -> np.ndarray:
    """A float32 [side, side, 3] background in 0..255."""
    if not dom.textured_background:
        base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
        base = np.clip(base + rng.uniform(-10, 10, size=3), 0, 255)
        return np.broadcast_to(base, (side, side, 3)).astype(np.float32)

    def muted() -> np.ndarray:
        c = rng.uniform(0, 255, size=3)
        grey = rng.uniform(60, 190)
        w = dom.background_saturation
        return (w * c + (1 - w) * grey).astype(np.float32)

    kind = dom.background_kinds[int(rng.integers(len(dom.background_kinds)))]
    yy, xx = (g / side for g in _grid(side))
    if kind == 0:  # linear gradient between two muted colours
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a)) * 0.7 + 0.5
        t = np.clip(t - t.mean() + 0.5, 0, 1)[..., None]
        tex = (1 - t) * muted() + t * muted()
    elif kind == 1:  # checkerboard, random period and phase
        period = rng.uniform(0.12, 0.3)
        phase = rng.uniform(0, period, size=2)
        chk = ((np.floor((xx + phase[0]) / period) + np.floor((yy + phase[1]) / period)) % 2)[..., None]
        c1, c2 = muted(), muted()
        c2 = 0.5 * c1 + 0.5 * c2  # keep the contrast moderate
        tex = (1 - chk) * c1 + chk * c2
    else:  # low-frequency coloured blobs: a random 4x4 grid upsampled bicubically
        grid = np.stack([muted() for _ in range(16)]).reshape(4, 4, 3).astype(np.uint8)
        img = Image.fromarray(grid, "RGB").resize((side, side), Image.Resampling.BICUBIC)
        tex = np.asarray(img, dtype=np.float32)
    mean = tex.mean(axis=(0, 1), keepdims=True)
    return (mean + dom.texture_contrast * (tex - mean)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _hue_rotation(degrees: float) -> np.ndarray:
    """3x3 RGB rotation by ``degrees`` about the grey axis (greys stay put, hues turn)."""
    a = math.radians(degrees)
    k = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    m = math.cos(a) * np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * np.outer(k, k)
    out = m.astype(np.float32)
    out.flags.writeable = False
    return out


def render_scene(
    scene: Scene, rng: np.random.Generator, domain: str | Domain = "clean", image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """Render ``scene`` as a uint8 RGB array [image_size, image_size, 3] (deterministic given ``rng``)."""
    dom = get_domain(domain)
    side = image_size * SUPERSAMPLE
    mask_img = _shape_mask(scene, side)
    solid = np.asarray(mask_img, dtype=np.float32) / 255.0
    if scene.fill == "solid":
        alpha = solid
    else:
        # outline ring: the silhouette minus its erosion (about 1.6 output pixels thick)
        inner = _erode(solid, round(0.8 * SUPERSAMPLE))
        ring = np.clip(solid - inner, 0.0, 1.0)
        alpha = ring
    if scene.fill == "striped":  # stripes of random angle and period inside, plus the outline
        yy, xx = _grid(side)
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.11, 0.16) * side
        stripes = ((xx * math.cos(a) + yy * math.sin(a)) % period < period / 2).astype(np.float32)
        alpha = np.maximum(ring, inner * stripes)

    # box-filter the coverage down to the output size, then composite there (the background is smooth)
    alpha = alpha.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
    bg = _background(scene, rng, dom, image_size)
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    fg = np.clip(fg + rng.uniform(-dom.colour_jitter, dom.colour_jitter, size=3), 0, 255)
    a3 = alpha[..., None]
    img = bg * (1 - a3) + fg * a3

    lo, hi = dom.brightness
    img = img * rng.uniform(lo, hi)
    lo, hi = dom.contrast
    c = rng.uniform(lo, hi)
    img = (img - img.mean()) * c + img.mean()
    if dom.hue_shift:
        img = img @ _hue_rotation(dom.hue_shift).T
    lo, hi = dom.blur
    radius = rng.uniform(lo, hi)
    if radius > 0.05:
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        img = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    lo, hi = dom.noise_std
    std = rng.uniform(lo, hi)
    if std > 0:
        img = img + rng.normal(0.0, std, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# captions

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left", "in the top left corner"),
    "top right": ("in the top right", "at the top right", "in the top right corner"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the bottom left corner"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the bottom right corner"),
    "center": ("in the center", "in the middle"),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_FILL_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "filled"),
    "striped": ("striped",),
    "outlined": ("outlined", "hollow"),
}

# Slots: {c} colour, {s} shape, {z} size word, {f} fill word, {p} position phrase, {q} bare position
# ("top left"), {b} background colour. Slots in [brackets] are optional (dropped with probability 1/2).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {s}.",
    "a photo of a [{z}] [{f}] {c} {s}.",
    "a [{z}] {c} {s} on a {b} background",
    "a [{z}] [{f}] {c} {s} {p}",
    "{c} [{f}] {s}, {q}",
    "{c} {s} on {b}",
    "there is a [{z}] {c} {s} {p}.",
    "an image of a [{f}] {c} {s} with a {b} background",
    "a {b} background with a [{z}] {c} {s} [{p}]",
    "the {s} is {c}.",
    "a picture of a [{z}] [{f}] {c} {s}",
    "a drawing of a {c} {s} [{p}] on {b}",
    "[{z}] {c} {s}",
    "a {c} {s} shape",
)
_LITERAL_TEMPLATE = CAPTION_TEMPLATES[0]  # keeps CLIP's "a photo of a {}." verbatim (no a -> an)
_SLOT = re.compile(r"\[([^\]]*)\]")


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _fix_articles(text: str) -> str:
    """``a`` -> ``an`` before a vowel sound (``an orange star``, ``an outlined heart``)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random English caption of ``scene`` (colour and shape always named)."""
    template = _choice(rng, CAPTION_TEMPLATES)
    text = _SLOT.sub(lambda m: m.group(1) if rng.random() < 0.5 else "", template)
    text = text.format(
        c=scene.colour,
        s=scene.shape,
        z=_choice(rng, _SIZE_WORDS[scene.size]),
        f=_choice(rng, _FILL_WORDS[scene.fill]),
        p=_choice(rng, _POSITION_PHRASES[scene.position]),
        q=scene.position,
        b=scene.background,
    )
    text = re.sub(r"\s+", " ", text).strip().replace(" .", ".").replace(" ,", ",")
    return text if template == _LITERAL_TEMPLATE else _fix_articles(text)


def vocabulary() -> list[str]:
    """Every word (and punctuation mark) the world's captions and class names can contain.

    Also holds CLIP's ``a photo of a {}.`` template words and the CoOp placeholder ``X``.
    """
    words: set[str] = set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | {".", ",", "x", "an"}
    for template in CAPTION_TEMPLATES:
        bare = re.sub(r"\{[a-z]\}|[\[\]]", " ", template)
        words.update(bare.replace(".", " . ").replace(",", " , ").split())
    for group in (_POSITION_PHRASES, _SIZE_WORDS, _FILL_WORDS):
        for phrases in group.values():
            for phrase in phrases:
                words.update(phrase.split())
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def _index_tuple(index: int | tuple[int, ...]) -> tuple[int, ...]:
    return (index,) if isinstance(index, int) else tuple(index)


def render_item(
    seed: int,
    split: int,
    index: int | tuple[int, ...],
    domain: str | Domain = "clean",
    colour: str | None = None,
    shape: str | None = None,
    image_size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, Scene]:
    """Item ``index`` of ``split``: its uint8 RGB pixels and its scene (all from one generator).

    ``colour`` / ``shape`` fix the object's class; every other factor comes from the item's generator.
    """
    rng = item_rng(seed, split, *_index_tuple(index))
    scene = sample_scene(rng, domain, colour=colour, shape=shape)
    return render_scene(scene, rng, domain, image_size), scene


def combo_id(colour: str, shape: str) -> int:
    """A stable integer for a colour-shape pair (independent of any task's class order)."""
    return SHAPES.index(shape) * len(COLOURS) + list(COLOURS).index(colour)


def render_class_image(
    seed: int,
    split: int,
    colour: str,
    shape: str,
    j: int,
    domain: str | Domain = "clean",
    image_size: int = IMAGE_SIZE,
) -> np.ndarray:
    """The ``j``-th image of class ``colour shape`` in ``split``: uint8 RGB [S, S, 3].

    Keyed by ``(seed, split, combo_id, j)``, so it does not depend on how many images of other classes a
    task draws or in which order the task lists its classes.
    """
    pixels, _ = render_item(seed, split, (combo_id(colour, shape), j), domain, colour, shape, image_size)
    return pixels


def render_image(
    seed: int,
    split: int,
    index: int | tuple[int, ...],
    domain: str | Domain = "clean",
    colour: str | None = None,
    shape: str | None = None,
    image_size: int = IMAGE_SIZE,
) -> Image.Image:
    """Like :func:`render_item` but returns an RGB PIL image."""
    pixels, _ = render_item(seed, split, index, domain, colour, shape, image_size)
    return Image.fromarray(pixels, "RGB")
