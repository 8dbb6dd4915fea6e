"""Helpers shared by the app's tests (owners, pictures made on the spot)."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw

ALICE = "session:" + "a" * 32
BOB = "session:" + "b" * 32


def scene(w: int = 160, h: int = 96) -> Image.Image:
    img = Image.new("RGB", (w, h), (200, 200, 200))
    d = ImageDraw.Draw(img)
    d.rectangle([w // 8, h // 6, w // 3, h // 2], fill=(220, 30, 30))
    d.ellipse([w // 2, h // 3, w - w // 8, h - h // 8], fill=(30, 70, 220))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
