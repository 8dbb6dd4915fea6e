"""Document OCR: images and PDFs (text layer, scanned pages, page cap, encryption, damage)."""
from __future__ import annotations

import pymupdf
import pytest

from app.documents import DocumentError, inspect, page_words, render_page, similarity
from app.examples import EXAMPLES_DIR
from app.handlers import ocr
from app.handlers.common import UserError
from apptest_support import ALICE

SAMPLE = EXAMPLES_DIR / "sample.pdf"


def _pdf(path, pages: int, text: str = "hello world", encrypt: bool = False):
    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page(width=200, height=100).insert_text((20, 50), f"{text} {i + 1}", fontsize=16)
    kwargs = {"encryption": pymupdf.PDF_ENCRYPT_AES_256, "user_pw": "secret", "owner_pw": "o"} if encrypt else {}
    doc.save(str(path), **kwargs)
    return path


def test_the_sample_pdf_has_a_text_page_and_a_scanned_page():
    info = inspect(SAMPLE, max_pages=30)
    assert (info.pages, info.usable, info.has_text) == (2, 2, True)
    image, scale = render_page(SAMPLE, 0, 30, max_pixels=2_000_000)
    words = page_words(SAMPLE, 0, 30, scale)
    assert len(words) >= 3 and all(0 <= w.box[0] < w.box[2] <= image.width for w in words)
    from app.documents import page_text
    assert page_text(SAMPLE, 1, 30) == ""


def test_read_a_pdf_page_compares_with_its_text_layer(ctx):
    doc, note = ocr.open_upload(ctx, str(SAMPLE))
    assert doc.is_pdf and doc.pages == 2 and "text layer" in note
    result = ocr.read(ctx, ALICE, doc, 1, "both")
    assert result.embedded and 0.0 <= result.score <= 1.0
    assert len(result.shots) == 2 and result.text_path.read_text().strip() == result.reading.strip()
    scanned = ocr.read(ctx, ALICE, doc, 2, "read")
    assert scanned.embedded is None and scanned.score is None
    with pytest.raises(UserError, match="page 3"):
        ocr.read(ctx, ALICE, doc, 3, "read")


def test_read_an_image(ctx):
    doc, note = ocr.open_upload(ctx, str(EXAMPLES_DIR / "scene-words.png"))
    result = ocr.read(ctx, ALICE, doc, 1, "spot")
    assert not doc.is_pdf and result.embedded is None and result.page.size == (597, 149)


def test_page_cap_encryption_and_damage(ctx, tmp_path):
    doc, note = ocr.open_upload(ctx, str(_pdf(tmp_path / "long.pdf", 45)))
    assert doc.pages == ctx.settings.max_pdf_pages == 30 and "45 pages" in note and "only the first 30" in note
    with pytest.raises(UserError, match="password-protected"):
        ocr.open_upload(ctx, str(_pdf(tmp_path / "locked.pdf", 1, encrypt=True)))
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\0garbage" * 50)
    with pytest.raises(UserError, match="not a readable PDF|damaged|no pages"):
        ocr.open_upload(ctx, str(broken))
    junk = tmp_path / "notes.txt"
    junk.write_text("not a picture")
    with pytest.raises(UserError, match="neither a PDF nor an image"):
        ocr.open_upload(ctx, str(junk))
    with pytest.raises(UserError, match="no document"):
        ocr.read(ctx, ALICE, ocr.Document(), 1, "read")


def test_similarity_is_character_level():
    assert similarity("Hello  World", "hello world") == 1.0
    assert 0.8 < similarity("the quick brown fox", "the quick brown fax") < 1.0
    assert similarity("abc", "") == 0.0
    with pytest.raises(DocumentError):
        inspect(__file__, 5)
