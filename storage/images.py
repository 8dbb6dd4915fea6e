"""Content-addressed image store: a folder beside the database plus one `image` row per file.

Every upload is decoded, size-checked and re-encoded before it is kept: orientation from
EXIF is applied to the pixels, high bit depths and CIELAB become 8-bit RGB by the model's
own rule (so the store keeps the picture the model answered about), then all metadata
(EXIF, GPS, XMP, ICC, text chunks) is dropped because only the pixels are copied into a
fresh image. The file name is the SHA-256
of the re-encoded bytes, so the same picture is stored once, and no user-supplied string
ever becomes part of a path.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sphinx_model.pixels import to_uint8

from .models import IMAGE_FORMATS, ImageOwnerRow, ImageRow, OwnedImage
from .repository import Owner

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXTENSIONS = {"jpeg": "jpg", "png": "png"}
_ACCEPTED_INPUTS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageRejected(ValueError):
    """An upload that is not an image we accept, or is too large."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # encoded upload size
    max_pixels: int = 40_000_000  # decoded width * height; refuses decompression bombs
    max_side: int = 4096  # longer side after re-encoding; larger images are downscaled
    jpeg_quality: int = 92


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    sha256: str
    width: int
    height: int
    format: str  # one of IMAGE_FORMATS


def sanitize_image(data: bytes, limits: ImageLimits = ImageLimits()) -> EncodedImage:
    """Decode, orient, cap and re-encode an upload; the result carries no metadata.

    JPEG stays JPEG (re-encoding photos as PNG would multiply their size); everything else,
    and anything with transparency, becomes PNG.
    """
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as src:
            if src.format not in _ACCEPTED_INPUTS:
                raise ImageRejected(f"unsupported image format {src.format!r}")
            if src.width * src.height > limits.max_pixels:
                raise ImageRejected(
                    f"image is {src.width}x{src.height} pixels; the limit is {limits.max_pixels}")
            is_jpeg = src.format in ("JPEG", "MPO")
            oriented = ImageOps.exif_transpose(src)  # loads pixels, applies Orientation
    except Image.DecompressionBombError:  # Pillow's own cap, far above ours: quote ours
        raise ImageRejected(f"image is larger than the limit of {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageRejected(f"not a readable image: {e}") from None

    has_alpha = oriented.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in oriented.info
    mode = "RGBA" if has_alpha else "RGB"
    pixels = _to_8bit(oriented, mode)
    if max(pixels.size) > limits.max_side:
        pixels.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    clean = Image.frombytes(mode, pixels.size, pixels.tobytes())  # pixels only, no metadata

    out = io.BytesIO()
    fmt = "jpeg" if is_jpeg and not has_alpha else "png"
    if fmt == "jpeg":
        clean.save(out, format="JPEG", quality=limits.jpeg_quality)
    else:
        clean.save(out, format="PNG", optimize=False)
    encoded = out.getvalue()
    return EncodedImage(encoded, hashlib.sha256(encoded).hexdigest(), clean.width,
                        clean.height, fmt)


def _to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """8-bit RGB(A) by the model's own rule (`sphinx_model.image_processing._to_rgb`), so that
    the stored picture is the one the model answered about (a test holds the two together).

    Pillow's plain convert() would clip 16-bit values (a mid-grey 16-bit scan stored as
    white) and copy CIELAB channels as if they were RGB.
    """
    if image.mode in _HIGH_BIT_MODES:
        return Image.fromarray(to_uint8(np.asarray(image)), "L").convert("RGB")
    if image.mode == "LAB":
        try:
            from PIL import ImageCms

            lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
            return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
        except ImportError:
            raise ImageRejected("CIELAB images need Pillow with littlecms") from None
    return image.convert(mode)





def image_filename(sha256: str, fmt: str) -> str:
    """`<sha256>.<ext>`; refuses anything that is not a hex digest and a known format."""
    if not _SHA256.fullmatch(sha256) or fmt not in IMAGE_FORMATS:
        raise ValueError("invalid image reference")
    return f"{sha256}.{_EXTENSIONS[fmt]}"


def _insert_once(session: Session, row: Any, existing: Any) -> Any:
    """Insert `row`, or return what a concurrent writer inserted under the same key meanwhile."""
    try:
        with session.begin_nested():
            session.add(row)
        return row
    except IntegrityError:
        found = existing()
        if found is None:
            raise
        return found


@dataclass(frozen=True)
class _Kept:
    """What sanitising an upload gave, without its bytes (the file holds them)."""

    sha256: str
    size: int
    width: int
    height: int
    format: str


class _RecentUploads:
    """The last uploads' digests (of the bytes as uploaded) -> what was kept for them, so the
    same file sent again (an example clicked, an API client sending its picture with each new
    conversation) is not decoded, re-encoded and hashed again. Sanitising is a function of the
    bytes, so the memo can only be stale when the kept file is gone, which `put` checks."""

    def __init__(self, size: int = 4096):
        self._items: OrderedDict[str, _Kept] = OrderedDict()
        self._size, self._lock = size, threading.Lock()

    def get(self, digest: str) -> _Kept | None:
        with self._lock:
            kept = self._items.get(digest)
            if kept is not None:
                self._items.move_to_end(digest)
            return kept

    def put(self, digest: str, kept: _Kept) -> None:
        with self._lock:
            self._items[digest] = kept
            self._items.move_to_end(digest)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


@dataclass(frozen=True)
class ImageStore:
    """Image files under `root/<first two hex digits>/<sha256>.<ext>`."""

    root: Path
    limits: ImageLimits = ImageLimits()
    _recent: _RecentUploads = field(default_factory=_RecentUploads, compare=False, repr=False)

    def path_for(self, sha256: str, fmt: str) -> Path:
        return self.root / sha256[:2] / image_filename(sha256, fmt)

    def path(self, row: ImageRow | OwnedImage) -> Path:
        return self.path_for(row.sha256, row.format)

    def read(self, row: ImageRow | OwnedImage) -> bytes:
        return self.path(row).read_bytes()

    def put(self, session: Session, data: bytes, *, owner: Owner) -> OwnedImage:
        """Sanitize and keep an upload for `owner`; returns it as `owner` sees it (the shared
        row's facts, `created_at` of this owner's own first upload).

        The picture is stored once by content hash, and `owner` is recorded as one of its
        uploaders: only uploaders may attach it to their messages. The file is written
        (atomically) before the row; a rolled-back transaction can leave an unreferenced file
        behind, which is harmless: the next upload of the same picture reuses it.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageRejected(f"an upload is bytes, got {type(data).__name__}")
        img = self.seen(data)
        if img is None:
            clean = sanitize_image(bytes(data), self.limits)
            self._write_file(clean)
            img = _Kept(clean.sha256, len(clean.data), clean.width, clean.height, clean.format)
            self._recent.put(hashlib.sha256(data).hexdigest(), img)
        row = session.get(ImageRow, img.sha256)
        if row is None:
            row = _insert_once(session, ImageRow(sha256=img.sha256, size_bytes=img.size, width=img.width,
                                                 height=img.height, format=img.format),
                               lambda: session.get(ImageRow, img.sha256))
        key = (img.sha256, owner.kind, owner.id)
        owned = session.get(ImageOwnerRow, key)
        if owned is None:
            owned = _insert_once(session, ImageOwnerRow(image_sha256=img.sha256, owner_kind=owner.kind,
                                                        owner_id=owner.id),
                                 lambda: session.get(ImageOwnerRow, key))
        if owned.created_at is None:
            session.flush()
        return OwnedImage.of(row, owned)

    def seen(self, data: bytes) -> _Kept | None:
        """What was kept for these exact bytes by a recent `put`, if its file is still intact."""
        kept = self._recent.get(hashlib.sha256(data).hexdigest())
        if kept is None:
            return None
        path = self.path_for(kept.sha256, kept.format)
        if path.is_symlink() or not path.is_file() or path.stat().st_size != kept.size:
            return None
        return kept

    def _write_file(self, img: EncodedImage) -> None:
        """Write the file unless an intact copy is there (a regular file of the right size:
        never a link someone put in its place)."""
        path = self.path_for(img.sha256, img.format)
        if not path.is_symlink() and path.is_file() and path.stat().st_size == len(img.data):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(img.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
