"""Document OCR: an image or a PDF page; the model reads the text and spots words with boxes.

For a PDF with a text layer the embedded text is shown beside the model's reading, with a
character-level similarity score, so one sees at a glance how well the model read.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sphinx_model.image_processing import ImageError, load_image

from ..documents import DocumentError, DocumentInfo, inspect, is_pdf, page_text, render_page, similarity
from ..render import draw_regions
from ..validation import choice, page_number
from .common import AppContext, OneShot, UserError, ask_image, owner_of, store_image, store_upload, upload_path

READ_PROMPT = "Read the text in the image."
SPOT_PROMPT = "Please detect all texts and provide their bounding box coordinate."
MODES = ("read", "spot", "both")


@dataclass
class Document:
    """What the OCR tab knows about the current upload (a PDF or an image)."""

    path: str | None = None
    is_pdf: bool = False
    info: DocumentInfo | None = None

    @property
    def pages(self) -> int:
        return self.info.usable if self.info else (1 if self.path else 0)


@dataclass
class OcrResult:
    reading: str                  # the model's reading (or the spotted words, in order)
    page: Image.Image             # the page with spotted words boxed
    spotted: list[list[Any]]      # rows: word, x0, y0, x1, y1
    embedded: str | None          # the PDF's text layer, if any
    score: float | None           # similarity of reading and embedded text
    text_path: Path               # download
    shots: list[OneShot]

    @property
    def summary(self) -> str:
        parts = [f"{len(self.spotted)} word boxes" if self.spotted else "no word boxes"]
        if self.score is not None:
            parts.append(f"similarity to the PDF's text layer: {self.score:.1%}")
        return "; ".join(parts) + "."


def open_upload(ctx: AppContext, value: Any) -> tuple[Document, str]:
    """Inspect an upload: a PDF (caps, encryption, text layer) or an image; a note for the user."""
    if value is None:
        return Document(), ""
    path = upload_path(value)
    if is_pdf(path):
        try:
            info = inspect(path, ctx.settings.max_pdf_pages)
        except DocumentError as e:
            raise UserError(str(e)) from e
        return Document(str(path), True, info), info.note
    try:
        image = load_image(path, max_pixels=min(ctx.settings.max_pixels, ctx.service.max_pixels))
    except ImageError as e:
        raise UserError(f"{path.name} is neither a PDF nor an image we can read: "
                        f"{str(e).replace(str(path), path.name)}") from e
    return Document(str(path), False, None), f"an image of {image.width} x {image.height} pixels (one page)"


def _page_image(ctx: AppContext, owner_key: str, doc: Document, page: int) -> tuple[Any, Image.Image, str | None]:
    owner = owner_of(owner_key)
    if doc.path is None:
        raise UserError("no document: upload an image or a PDF first")
    if not doc.is_pdf:
        stored, image = store_upload(ctx, owner, doc.path)
        return stored, image, None
    index = page - 1
    try:
        image, _ = render_page(doc.path, index, ctx.settings.max_pdf_pages, ctx.settings.max_pixels)
        embedded = page_text(doc.path, index, ctx.settings.max_pdf_pages)
    except DocumentError as e:
        raise UserError(str(e)) from e
    return store_image(ctx, owner, image), image, embedded or None


def read(ctx: AppContext, owner_key: str, doc: Document, page: Any, mode: str) -> OcrResult:
    """Read (and/or spot the words of) one page."""
    mode = choice(mode, "mode", MODES)
    page = page_number(page, doc.pages)
    stored, image, embedded = _page_image(ctx, owner_key, doc, page)
    owner = owner_of(owner_key)
    shots, reading, spotted, regions = [], "", [], []
    if mode in ("read", "both"):
        shot = ask_image(ctx, owner, image, stored, READ_PROMPT, task="ocr")
        shots.append(shot)
        reading = shot.text
    if mode in ("spot", "both"):
        shot = ask_image(ctx, owner, image, stored, SPOT_PROMPT, task="spotting")
        shots.append(shot)
        regions = [r for r in shot.regions if r.is_box]
        spotted = [[r.label or "", *(round(v) for v in r.box)] for r in regions]
        if not reading:
            reading = " ".join(r.label for r in regions if r.label)
    score = similarity(embedded, reading) if embedded else None
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="ocr-", delete=False, encoding="utf-8") as f:
        f.write(reading + "\n")
    return OcrResult(reading, draw_regions(image, regions), spotted, embedded, score, Path(f.name), shots)


SPOTTED_HEADERS = ["word", "x0", "y0", "x1", "y1"]
