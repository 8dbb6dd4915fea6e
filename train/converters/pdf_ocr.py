"""PDFs -> OCR data (SPHINX-X's PDF set): rendered page images + their text with boxes.

For every page with usable text, the page is rendered with PyMuPDF to
`OUT-folder/<images-dir>/<name>_p<N>.png` (N from 1) and two dialogues are written:
  * reading: "What is written in this image?" -> the page text in reading order (PyMuPDF's
    block/line/word order; one line of text per PDF line);
  * spotting: "Detect all text in the image ..." -> `<p>word</p> [box]` lines (or whole
    lines with `--unit line`), at most `--max-words` per page.
Boxes: PDF points -> pixels of the rendered page -> fractions of its square canvas.
Pages are dropped (and counted) when they have no extractable text, contain U+FFFD
replacement characters, or more than `--max-bad-fraction` of their characters are control,
private-use, surrogate or unassigned code points (typical of fonts without a Unicode map).
"""
from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sphinx_model.boxes import box_to_text
from sphinx_model.conversation import Conversation
from sphinx_model.tiling import canvas_geometry

from .base import (MAX_IMAGE_PIXELS, CommonOptions, ConvertError, Stats, check_option, dialogue, label_text,
                   plain_folder, register)

READ_PROMPT = "What is written in this image?"
SPOT_PROMPTS = {"word": "Detect all text in the image and give the bounding box of each word.",
                "line": "Detect all text in the image and give the bounding box of each line."}
BAD_CATEGORIES = frozenset({"Cc", "Co", "Cs", "Cn"})  # control, private use, surrogate, unassigned

Word = tuple[float, float, float, float, str, int, int, int]  # PyMuPDF "words" tuple, PDF points
MAX_PAGE_PIXELS = 16_000_000  # a page renders at `--dpi` or less: 4000 x 4000 px at most
MIN_PAGE_SIDE = 16            # pixels; thinner pages hold nothing readable


@dataclass(frozen=True)
class PdfOcrOptions:
    dpi: int = field(default=144, metadata={"help": "render resolution of the page images"})
    max_words: int = field(default=100, metadata={"help": "most boxed words (or lines) per page"})
    unit: Literal["word", "line"] = field(default="word", metadata={"help": "what the spotting boxes enclose"})
    images_dir: str = field(default="images", metadata={"help": "folder for page images, under OUT's folder"})
    max_bad_fraction: float = field(default=0.1, metadata={
        "help": "drop a page when more of its characters than this are control/private-use/unassigned"})

    def __post_init__(self) -> None:
        check_option(1 <= self.dpi <= 1200, "--dpi must be in [1, 1200]")
        check_option(self.max_words >= 1, "--max-words must be >= 1")
        check_option(0.0 <= self.max_bad_fraction <= 1.0, "--max-bad-fraction must be in [0, 1]")
        check_option(plain_folder(self.images_dir), "--images-dir must be a relative folder inside OUT's folder")


@register("pdf-ocr", task="ocr", options=PdfOcrOptions)
def convert_pdf_ocr(source: Path, common: CommonOptions, options: PdfOcrOptions,
                    stats: Stats) -> Iterator[Conversation]:
    """A PDF or a folder of PDFs -> page images + text-reading and text-spotting dialogues."""
    import pymupdf

    errors = (RuntimeError, ValueError, getattr(pymupdf.mupdf, "FzErrorBase", RuntimeError))  # PyMuPDF's
    (common.out_dir / options.images_dir).mkdir(parents=True, exist_ok=True)
    for pdf, name in _pdfs(source):
        try:
            doc = pymupdf.open(pdf)
        except errors:
            stats.skip("unreadable PDF")
            continue
        with doc:
            if doc.needs_pass:  # encrypted with a user password: its pages cannot be read
                stats.skip("encrypted PDF")
                continue
            for number in range(doc.page_count):
                try:
                    page = doc.load_page(number)
                    yield from _page(page, f"{name}_p{number + 1}", common, options, stats)
                except errors:  # broken page trees, streams, fonts
                    stats.skip("unreadable page")


def _pdfs(source: Path) -> list[tuple[Path, str]]:
    """(PDF path, image-name stem) pairs; stems of a folder keep their sub-folder (a/b.pdf -> a__b)."""
    if source.is_file():
        return [(source, source.stem)]
    if not source.is_dir():
        raise ConvertError(f"input not found: {source}")
    pdfs = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")
    if not pdfs:
        raise ConvertError(f"no PDF files under {source}")
    return [(p, "__".join(p.relative_to(source).with_suffix("").parts)) for p in pdfs]


def text_problem(text: str, max_bad_fraction: float) -> str | None:
    """Why a page's extracted text is unusable, or None when it is fine."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "page without text"
    if "\ufffd" in text:
        return "page with replacement characters"
    bad = sum(unicodedata.category(c) in BAD_CATEGORIES for c in chars)
    if bad / len(chars) > max_bad_fraction:
        return "page with control/private-use characters"
    return None


def _page(page: Any, name: str, common: CommonOptions, options: PdfOcrOptions,
          stats: Stats) -> Iterator[Conversation]:
    words: list[Word] = [w for w in page.get_text("words") if w[4].strip()]
    problem = text_problem(page.get_text("text") if words else "", options.max_bad_fraction)
    if problem is not None:
        stats.skip(problem)
        return
    dpi = render_dpi(page.rect.width, page.rect.height, options.dpi)
    if dpi is None:
        stats.skip("page of implausible size")
        return
    pix = page.get_pixmap(dpi=dpi)
    ref = f"{options.images_dir}/{name}.png"
    pix.save(str(common.out_dir / ref))
    canvas = canvas_geometry(pix.width, pix.height, common.anchor)
    lines = group_lines(words)
    reading = "\n".join(" ".join(w[4] for w in line) for line in lines)
    units = [(w[4], w[:4]) for w in words] if options.unit == "word" else \
        [(" ".join(w[4] for w in line), _union(line)) for line in lines]
    spots = []
    for text, box in units:
        label = label_text(text)
        if label is None:  # the page's own text would read as box markup in the answer
            stats.skip(f"{options.unit} with box markup")
            continue
        px = _to_pixels(box, page, pix.width, pix.height)
        if px is not None:
            spots.append(f"<p>{label}</p> {box_to_text(px, canvas)}")
    stats.skip(f"{options.unit} over --max-words", max(0, len(spots) - options.max_words))
    meta = {"source": name}
    yield dialogue([(READ_PROMPT, reading)], ref, id=f"pdf-{name}-read", meta={**meta, "kind": "read"})
    if spots:
        yield dialogue([(SPOT_PROMPTS[options.unit], "\n".join(spots[:options.max_words]))], ref,
                       id=f"pdf-{name}-spot", meta={**meta, "kind": "spot"})


def render_dpi(width_pt: float, height_pt: float, dpi: int) -> int | None:
    """`dpi`, lowered so the rendered page stays within MAX_PAGE_PIXELS (and the model's pixel cap);
    None for a page too small, too thin or not finite to render."""
    if not (math.isfinite(width_pt) and math.isfinite(height_pt)) or width_pt <= 0 or height_pt <= 0:
        return None
    pixels_per_dpi2 = width_pt * height_pt / 72.0**2
    cap = min(MAX_PAGE_PIXELS, MAX_IMAGE_PIXELS)
    scaled = min(float(dpi), math.sqrt(cap / pixels_per_dpi2)) if pixels_per_dpi2 > 0 else 0.0
    out = int(scaled)
    if out < 1 or min(width_pt, height_pt) * out / 72.0 < MIN_PAGE_SIDE:
        return None
    return out


def _to_pixels(box: tuple[float, float, float, float], page: Any, width: int,
               height: int) -> tuple[float, float, float, float] | None:
    """A word box in PDF points (unrotated page space, as PyMuPDF extracts it) -> pixels of
    the rendered (rotated) page, clipped; None when nothing is left."""
    import pymupdf

    r = pymupdf.Rect(box) * page.rotation_matrix
    sx, sy = width / page.rect.width, height / page.rect.height
    x0, y0 = max(0.0, (r.x0 - page.rect.x0) * sx), max(0.0, (r.y0 - page.rect.y0) * sy)
    x1, y1 = min(float(width), (r.x1 - page.rect.x0) * sx), min(float(height), (r.y1 - page.rect.y0) * sy)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def group_lines(words: list[Word]) -> list[list[Word]]:
    """Consecutive words sharing (block, line) form one line of text."""
    lines: list[list[Word]] = []
    for w in words:
        if lines and lines[-1][-1][5:7] == w[5:7]:
            lines[-1].append(w)
        else:
            lines.append([w])
    return lines


def _union(line: list[Word]) -> tuple[float, float, float, float]:
    return (min(w[0] for w in line), min(w[1] for w in line), max(w[2] for w in line), max(w[3] for w in line))
