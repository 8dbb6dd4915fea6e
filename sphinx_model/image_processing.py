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

`canvas_tensor` follows the released models' pixel path: pad to a square with the CLIP
mean colour (so padding is ~0 after normalisation), PIL bicubic resize to the canvas size,
then CLIP normalisation. The geometry comes from `tiling.canvas_geometry` only.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .experts.clip_convnext import CLIP_MEAN, CLIP_STD  # the canvas lives in CLIP's normalisation
from .tiling import Anchor, Canvas, canvas_geometry

PAD_FILL = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104) as released: padding ~0 after normalising
BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | io.IOBase | Image.Image


class ImageError(ValueError):
    """A clear, user-facing message: what is wrong with the image."""


def load_image(source: ImageSource, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode + sanitise to an 8-bit RGB image with EXIF orientation applied.

    The result is a fresh in-memory image: no file handle is kept open, and the caller's
    stream or PIL image is left untouched.
    """
    if isinstance(source, Image.Image):
        return _sanitise(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return _decode(f, max_pixels, name=os.fspath(source))
        except OSError as e:  # missing file, directory, permissions
            raise ImageError(f"cannot read image file {os.fspath(source)!r}: {e.strerror or e}") from e
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), max_pixels, name="image bytes")
    if isinstance(source, io.TextIOBase):
        raise ImageError("image stream is opened in text mode; open it in binary mode ('rb')")
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        stream = source if _seekable(source) else io.BytesIO(source.read())
        return _decode(stream, max_pixels, name="image stream")
    raise TypeError(f"expected a path, bytes, binary stream or PIL image, got {type(source).__name__}")


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
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode safely: {e}") from e
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
        raise ImageError(f"{name} is too large to decode safely: {e}") from e
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
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
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


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale a single-channel high-bit-depth array to 0..255 (scaled, never clipped).

    Unsigned 16-bit data (Pillow's I;16*, and mode I that fits in 0..65535) maps by /257,
    so 65535 -> 255. Mode I / F carry no bit depth, so their range decides: data already
    in 0..255 (I) or 0..1 (F) keeps its meaning, anything else is min-max stretched.
    """
    x = values.astype(np.float64)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if values.dtype.kind == "f":
        if lo >= 0.0 and hi <= 1.0:
            x = x * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    elif values.dtype.itemsize <= 2 and values.dtype.kind == "u":
        x = x / 257.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        x = x / 257.0
    else:
        x = (x - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pad_to_canvas(image: Image.Image, canvas: Canvas, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """The image pasted at (offset_x, offset_y) on a `canvas.side` square filled with `fill`."""
    if image.size != (canvas.width, canvas.height):
        raise ValueError(f"image is {image.width}x{image.height} but the canvas is for {canvas.width}x{canvas.height}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (use load_image), got mode {image.mode!r}")
    out = Image.new("RGB", (canvas.side, canvas.side), fill)
    out.paste(image, (canvas.offset_x, canvas.offset_y))
    return out


def canvas_tensor(image: Image.Image, anchor: Anchor, canvas_size: int) -> tuple[torch.Tensor, Canvas]:
    """pad (tiling.canvas_geometry) -> PIL bicubic resize to canvas_size -> float tensor
    (3, canvas_size, canvas_size) normalised with CLIP mean/std.

    The returned `Canvas` is in original pixels (boxes map back through it).
    """
    if canvas_size <= 0:
        raise ValueError(f"canvas_size must be positive, got {canvas_size}")
    canvas = canvas_geometry(image.width, image.height, anchor)
    padded = pad_to_canvas(image, canvas)
    if padded.size != (canvas_size, canvas_size):
        padded = padded.resize((canvas_size, canvas_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(padded, dtype=np.uint8))  # (S, S, 3)
    x = pixels.permute(2, 0, 1).float().div_(255.0)  # (3, S, S) in [0, 1], as torchvision's ToTensor
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std), canvas
