"""PDFs for the Document OCR tab, through PyMuPDF: open (with caps), render a page, read its
text layer, and compare two readings character by character.

A PDF is checked before anything is rendered: not a PDF, damaged, password-protected,
without pages, or longer than the page cap each give one plain sentence. Pages are
rendered at a DPI chosen so that the picture stays under the pixel cap whatever the page
size, and the words of the text layer come back in the rendered picture's pixels.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import pymupdf
from PIL import Image

RENDER_DPI = 110            # about 930 x 1210 px for a Letter page: enough for the model's canvas
PDF_MAGIC = b"%PDF-"


class DocumentError(ValueError):
    """A document that cannot be read (one line for the user)."""


@dataclass(frozen=True)
class DocumentInfo:
    pages: int           # pages in the file
    usable: int          # pages that may be read (the page cap)
    has_text: bool       # the first usable pages carry a text layer

    @property
    def note(self) -> str:
        if self.usable < self.pages:
            return (f"This PDF has {self.pages} pages; only the first {self.usable} can be read here "
                    "(the page cap). Split the file to read the rest.")
        return f"{self.pages} page{'s' * (self.pages != 1)}" + (", with a text layer" if self.has_text else "")


@dataclass(frozen=True)
class Word:
    text: str
    box: tuple[float, float, float, float]    # in the rendered page's pixels


def is_pdf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PDF_MAGIC)) == PDF_MAGIC
    except OSError:
        return False


def _open(path: str | Path) -> pymupdf.Document:
    name = Path(path).name
    try:
        doc = pymupdf.open(str(path), filetype="pdf")
    except Exception as e:  # noqa: BLE001 - PyMuPDF raises its own types and RuntimeError for bad files
        raise DocumentError(f"{name} is not a readable PDF (damaged or not a PDF)") from e
    if doc.needs_pass or doc.is_encrypted:
        doc.close()
        raise DocumentError(f"{name} is password-protected; remove the password and upload it again")
    if doc.page_count == 0:
        doc.close()
        raise DocumentError(f"{name} has no pages")
    return doc


def inspect(path: str | Path, max_pages: int) -> DocumentInfo:
    """Open and check a PDF; DocumentError with a clear sentence when it cannot be used."""
    with _open(path) as doc:
        usable = min(doc.page_count, max_pages)
        try:
            has_text = any(doc[i].get_text("text").strip() for i in range(min(usable, 3)))
        except Exception as e:  # noqa: BLE001
            raise DocumentError(f"{Path(path).name} is damaged: its pages cannot be read") from e
        return DocumentInfo(doc.page_count, usable, has_text)


def _page(doc: pymupdf.Document, index: int, max_pages: int) -> pymupdf.Page:
    usable = min(doc.page_count, max_pages)
    if not 0 <= index < usable:
        raise DocumentError(f"page {index + 1} does not exist here (pages 1 to {usable} can be read)")
    return doc[index]


def _dpi(page: pymupdf.Page, max_pixels: int) -> int:
    """Whole DPI (PyMuPDF takes integers) that keeps the rendered page under the pixel cap."""
    w_in, h_in = page.rect.width / 72.0, page.rect.height / 72.0
    if w_in <= 0 or h_in <= 0:
        raise DocumentError("the page has no area")
    limit = int((max_pixels / (w_in * h_in)) ** 0.5)
    if limit < 1:
        raise DocumentError("the page is too large to render within the pixel cap")
    return min(RENDER_DPI, limit)


def render_page(path: str | Path, index: int, max_pages: int, max_pixels: int) -> tuple[Image.Image, float]:
    """Page `index` (0-based) as an RGB image, and the scale from PDF points to its pixels."""
    with _open(path) as doc:
        page = _page(doc, index, max_pages)
        dpi = _dpi(page, max_pixels)
        try:
            pix = page.get_pixmap(dpi=dpi, alpha=False)
        except Exception as e:  # noqa: BLE001
            raise DocumentError(f"page {index + 1} cannot be rendered: the file is damaged") from e
        return pix.pil_image().convert("RGB"), dpi / 72.0


def page_text(path: str | Path, index: int, max_pages: int) -> str:
    """The page's embedded text layer ('' for a scanned page)."""
    with _open(path) as doc:
        return _page(doc, index, max_pages).get_text("text").strip()


def page_words(path: str | Path, index: int, max_pages: int, scale: float) -> list[Word]:
    """Words of the text layer with boxes in the rendered page's pixels (`scale` from render_page)."""
    with _open(path) as doc:
        words = _page(doc, index, max_pages).get_text("words")
    return [Word(w[4], (w[0] * scale, w[1] * scale, w[2] * scale, w[3] * scale)) for w in words]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def similarity(reference: str, reading: str) -> float:
    """Character-level similarity in [0, 1] (difflib's ratio), ignoring case and spacing runs."""
    a, b = _normalise(reference), _normalise(reading)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
