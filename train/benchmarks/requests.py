"""One lmms-eval request -> one SPHINX-X input, or the reason its document cannot be answered.

A request names its document (task, split, doc id), the task's prompt, and the task's
`doc_to_visual`. Here the images are fetched and checked (PIL images, at most the model's
`max_images`), the prompt worded for SPHINX (`prompts.TaskProfile`), the conversation built
in the message schema, the images processed once (canvas + geometry, reused for generation and
for mapping boxes back), and the prompt measured against the model's context.

Anything wrong with a document — no image where the task has one, an image that will not
load, an empty question, a prompt that does not fit — becomes a `BadDocument` with one line
of reason: the run reports it and goes on.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sphinx_model.conversation import IMAGE_MARKER, Conversation, Message, Part, SchemaError
from sphinx_model.processor import ProcessedImage, SphinxProcessor
from sphinx_model.tiling import Canvas

from .prompts import TaskProfile


class BadDocument(ValueError):
    """A document the model cannot be asked about; the message says why, in one line."""


@dataclass
class Prepared:
    """A request ready for the model."""

    conversation: Conversation
    images: list[ProcessedImage]
    input_ids: list[int]                   # the rendered prompt, generation prompt included
    profile: TaskProfile
    options: dict[str, Any] = field(default_factory=dict)  # the request's generation kwargs

    @property
    def prompt_length(self) -> int:
        return len(self.input_ids)

    @property
    def canvas(self) -> Canvas | None:
        """Geometry of the first image: boxes in an answer refer to it."""
        return self.images[0].canvas if self.images else None


def fetch_visuals(doc_to_visual: Callable[[Any], Any] | None, doc: Any) -> list[Image.Image]:
    """The document's images, or BadDocument (the task's own code may fail in any way)."""
    if doc_to_visual is None:
        return []
    try:
        visuals = doc_to_visual(doc)
    except Exception as e:  # noqa: BLE001 - task code: a missing file, a missing field, anything
        raise BadDocument(f"its images could not be read ({type(e).__name__}: {_one_line(e)})") from e
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out = []
    for v in visuals:
        if v is None:
            raise BadDocument("it has a missing image (doc_to_visual gave None)")
        if not isinstance(v, Image.Image):
            raise BadDocument(f"it has a {type(v).__name__} visual; SPHINX-X reads images only (no video or audio)")
        out.append(v)
    return out


def build_conversation(text: str, n_images: int) -> Conversation:
    """One user turn: the images first (image 0 sits after BOS as released), then the text.

    LLaVA-style `<image>` markers in a task's prompt are dropped; the images are the parts.
    """
    text = text.replace(IMAGE_MARKER, "").strip()
    parts = [Part.of_image() for _ in range(n_images)] + ([Part.of_text(text)] if text else [])
    return Conversation([Message("user", tuple(parts))])


def prepare(processor: SphinxProcessor, doc: Mapping[str, Any] | Any, task_prompt: Any,
            doc_to_visual: Callable[[Any], Any] | None, profile: TaskProfile, context_length: int,
            options: dict[str, Any] | None = None) -> Prepared:
    """The model input of one request, or BadDocument."""
    visuals = fetch_visuals(doc_to_visual, doc)
    if not isinstance(task_prompt, str):
        raise BadDocument(f"its prompt is a {type(task_prompt).__name__}, not text")
    try:
        text = profile.prompt(doc, task_prompt) if isinstance(doc, Mapping) else task_prompt
    except KeyError as e:
        raise BadDocument(_one_line(e)) from e
    if not text.replace(IMAGE_MARKER, "").strip():
        raise BadDocument("its question is empty")
    if len(visuals) > processor.max_images:
        raise BadDocument(f"it has {len(visuals)} images; this model takes at most {processor.max_images}")
    conv = build_conversation(text, len(visuals))
    try:
        images = [processor.process_image(v) for v in visuals]
        encoded = processor.encode(conv, images, add_generation_prompt=True)
    except (ValueError, SchemaError, OSError) as e:  # ImageError, PromptTooLongError, TooManyImagesError
        raise BadDocument(_one_line(e)) from e
    if len(encoded.input_ids) >= context_length:
        raise BadDocument(f"its prompt takes {len(encoded.input_ids)} of the model's {context_length} positions "
                          "and leaves no room for an answer")
    return Prepared(conv, images, list(encoded.input_ids), profile, dict(options or {}))


def _one_line(e: BaseException) -> str:
    raw = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
    text = " ".join(str(raw).split()) or type(e).__name__
    return text[:300]
