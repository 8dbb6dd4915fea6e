"""Image in -> one normalised square canvas tensor out.

`load_image` turns whatever a user hands us (a path, bytes, a stream, a PIL image) into a
clean 8-bit RGB image, or raises `ImageError` with a message a user can act on. Pillow
raises a zoo of exception types for bad files (OSError, SyntaxError, ValueError, EOFError,
struct.error, zlib.error, ...); all of them become `ImageError` here, chained to the
original for debugging. The pixel cap is checked from the header before any pixel is
decoded, so a tiny file that claims to be gigapixels costs nothing.

Truncated files raise: this module never sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` (a
process-wide switch); if some other library turns it on, Pillow will pad truncated files
with grey instead and nothing here can tell.

`canvas_tensor` builds the canvas at the model's size: the image is resized (PIL bicubic)
straight to its place on a `canvas_size` square filled with the CLIP mean colour (so padding
is ~0 after normalisation), then CLIP-normalised. The released models pad to a square at
full resolution first and resize that; here each content pixel is sampled at the same
source position as that path would sample it (PIL's `box`), so the two agree except in a
band of about two pixels along the content's edges, where the released path blends in the
padding colour. Cost follows the canvas, not the image's long side: a 1 x 60,000 image no
longer needs a 60,000 x 60,000 intermediate. The geometry comes from
`tiling.canvas_geometry` only.
"""
from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .experts.clip_convnext import CLIP_MEAN, CLIP_STD  # the canvas lives in CLIP's normalisation
from .files import UnsafePathError, open_regular
from .pixels import to_uint8
from .tiling import Anchor, Canvas, canvas_geometry

PAD_FILL = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104) as released: padding ~0 after normalising
BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white

class ImageError(ValueError):
    """A clear, user-facing message: what is wrong with the image."""


_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, eq=False)
class KeyedImage:
    """An image its owner already knows by the sha256 of its content (an app's stored file),
    opened only when it must be decoded. A serving engine that holds this key's canvas and
    visual tokens never opens it, so a follow-up turn about a stored photo costs no decode and
    no pixel hash. `open` returns anything `load_image` takes; an OSError from it is an
    ImageError."""

    content_sha256: str
    open: Callable[[], "ImageSource"]

    def __post_init__(self) -> None:
        if not isinstance(self.content_sha256, str) or not _SHA256.fullmatch(self.content_sha256):
            raise ValueError("KeyedImage.content_sha256 must be a lowercase hex sha256 digest")


ImageSource = str | os.PathLike | bytes | bytearray | memoryview | io.IOBase | Image.Image | KeyedImage


def load_image(source: ImageSource, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode + sanitise to an 8-bit RGB image with EXIF orientation applied.

    The result is a fresh in-memory image: no file handle is kept open, and the caller's
    stream or PIL image is left untouched.
    """
    if isinstance(source, Image.Image):
        return _sanitise(source, max_pixels)
    if isinstance(source, KeyedImage):
        try:
            inner = source.open()
        except OSError as e:
            raise ImageError(f"the image can no longer be read ({e.strerror or type(e).__name__})") from e
        return load_image(inner, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open_regular(source, "image file") as f:  # a FIFO or device is refused, never read
                return _decode(f, max_pixels, name=os.fspath(source))
        except UnsafePathError as e:
            raise ImageError(str(e)) from e
        except OSError as e:  # missing file, permissions
            raise ImageError(f"cannot read image file {os.fspath(source)!r}: {e.strerror or e}") from e
        except ValueError as e:  # a path with a NUL byte
            raise ImageError(f"cannot read image file {os.fspath(source)!r}: {e}") from e
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), max_pixels, name="image bytes")
    if isinstance(source, io.TextIOBase):
        raise ImageError("image stream is opened in text mode; open it in binary mode ('rb')")
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        stream = source if _seekable(source) else io.BytesIO(source.read())
        return _decode(stream, max_pixels, name="image stream")
    raise TypeError(f"expected a path, bytes, binary stream, PIL image or KeyedImage, got {type(source).__name__}")


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _is_empty(stream) -> bool:
    try:
        pos = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(pos)
        return end == pos
    except (AttributeError, OSError, ValueError):
        return False


def _decode(stream, max_pixels: int, name: str) -> Image.Image:
    if _is_empty(stream):
        raise ImageError(f"{name} is empty (0 bytes)")
    try:
        image = Image.open(stream)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own cap, far above ours: quote ours
        raise ImageError(f"{name} is too large: above the limit of {max_pixels:,} pixels") from e
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many unrelated types
        raise ImageError(f"{name} is not a recognised image file or its header is corrupt") from e
    with image:
        return _sanitise(image, max_pixels, name=f"{name} ({image.format})")


def _sanitise(image: Image.Image, max_pixels: int, name: str = "image") -> Image.Image:
    _check_size(image.width, image.height, max_pixels, name)
    try:
        image.load()  # the pixels are decoded here; a freshly opened animation sits on frame 0
        upright = ImageOps.exif_transpose(image)  # a new image; reads EXIF before any convert
        return _to_rgb(upright)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large: above the limit of {max_pixels:,} pixels") from e
    except Exception as e:  # noqa: BLE001 - truncated data raises OSError, bad chunks others
        raise ImageError(f"{name} could not be decoded: the file is truncated or corrupt ({e})") from e


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels, "
            f"above the limit of {max_pixels:,} pixels"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency over white, high bit depths scaled."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode == "LAB":
        return _lab_to_rgb(image)
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            out = Image.new("RGB", rgba.size, BACKGROUND)
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV, ...
    except ValueError as e:  # e.g. LAB has no conversion to RGB in Pillow
        raise ImageError(f"unsupported colour mode {mode!r}") from e


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """CIELAB needs a colour transform; Pillow's plain convert("RGB") copies channels."""
    try:
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    except ImportError as e:  # Pillow built without littlecms
        raise ImageError("CIELAB images need Pillow with littlecms (ImageCms)") from e





def pad_to_canvas(image: Image.Image, canvas: Canvas, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """The image pasted at (offset_x, offset_y) on a `canvas.side` square filled with `fill`."""
    if image.size != (canvas.width, canvas.height):
        raise ValueError(f"image is {image.width}x{image.height} but the canvas is for {canvas.width}x{canvas.height}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (use load_image), got mode {image.mode!r}")
    out = Image.new("RGB", (canvas.side, canvas.side), fill)
    out.paste(image, (canvas.offset_x, canvas.offset_y))
    return out


def place_on_canvas(image: Image.Image, canvas: Canvas, canvas_size: int,
                    fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """What `pad_to_canvas(image, canvas).resize((canvas_size,) * 2, BICUBIC)` gives, without the
    full-resolution square.

    Only the output pixels whose bicubic kernel reaches the image are computed, from a crop of
    the padded square that holds their whole kernels (or ends where the square ends, as
    there); every other output pixel is the padding colour, as there. PIL's `box` keeps the
    sampling positions of the full resize, so the result matches it up to rare rounding of
    one level. An image too thin to pay for that crop (under ~4 output pixels across on a
    padded axis, e.g. 1 x 60,000) is resized straight to its rounded place instead.
    """
    if image.size != (canvas.width, canvas.height):
        raise ValueError(f"image is {image.width}x{image.height} but the canvas is for {canvas.width}x{canvas.height}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (use load_image), got mode {image.mode!r}")
    scale = canvas.side / canvas_size                     # source pixels per output pixel
    spans = [_kernel_span(o, n, canvas.side, canvas_size) for o, n in
             ((canvas.offset_x, canvas.width), (canvas.offset_y, canvas.height))]
    (q0x, q1x, s0x, s1x), (q0y, q1y, s0y, s1y) = spans
    out = Image.new("RGB", (canvas_size, canvas_size), fill)
    if (s1x - s0x) * (s1y - s0y) <= 2 * image.width * image.height + 16 * canvas_size ** 2:
        crop = Image.new("RGB", (s1x - s0x, s1y - s0y), fill)
        crop.paste(image, (canvas.offset_x - s0x, canvas.offset_y - s0y))
        box = (q0x * scale - s0x, q0y * scale - s0y, min(q1x * scale - s0x, s1x - s0x),
               min(q1y * scale - s0y, s1y - s0y))
        out.paste(crop.resize((q1x - q0x, q1y - q0y), Image.Resampling.BICUBIC, box=box), (q0x, q0y))
        return out
    x0, w = _rounded_place(canvas.offset_x, canvas.width, scale, canvas_size)
    y0, h = _rounded_place(canvas.offset_y, canvas.height, scale, canvas_size)
    out.paste(image.resize((w, h), Image.Resampling.BICUBIC), (x0, y0))
    return out


def _kernel_span(offset: int, length: int, side: int, size: int) -> tuple[int, int, int, int]:
    """On one axis: output pixels [q0, q1) whose bicubic kernel may reach the content, and the
    source interval [s0, s1) (clipped to the padded square) holding all their kernels."""
    scale = side / size
    support = 2.0 * max(scale, 1.0) + 1.0                 # bicubic reaches 2 source pixels per output pixel
    q0 = max(0, math.floor((offset - support) / scale - 0.5) - 1)
    q1 = min(size, math.ceil((offset + length + support) / scale - 0.5) + 2)
    s0 = max(0, math.floor(q0 * scale - support) - 1)
    s1 = min(side, math.ceil(q1 * scale + support) + 1)
    return q0, q1, s0, s1


def _rounded_place(offset: int, length: int, scale: float, size: int) -> tuple[int, int]:
    """Start and extent (>= 1 pixel) of the content on one axis of the output canvas."""
    start = min(size - 1, round(offset / scale))
    return start, max(1, min(size - start, round((offset + length) / scale) - start))


def canvas_tensor(image: Image.Image, anchor: Anchor, canvas_size: int) -> tuple[torch.Tensor, Canvas]:
    """resize onto the canvas (tiling.canvas_geometry, `place_on_canvas`) -> float tensor
    (3, canvas_size, canvas_size) normalised with CLIP mean/std.

    The returned `Canvas` is in original pixels (boxes map back through it).
    """
    if canvas_size <= 0:
        raise ValueError(f"canvas_size must be positive, got {canvas_size}")
    canvas = canvas_geometry(image.width, image.height, anchor)
    padded = place_on_canvas(image, canvas, canvas_size)
    pixels = torch.from_numpy(np.array(padded, dtype=np.uint8))  # (S, S, 3)
    x = pixels.permute(2, 0, 1).float().div_(255.0)  # (3, S, S) in [0, 1], as torchvision's ToTensor
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std), canvas
