"""Images are capped, re-encoded without metadata, oriented, and stored once by content."""
from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.db import Store
from storage.images import (
    ImageLimits,
    ImageRejected,
    ImageStore,
    image_filename,
    sanitize_image,
)
from storage.models import ImageOwnerRow, ImageRow
from storage.repository import Owner
from storagetest_support import make_image

GPS_IFD = 0x8825
ORIENTATION = 0x0112


OWNER = Owner("session", "uploader")


def _jpeg_with_exif(orientation: int) -> bytes:
    """A 40x20 photo with the green marker at the top-left, GPS and camera data, rotated
    by EXIF only (the pixels are stored sideways, as phones do)."""
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    for x in range(4):
        for y in range(4):
            img.putpixel((x, y), (0, 255, 0))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "PhoneMaker"  # Make
    exif[GPS_IFD] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_and_gps_are_dropped_and_orientation_applied() -> None:
    raw = _jpeg_with_exif(orientation=6)  # "rotate 90 CW to display"
    assert Image.open(io.BytesIO(raw)).getexif().get_ifd(GPS_IFD)  # the input has GPS
    out = sanitize_image(raw)
    assert out.format == "jpeg"
    img = Image.open(io.BytesIO(out.data))
    assert not img.getexif() and "exif" not in img.info and "xmp" not in img.info
    assert b"PhoneMaker" not in out.data and b"Exif" not in out.data
    assert (img.width, img.height) == (out.width, out.height) == (20, 40)  # rotated
    r, g, b = img.convert("RGB").getpixel((out.width - 2, 1))  # marker moved top-right
    assert g > 200 and r < 60


def test_png_with_text_chunks_is_cleaned_and_transparency_kept() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Secret Person")
    img = Image.new("RGBA", (10, 10), (0, 0, 255, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    out = sanitize_image(buf.getvalue())
    assert out.format == "png" and b"Secret Person" not in out.data
    assert Image.open(io.BytesIO(out.data)).mode == "RGBA"


def test_limits_refuse_large_and_broken_uploads() -> None:
    with pytest.raises(ImageRejected, match="bytes"):
        sanitize_image(make_image(), ImageLimits(max_bytes=10))
    with pytest.raises(ImageRejected, match="pixels"):
        sanitize_image(make_image(100, 100), ImageLimits(max_pixels=99 * 99))
    with pytest.raises(ImageRejected):
        sanitize_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    with pytest.raises(ImageRejected):
        sanitize_image(make_image()[:40])  # truncated
    big = sanitize_image(make_image(300, 100, fmt="WEBP"), ImageLimits(max_side=64))
    assert (big.width, big.height, big.format) == (64, 21, "png")


def test_file_names_come_only_from_hashes(tmp_path) -> None:
    store = ImageStore(tmp_path)
    for sha, fmt in [("../../etc/passwd", "png"), ("a" * 64, "../x"), ("A" * 64, "png"),
                     ("a" * 63 + "/", "png")]:
        with pytest.raises(ValueError):
            store.path_for(sha, fmt)
    assert image_filename("ab" * 32, "jpeg") == "ab" * 32 + ".jpg"


def test_same_picture_is_stored_once(store: Store) -> None:
    data = make_image(16, 16)
    with Session(store.engine) as s, s.begin():
        a = store.images.put(s, data, owner=OWNER)
        b = store.images.put(s, data, owner=OWNER)
        assert a == b
        sha = a.sha256
    with Session(store.engine) as s, s.begin():
        c = store.images.put(s, data, owner=OWNER)  # new session, row already there
        assert c.sha256 == sha
        assert s.scalar(select(func.count()).select_from(ImageRow)) == 1
        path = store.images.path(c)
        assert path.parent.parent == store.settings.image_root
        assert store.images.read(c) == path.read_bytes() and len(path.read_bytes()) == c.size_bytes
        assert not list(path.parent.glob(".upload-*"))  # no temporary files left


def test_the_same_bytes_again_are_not_decoded_again_unless_their_file_is_gone(store: Store, monkeypatch) -> None:
    import storage.images as images

    calls = []
    real = images.sanitize_image
    monkeypatch.setattr(images, "sanitize_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = make_image(24, 16)
    other = Owner("session", "someone-else")
    with Session(store.engine) as s, s.begin():
        first = store.images.put(s, data, owner=OWNER)
        sha, path = first.sha256, store.images.path(first)
        assert store.images.seen(data).sha256 == sha
    with Session(store.engine) as s, s.begin():
        again = store.images.put(s, data, owner=other)           # another uploader, same bytes
        assert again.sha256 == sha
        assert s.get(ImageOwnerRow, (sha, other.kind, other.id)) is not None   # recorded as its uploader too
    assert calls == [1]
    path.unlink()                                                # the kept file is gone: decode and write it again
    assert store.images.seen(data) is None
    with Session(store.engine) as s, s.begin():
        store.images.put(s, data, owner=OWNER)
    assert calls == [1, 1] and path.is_file()
    assert store.images.seen(make_image(24, 17)) is None         # other bytes are not known


def test_two_writers_storing_the_same_picture_at_once(store: Store) -> None:
    """The second insert of a hash waits for the first (PostgreSQL: unique violation,
    handled; SQLite: the write lock) and both end up with the one row."""
    data = make_image(20, 20, color=(1, 99, 7))
    first_stored = threading.Event()
    shas: list[str] = []
    errors: list[BaseException] = []

    def first() -> None:
        with Session(store.engine) as s, s.begin():
            shas.append(store.images.put(s, data, owner=OWNER).sha256)
            first_stored.set()
            time.sleep(0.5)  # keep the transaction open while the second writer arrives

    def second() -> None:
        first_stored.wait(10)
        try:
            with Session(store.engine) as s, s.begin():
                shas.append(store.images.put(s, data, owner=OWNER).sha256)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(shas)) == 1 and len(shas) == 2
    with Session(store.engine) as s, s.begin():
        assert s.scalar(select(func.count()).select_from(ImageRow)) == 1


def _upload(mode: str) -> bytes:
    """A test card in `mode`, saved losslessly in a format that keeps that mode."""
    import numpy as np

    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    if mode in ("I;16", "I;16B"):
        img = Image.fromarray((ramp * 40000 + 12000).astype(np.uint16))  # mode I;16
        fmt = "PNG" if mode == "I;16" else "TIFF"
    elif mode == "I":
        img, fmt = Image.fromarray((ramp * 3_000_000).astype(np.int32)), "TIFF"  # mode I
    elif mode == "F":
        img, fmt = Image.fromarray((ramp * 0.8 + 0.1).astype(np.float32)), "TIFF"  # mode F
    elif mode == "LAB":
        lab = np.stack([ramp * 255, ramp * 80 + 60, 200 - ramp * 90], axis=-1).astype(np.uint8)
        img, fmt = Image.frombytes("LAB", (64, 48), lab.tobytes()), "TIFF"
    else:
        rgba = np.stack([ramp * 255, 255 - ramp * 255, ramp * 128, 64 + ramp * 191], axis=-1).astype(np.uint8)
        img, fmt = Image.fromarray(rgba).convert(mode), "PNG" if mode != "CMYK" else "TIFF"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F", "LAB", "RGBA", "LA", "P", "CMYK", "1"])
def test_the_store_keeps_the_picture_the_model_sees(mode: str) -> None:
    """What is stored must be what was answered about: the model's own loader reads the stored
    file and the upload to the same pixels (16-bit scans used to be stored clipped to white)."""
    import numpy as np

    image_processing = pytest.importorskip("sphinx_model.image_processing")
    upload = _upload(mode)
    stored = sanitize_image(upload)
    seen = np.asarray(image_processing.load_image(upload), dtype=np.int16)
    kept = np.asarray(image_processing.load_image(stored.data), dtype=np.int16)
    assert stored.format == "png" and seen.shape == kept.shape
    assert np.abs(seen - kept).max() == 0, (mode, float(seen.mean()), float(kept.mean()))


def test_a_second_uploader_gets_its_own_upload_time_not_the_first_owners(store: Store) -> None:
    """The shared row's created_at would tell Bob when somebody else first stored the picture."""
    from datetime import timedelta

    from storage.repository import get_image

    data = make_image(20, 12)
    bob = Owner("session", "bob-" + "0" * 28)
    with Session(store.engine) as s, s.begin():
        first = store.images.put(s, data, owner=OWNER)
        row = s.get(ImageRow, first.sha256)
        row.created_at = row.created_at - timedelta(days=30)        # Alice stored it a month ago
        s.get(ImageOwnerRow, (first.sha256, OWNER.kind, OWNER.id)).created_at = row.created_at
    with Session(store.engine) as s, s.begin():
        mine = store.images.put(s, data, owner=bob)
        alices = s.get(ImageRow, first.sha256).created_at
        assert mine.sha256 == first.sha256 and not isinstance(mine, ImageRow)
        assert mine.created_at - alices > timedelta(days=29)           # Bob's own upload, just now
        assert get_image(s, bob, mine.sha256).created_at == mine.created_at
        assert get_image(s, OWNER, mine.sha256).created_at == alices


def test_an_image_bomb_is_refused_with_the_stores_own_cap() -> None:
    """A header claiming 20000 x 20000 pixels trips Pillow's own bomb check on open; the refusal
    quotes the store's limit, not Pillow's 178,956,970 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(ImageRejected) as e:
        sanitize_image(bomb)
    assert "larger than the limit of 40000000 pixels" in str(e.value) and "178" not in str(e.value)
