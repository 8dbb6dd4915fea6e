"""Scenes of the synthetic world: sampled from (seed, index) alone, drawn with PIL.

Truth boxes are never computed from the sampled geometry: every object and word is also
drawn on a mask of its own, and its box is that mask's bounding box, so a box is exactly
the drawn pixels (anti-aliasing included). Marks (Set-of-Mark) are drawn last, on top.

Two renderers share the vocabulary: `train` (random placement, the training fonts) and
`heldout` (jittered-grid placement, other fonts, supersampled edges, outlined shapes), so
evaluation also measures how well the model generalises over how the world is drawn.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .vocab import (COLOUR_NAMES, COLOURS, HELDOUT_FONTS, SHAPES, SIZE_RANGES, SIZES, TRAIN_FONTS, WORDS,
                    font_paths)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
RENDERERS = ("train", "heldout")
MARK_STYLES = ("disc", "box")


@dataclass
class WorldObject:
    shape: str
    colour: str
    size: str
    box: Box
    mark: int | None = None


@dataclass
class WorldWord:
    text: str
    box: Box
    font: str


@dataclass
class Scene:
    id: str
    width: int
    height: int
    background: str                      # "plain" | "gradient" | "noise"
    objects: list[WorldObject] = field(default_factory=list)
    words: list[WorldWord] = field(default_factory=list)
    mark_style: str | None = None        # None | "disc" | "box"
    renderer: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Scene":
        d = dict(d)
        d["objects"] = [WorldObject(**{**o, "box": tuple(o["box"])}) for o in d.get("objects", [])]
        d["words"] = [WorldWord(**{**w, "box": tuple(w["box"])}) for w in d.get("words", [])]
        return Scene(**d)


def scene_rng(seed: int, index: int) -> random.Random:
    """The one source of randomness of scene `index` of world `seed` (stable across runs)."""
    return random.Random(seed * 1_000_003 + index)


# --- sampling ------------------------------------------------------------------------------
def _image_size(rng: random.Random) -> tuple[int, int]:
    long_side = rng.randint(256, 1024)
    ratio = rng.choice((1 / 4, 1 / 3, 1 / 2, 2, 3, 4)) if rng.random() < 0.3 else math.exp(rng.uniform(-1.2, 1.2))
    ratio = min(max(ratio, 0.25), 4.0)  # width / height
    if ratio >= 1:
        return long_side, max(int(round(long_side / ratio)), 64)
    return max(int(round(long_side * ratio)), 64), long_side


def _pick_objects(rng: random.Random) -> list[tuple[str, str, str]]:
    """(shape, colour, size) triples; small pools make repeats and look-alikes common."""
    n = rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8))
    shapes = rng.sample(SHAPES, rng.randint(1, 4))
    colours = rng.sample(COLOUR_NAMES, rng.randint(1, 4))
    out = []
    for _ in range(n):
        shape = rng.choice(shapes) if rng.random() < 0.8 else rng.choice(SHAPES)
        colour = rng.choice(colours) if rng.random() < 0.8 else rng.choice(COLOUR_NAMES)
        out.append((shape, colour, rng.choice(SIZES)))
    return out


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: random.Random, w: int, h: int, bw: float, bh: float, taken: list, gap: float,
           grid: bool) -> tuple[float, float, float, float] | None:
    for attempt in range(60):
        if grid:  # held-out placement: a jittered grid of slots
            cols, rows = max(1, int(w // (bw * 1.6))), max(1, int(h // (bh * 1.6)))
            cx = (rng.randrange(cols) + 0.5 + rng.uniform(-0.2, 0.2)) * w / cols
            cy = (rng.randrange(rows) + 0.5 + rng.uniform(-0.2, 0.2)) * h / rows
            x0, y0 = cx - bw / 2, cy - bh / 2
        else:
            x0, y0 = rng.uniform(2, max(2.0, w - bw - 2)), rng.uniform(2, max(2.0, h - bh - 2))
        cand = (x0, y0, x0 + bw, y0 + bh)
        if cand[0] < 1 or cand[1] < 1 or cand[2] > w - 1 or cand[3] > h - 1:
            continue
        if not any(_overlaps(cand, t, gap) for t in taken):
            return cand
    return None


# --- drawing -------------------------------------------------------------------------------
def _shape_outline(shape: str, box: tuple[float, float, float, float], rot: float) -> list[tuple[float, float]] | None:
    """Polygon vertices for polygonal shapes; None for shapes PIL draws natively."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "triangle":
        return [(cx + rx * math.cos(rot + a), cy + ry * math.sin(rot + a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "hexagon":
        return [(cx + rx * math.cos(rot + k * math.pi / 3), cy + ry * math.sin(rot + k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = rot - math.pi / 2 + k * math.pi / 5
            pts.append((cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)))
        return pts
    if shape == "cross":
        t = 0.32
        return [(cx - rx * t, y0), (cx + rx * t, y0), (cx + rx * t, cy - ry * t), (x1, cy - ry * t),
                (x1, cy + ry * t), (cx + rx * t, cy + ry * t), (cx + rx * t, y1), (cx - rx * t, y1),
                (cx - rx * t, cy + ry * t), (x0, cy + ry * t), (x0, cy - ry * t), (cx - rx * t, cy - ry * t)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: Any,
               rot: float = 0.0, outline: Any = None, width: int = 0) -> None:
    poly = _shape_outline(shape, box, rot)
    if poly is not None:
        draw.polygon(poly, fill=fill, outline=outline, width=width)
    elif shape in ("circle", "ellipse"):
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape in ("square", "rectangle"):
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(rng: random.Random, w: int, h: int) -> tuple[Image.Image, str, bool]:
    light = rng.random() < 0.65
    base = np.array([rng.randint(165, 215) if light else rng.randint(40, 85) for _ in range(3)], dtype=np.float32)
    base = base.mean() * 0.7 + base * 0.3  # muted: far from every saturated object colour
    kind = rng.choice(("plain", "plain", "gradient", "noise"))
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        other = base + np.array([rng.uniform(-30, 30) for _ in range(3)])
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.shape[0] == w else t[:, None, None]
        img = img * (1 - t) + other * t
    elif kind == "noise":
        nrng = np.random.default_rng(rng.getrandbits(32))
        img = img + nrng.normal(0, 7, size=(h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"), kind, light


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _mask_box(mask: Image.Image) -> Box | None:
    bbox = mask.getbbox()
    return None if bbox is None else tuple(int(v) for v in bbox)  # type: ignore[return-value]


def render_scene(seed: int, index: int, renderer: str = "train", text_rich: bool = False) -> tuple[Scene, Image.Image]:
    """Scene `index` of world `seed`, and its picture. Deterministic in (seed, index, renderer, text_rich).

    `text_rich` draws the same scene's objects with 4-8 words and always with marks: the experts'
    reading and mark pretraining sees many more letters and digits a step (an ordinary scene has
    1.2 words and marks in 30% of scenes). Held-out evaluation never uses it."""
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}")
    rng = scene_rng(seed, index)
    heldout = renderer == "heldout"
    w, h = _image_size(rng)
    image, bg_kind, light = _background(rng, w, h)
    scale = 3 if heldout else 1  # held-out edges are supersampled (smooth), train edges are hard
    big = image.resize((w * scale, h * scale), Image.NEAREST) if scale > 1 else image
    draw = ImageDraw.Draw(big)
    long_side = max(w, h)
    gap = 0.03 * long_side
    scene = Scene(id=f"{renderer}-{seed}-{index:06d}" + ("-rich" if text_rich else ""), width=w, height=h, background=bg_kind, renderer=renderer)
    taken: list[tuple[float, float, float, float]] = []
    for shape, colour, size in _pick_objects(rng):
        lo, hi = SIZE_RANGES[size]
        side = rng.uniform(lo, hi) * long_side
        bw = bh = side
        if shape in ("rectangle", "ellipse"):
            long_, short = side * 1.15, side * rng.uniform(0.45, 0.6)
            bw, bh = (long_, short) if rng.random() < 0.5 else (short, long_)
        spot = _place(rng, w, h, bw, bh, taken, gap, grid=heldout)
        if spot is None:
            continue
        taken.append(spot)
        rot = rng.uniform(-0.3, 0.3) if shape in ("triangle", "star", "hexagon") else 0.0
        sbox = tuple(v * scale for v in spot)
        mask = Image.new("L", big.size, 0)
        draw_shape(ImageDraw.Draw(mask), shape, sbox, fill=255, rot=rot)
        edge = tuple(int(c * 0.55) for c in COLOURS[colour]) if heldout else None
        draw_shape(draw, shape, sbox, fill=COLOURS[colour], rot=rot, outline=edge, width=2 * scale if heldout else 0)
        box = _mask_box(mask.resize((w, h), Image.BOX) if scale > 1 else mask)
        if box is not None:
            scene.objects.append(WorldObject(shape, colour, size, box))
    _draw_words(rng, scene, big, draw, taken, scale, light, heldout, text_rich)
    if scale > 1:
        image = big.resize((w, h), Image.LANCZOS)
    else:
        image = big
    if scene.objects and (rng.random() < 0.3 or text_rich):
        scene.mark_style = rng.choice(MARK_STYLES)
        _draw_marks(rng, scene, image)
    return scene, image


def _draw_words(rng: random.Random, scene: Scene, big: Image.Image, draw: ImageDraw.ImageDraw,
                taken: list, scale: int, light: bool, heldout: bool, text_rich: bool = False) -> None:
    n_words = rng.choice((0, 0, 1, 1, 1, 2, 2, 3))
    if text_rich:
        n_words = rng.randint(4, 8)
    fonts = font_paths(HELDOUT_FONTS if heldout else TRAIN_FONTS)
    w, h = scene.width, scene.height
    for _ in range(n_words):
        text = rng.choice(WORDS)
        case = rng.random()
        text = text.upper() if case < 0.35 else text.capitalize() if case < 0.5 else text
        font_path = str(rng.choice(fonts))
        px = max(10, int(rng.uniform(0.05, 0.10) * max(w, h)))
        font = _font(font_path, px * scale)
        l, t, r, b = font.getbbox(text)
        tw, th = (r - l) / scale, (b - t) / scale
        if tw > w - 4 or th > h - 4:
            continue
        spot = _place(rng, w, h, tw, th, taken, 0.02 * max(w, h), grid=False)
        if spot is None:
            continue
        taken.append(spot)
        ink = (rng.randint(0, 50),) * 3 if light else (rng.randint(215, 255),) * 3
        origin = (spot[0] * scale - l, spot[1] * scale - t)
        mask = Image.new("L", big.size, 0)
        ImageDraw.Draw(mask).text(origin, text, font=font, fill=255)
        draw.text(origin, text, font=font, fill=ink)
        box = _mask_box(mask.resize((w, h), Image.BOX) if scale > 1 else mask)
        if box is not None:
            scene.words.append(WorldWord(text, box, Path(font_path).stem))


def _draw_marks(rng: random.Random, scene: Scene, image: Image.Image) -> None:
    """Numbered marks 1..n on the objects in random order: a dark disc with a white number at
    the object's centre, or a box around it with the number in a filled tab."""
    order = list(range(len(scene.objects)))
    rng.shuffle(order)
    draw = ImageDraw.Draw(image)
    font_path = str(font_paths(TRAIN_FONTS)[0])
    for number, i in enumerate(order, start=1):
        obj = scene.objects[i]
        obj.mark = number
        x0, y0, x1, y1 = obj.box
        side = min(x1 - x0, y1 - y0)
        if scene.mark_style == "disc":
            r = max(6.0, 0.22 * side)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(20, 20, 20))
            draw.text((cx, cy), str(number), font=_font(font_path, max(8, int(1.3 * r))), fill=(255, 255, 255),
                      anchor="mm")
        else:
            draw.rectangle((x0 - 2, y0 - 2, x1 + 1, y1 + 1), outline=(20, 20, 20), width=2)
            size = max(9, int(0.3 * side))
            font = _font(font_path, size)
            draw.rectangle((x0 - 2, y0 - 2, x0 + size * 0.8 * len(str(number)) + 2, y0 + size + 2), fill=(20, 20, 20))
            draw.text((x0 + 1, y0), str(number), font=font, fill=(255, 255, 255))
