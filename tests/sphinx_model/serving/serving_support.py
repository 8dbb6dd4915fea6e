"""What the engine tests share: the demo model's scenes and questions, and the one-by-one reference.

The demo model (assets/demo) answers differently for each image and question, so a row mixed up
with another, a misplaced position or a stale cache shows in the text; the one-by-one reference
is `Generator` (transformers' own `generate`)."""
from __future__ import annotations

from pathlib import Path

from sphinx_model.conversation import Conversation, Message
from sphinx_model.serving.generation import GenerationSettings, Generator

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "assets" / "demo"
EXAMPLES = ROOT / "assets" / "examples"
SCENES = [str(EXAMPLES / n) for n in ("scene-objects.png", "scene-marks.png", "scene-words.png", "scene-tall.png")]
QUESTIONS = ("Describe the image briefly.", "Detect all objects shown in the image.",
             "What is the text in the image?", "How many objects are there?")
GREEDY = GenerationSettings(max_new_tokens=24)


def ask(k: int) -> tuple[Conversation, list[str]]:
    return Conversation([Message.user(QUESTIONS[k % 4], image=True)]), [SCENES[(k // 2) % 4]]


def one_by_one(gen: Generator, cases, settings: GenerationSettings = GREEDY) -> list[str]:
    return [gen.generate([c], [ims], settings)[0] for c, ims in cases]
