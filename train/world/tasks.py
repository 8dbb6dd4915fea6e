"""Task dialogues about a scene, in the training schema, with boxes in the project's text
format (`sphinx_model.boxes`) relative to the canvas the model sees.

The first prompt of each task is the SPHINX wording; the others are paraphrases. Answers are
derived from the scene's truth only. Every question asked has an unambiguous answer: a phrase
names exactly one object, an attribute question is asked only where one object fits.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from sphinx_model.boxes import box_to_text, format_regions, pixels_to_canvas
from sphinx_model.tiling import Anchor, Canvas, canvas_geometry

from .scene import Scene, WorldObject
from .vocab import COLOUR_NAMES, NUMBER_WORDS, PLURALS, SHAPES, object_name, plural

SHORT = " Answer the question using a single word or phrase."
PROMPTS: dict[str, tuple[str, ...]] = {
    "grounding": ("Please provide the bounding box coordinate of the region this sentence describes: {phrase}.",
                  "Where is {phrase}? Give its bounding box.", "Locate {phrase} in the image."),
    "region": ("Please provide a short description for this region: {box}.",
               "What object is in the region {box}?"),
    "detection": ("Detect all objects shown in the image.", "Find every object in the image and give their boxes."),
    "count_shape": ("How many {plural} are there in the image?" + SHORT, "Count the {plural} in the image." + SHORT),
    "count_colour": ("How many {colour} objects are there in the image?" + SHORT,
                     "Count the {colour} objects." + SHORT),
    "colour_of": ("What color is the {shape}?" + SHORT, "Which color does the {shape} have?" + SHORT),
    "shape_of": ("What shape is the {colour} object?" + SHORT, "Name the shape of the {colour} object." + SHORT),
    "ocr": ("What is the text in the image?" + SHORT, "Read the text in the image."),
    "spotting": ("Please detect all texts and provide their bounding box coordinate.",
                 "Find all words in the image and give their boxes."),
    "som": ("What is the object marked with the number {k}? Answer with its color and shape.",
            "Describe the object with mark {k}. Answer with its color and shape."),
    "caption": ("Describe the image briefly.", "What is in the image?"),
}


def reading_order(boxes: list) -> list[int]:
    """Indices sorted by vertical centre, then by left edge (placed items never overlap)."""
    return sorted(range(len(boxes)), key=lambda i: ((boxes[i][1] + boxes[i][3]) / 2, boxes[i][0]))


def describe(obj: WorldObject, scene: Scene, rng: random.Random | None = None) -> str | None:
    """A phrase that names `obj` and no other object of the scene (None if none exists)."""
    options = [(obj.shape,), (obj.colour, obj.shape), (obj.size, obj.shape), (obj.size, obj.colour, obj.shape)]
    unique = []
    for attrs in options:
        matches = [o for o in scene.objects if all(a in (o.shape, o.colour, o.size) for a in attrs)]
        if len(matches) == 1:
            unique.append("the " + " ".join(attrs))
    if not unique:
        return None
    return rng.choice(unique) if rng else unique[-1]


class TaskWriter:
    """Question/answer pairs about one scene, on the canvas geometry of the model's anchor."""

    def __init__(self, scene: Scene, anchor: Anchor = "top-left"):
        self.scene = scene
        self.canvas: Canvas = canvas_geometry(scene.width, scene.height, anchor)

    def box(self, box_px) -> str:
        return box_to_text(box_px, self.canvas)

    def canvas_box(self, box_px) -> tuple[float, ...]:
        return pixels_to_canvas(box_px, self.canvas)

    # Each task returns (question, answer) or None when it does not apply to this scene.
    def grounding(self, rng: random.Random) -> tuple[str, str] | None:
        asked = self.grounding_object(rng)
        return None if asked is None else asked[:2]

    def grounding_object(self, rng: random.Random) -> tuple[str, str, WorldObject, str] | None:
        """A grounding question and answer, the object they are about, and the phrase that names it."""
        named = [(o, describe(o, self.scene, rng)) for o in self.scene.objects]
        named = [(o, p) for o, p in named if p]
        if not named:
            return None
        obj, phrase = rng.choice(named)
        return rng.choice(PROMPTS["grounding"]).format(phrase=phrase), self.box(obj.box), obj, phrase

    def region(self, rng: random.Random) -> tuple[str, str] | None:
        if not self.scene.objects:
            return None
        obj = rng.choice(self.scene.objects)
        return (rng.choice(PROMPTS["region"]).format(box=self.box(obj.box)),
                "the " + object_name(obj.size, obj.colour, obj.shape))

    def detection(self, rng: random.Random) -> tuple[str, str] | None:
        if not self.scene.objects:
            return None
        return rng.choice(PROMPTS["detection"]), self.detection_answer()

    def detection_groups(self) -> dict[str, list[WorldObject]]:
        """The scene's objects by name, in the order the detection answer lists them (names by their
        first object in reading order; within a name, reading order)."""
        objs = self.scene.objects
        groups: dict[str, list[WorldObject]] = {}
        for i in reading_order([o.box for o in objs]):
            o = objs[i]
            groups.setdefault(object_name(o.size, o.colour, o.shape), []).append(o)
        return groups

    def detection_answer(self) -> str:
        return ", ".join(f"<p>{name}</p> " + format_regions([self.canvas_box(o.box) for o in objs])
                         for name, objs in self.detection_groups().items())

    def count_shape(self, rng: random.Random) -> tuple[str, str] | None:
        present = [o.shape for o in self.scene.objects]
        shape = rng.choice(present) if present and rng.random() < 0.85 else rng.choice(SHAPES)
        return rng.choice(PROMPTS["count_shape"]).format(plural=PLURALS[shape]), str(present.count(shape))

    def count_colour(self, rng: random.Random) -> tuple[str, str] | None:
        present = [o.colour for o in self.scene.objects]
        colour = rng.choice(present) if present and rng.random() < 0.85 else rng.choice(COLOUR_NAMES)
        return rng.choice(PROMPTS["count_colour"]).format(colour=colour), str(present.count(colour))

    def colour_of(self, rng: random.Random) -> tuple[str, str] | None:
        counts = Counter(o.shape for o in self.scene.objects)
        single = [o for o in self.scene.objects if counts[o.shape] == 1]
        if not single:
            return None
        obj = rng.choice(single)
        return rng.choice(PROMPTS["colour_of"]).format(shape=obj.shape), obj.colour

    def shape_of(self, rng: random.Random) -> tuple[str, str] | None:
        counts = Counter(o.colour for o in self.scene.objects)
        single = [o for o in self.scene.objects if counts[o.colour] == 1]
        if not single:
            return None
        obj = rng.choice(single)
        return rng.choice(PROMPTS["shape_of"]).format(colour=obj.colour), obj.shape

    def ocr(self, rng: random.Random) -> tuple[str, str] | None:
        if not self.scene.words:
            return None
        return rng.choice(PROMPTS["ocr"]), self.ocr_answer()

    def ocr_answer(self) -> str:
        words = self.scene.words
        return " ".join(words[i].text for i in reading_order([w.box for w in words]))

    def spotting(self, rng: random.Random) -> tuple[str, str] | None:
        if not self.scene.words:
            return None
        return rng.choice(PROMPTS["spotting"]), self.spotting_answer()

    def spotting_answer(self) -> str:
        words = self.scene.words
        return ", ".join(f"<p>{words[i].text}</p> {self.box(words[i].box)}"
                         for i in reading_order([w.box for w in words]))

    def som(self, rng: random.Random) -> tuple[str, str] | None:
        marked = [o for o in self.scene.objects if o.mark is not None]
        if not marked:
            return None
        obj = rng.choice(marked)
        return rng.choice(PROMPTS["som"]).format(k=obj.mark), f"{obj.colour} {obj.shape}"

    def caption(self, rng: random.Random) -> tuple[str, str] | None:
        objs = self.scene.objects
        if not objs:
            return None
        counts = Counter(object_name(o.size, o.colour, o.shape) for o in objs)
        parts = [(f"{NUMBER_WORDS[n]} {plural(name)}" if n > 1
                  else f"a {name}") for name, n in counts.items()]
        text = "There " + ("is " if len(objs) == 1 else "are ") + _join(parts) + "."
        if self.scene.words:
            text += " The text reads \"" + self.ocr_answer() + "\"."
        return rng.choice(PROMPTS["caption"]), text

    def task_table(self) -> dict[str, Callable[[random.Random], tuple[str, str] | None]]:
        return {"grounding": self.grounding, "region": self.region, "detection": self.detection,
                "count_shape": self.count_shape, "count_colour": self.count_colour, "colour_of": self.colour_of,
                "shape_of": self.shape_of, "ocr": self.ocr, "spotting": self.spotting, "som": self.som,
                "caption": self.caption}


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# How often each task opens a dialogue (weights). Marks get a boost on marked scenes.
TASK_WEIGHTS: dict[str, float] = {"grounding": 3.0, "region": 1.5, "detection": 1.5, "count_shape": 1.5,
                                  "count_colour": 1.5, "colour_of": 1.5, "shape_of": 1.5, "ocr": 2.0,
                                  "spotting": 1.5, "som": 3.0, "caption": 0.7}

TEXT_ONLY: tuple[tuple[str, str], ...] = tuple(
    [(f"What is {a} plus {b}?", str(a + b)) for a in range(6) for b in range(6)]
    + [("Which shapes do you know?", ", ".join(SHAPES) + "."),
       ("Which colors do you know?", ", ".join(COLOUR_NAMES) + "."),
       ("What can you do?", "I can describe, count, locate and read the shapes, colors and words in an image.")]
)


def dialogue(scene: Scene, rng: random.Random, anchor: Anchor = "top-left",
             max_turns: int = 4) -> tuple[list[tuple[str, str]], list[str]]:
    """1..max_turns question/answer pairs about the scene, and their task names."""
    writer = TaskWriter(scene, anchor)
    table = writer.task_table()
    names = list(table)
    weights = [TASK_WEIGHTS[n] * (3.0 if n == "som" and scene.mark_style else 1.0) for n in names]
    turns: list[tuple[str, str]] = []
    tasks: list[str] = []
    want = rng.randint(1, max_turns)
    for _ in range(4 * want):
        if len(turns) >= want:
            break
        name = rng.choices(names, weights)[0]
        qa = table[name](rng)
        if qa is None or any(q == qa[0] for q, _ in turns):
            continue
        turns.append(qa)
        tasks.append(name)
    return turns, tasks
