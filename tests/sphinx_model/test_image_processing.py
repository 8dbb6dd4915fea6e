"""Bad images give a clear ImageError or a correct result; the canvas tensor's geometry."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sphinx_model.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    PAD_FILL,
    ImageError,
    canvas_tensor,
    load_image,
    pad_to_canvas,
)
from sphinx_model.tiling import canvas_geometry

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------- helpers
def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes] | None,
              idat: bytes | None = None) -> bytes:
    """A PNG written by hand, for headers Pillow will not write (16-bit RGB, lying sizes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + r for r in rows))  # filter type 0 per row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


# ---------------------------------------------------------------- sources
def test_all_source_kinds_give_the_same_rgb_image(tmp_path: Path):
    src = noise(7, 5)
    data = encode(src, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with open(path, "rb") as f:
        from_stream = load_image(f)
        assert not f.closed  # the caller's stream stays the caller's
    for out in (load_image(str(path)), load_image(path), load_image(data), load_image(io.BytesIO(data)),
                from_stream, load_image(src)):
        assert out.mode == "RGB" and out.size == (7, 5)
        assert np.array_equal(np.asarray(out), np.asarray(src))


def test_wrong_argument_type_is_a_type_error():
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")


# ---------------------------------------------------------------- bad files
def test_corrupt_bytes():
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def test_corrupt_pixel_data_behind_a_valid_header():
    data = png_bytes(16, 16, 8, 2, rows=None, idat=b"this is not zlib data at all")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path: Path, fmt: str):
    data = encode(noise(128, 128), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on process-wide


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    for source in (path, b"", io.BytesIO()):
        with pytest.raises(ImageError, match="empty"):
            load_image(source)


def test_zero_by_zero_image():
    with pytest.raises(ImageError, match="0x0"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError):  # a PNG header claiming 0x0
        load_image(png_bytes(0, 0, 8, 2, rows=[]))


def test_non_image_file(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not an image\n" * 20)
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(path)
    with pytest.raises(ImageError, match="binary mode"):
        load_image(io.StringIO("hello"))  # type: ignore[arg-type]


def test_thin_1x5000_image_is_valid():
    img = load_image(encode(Image.new("RGB", (1, 5000), BLUE), "PNG"))
    assert img.size == (1, 5000)
    for anchor, x in (("top-left", 0), ("center", 2499)):
        canvas = canvas_geometry(1, 5000, anchor)
        padded = pad_to_canvas(img, canvas)
        assert padded.size == (5000, 5000)
        assert pixel(padded, (x, 4999)) == BLUE and pixel(padded, (x + 1, 0)) == PAD_FILL
        t, _ = canvas_tensor(img, anchor, 32)
        assert t.shape == (3, 32, 32) and torch.isfinite(t).all()


# ---------------------------------------------------------------- colour modes
def test_cmyk_jpeg_becomes_rgb():
    img = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert img.mode == "RGB"
    r, g, b = pixel(img, (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_lab_tiff_is_colour_converted():
    src = Image.new("LAB", (4, 4), (136, 208, 195))  # L=53, a=80, b=67: sRGB red
    img = load_image(encode(src, "TIFF"))
    r, g, b = pixel(img, (1, 1))
    assert r > 235 and g < 25 and b < 25


def test_rgba_composited_over_white():
    src = Image.new("RGBA", (3, 1))
    src.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    img = load_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == WHITE and pixel(img, (1, 0)) == RED
    assert all(abs(c - 127) <= 1 for c in pixel(img, (2, 0)))


def test_la_composited_over_white():
    src = Image.new("LA", (2, 1))
    src.putdata([(0, 0), (0, 255)])
    img = load_image(encode(src, "PNG"))
    assert pixel(img, (0, 0)) == WHITE and pixel(img, (1, 0)) == (0, 0, 0)


def test_palette_transparency_composited_over_white():
    src = Image.new("P", (2, 1))
    src.putpalette([*RED, *GREEN] + [0] * (256 - 2) * 3)
    src.putdata([0, 1])
    img = load_image(encode(src, "PNG", transparency=1))  # palette entry 1 (green) is transparent
    assert pixel(img, (0, 0)) == RED and pixel(img, (1, 0)) == WHITE


def test_palette_becomes_rgb():
    src = Image.new("P", (3, 1))
    src.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    src.putdata([0, 1, 2])
    img = load_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    assert [pixel(img, (x, 0)) for x in range(3)] == [RED, GREEN, BLUE]


GREY16 = [0, 32896, 65535]  # 32896 = 128 * 257: clipping would give 255, scaling gives 128


def test_16bit_grayscale_png_is_scaled_not_clipped():
    data = png_bytes(3, 1, 16, 0, rows=[np.array(GREY16, dtype=">u2").tobytes()])
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I")
    img = load_image(data)
    assert [pixel(img, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])  # Pillow modes I;16 and I
def test_16bit_grayscale_modes_are_scaled_not_clipped(dtype):
    src = Image.fromarray(np.array([GREY16], dtype=dtype))
    assert src.mode == ("I;16" if dtype == np.uint16 else "I")
    img = load_image(encode(src, "TIFF"))
    assert [pixel(img, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert [pixel(load_image(src), (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_mode_i_with_8bit_values_keeps_them():
    src = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert [pixel(load_image(src), (x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_16bit_rgb_png_is_scaled():
    row = np.array([[0, 32896, 65535], [65535, 0, 0]], dtype=">u2").tobytes()
    img = load_image(png_bytes(2, 1, 16, 2, rows=[row]))
    assert img.mode == "RGB"
    assert pixel(img, (0, 0)) == (0, 128, 255) and pixel(img, (1, 0)) == RED


# ---------------------------------------------------------------- orientation, frames, size cap
@pytest.mark.parametrize("orientation,corner", [(6, "top-right"), (8, "bottom-left"), (3, "bottom-right")])
def test_exif_rotated_jpeg(orientation: int, corner: str):
    src = Image.new("RGB", (64, 32), WHITE)
    src.paste(RED, (0, 0, 16, 16))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = load_image(encode(src, "JPEG", exif=exif, quality=95))
    assert img.size == ((32, 64) if orientation in (6, 8) else (64, 32))
    w, h = img.size
    xy = {"top-right": (w - 8, 8), "bottom-left": (8, h - 8), "bottom-right": (w - 8, h - 8)}[corner]
    r, g, b = pixel(img, xy)
    assert r > 200 and g < 60 and b < 60
    assert pixel(img, (w // 2, h // 2))[1] > 200  # the middle is still white


def test_animated_gif_gives_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (8, 8) and pixel(img, (4, 4)) == RED


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    # 9000x9000 header with no pixel data: had it been decoded, it would fail as truncated
    data = png_bytes(9000, 9000, 1, 0, rows=None, idat=b"")
    with pytest.raises(ImageError) as err:
        load_image(data)
    message = str(err.value)
    assert "9000x9000" in message and f"{64_000_000:,}" in message


def test_pixel_cap_is_configurable():
    data = encode(noise(100, 60), "PNG")
    with pytest.raises(ImageError, match=f"100x60 = 6,000 pixels, above the limit of {5_000:,}"):
        load_image(data, max_pixels=5_000)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(noise(100, 60), max_pixels=5_000)
    assert load_image(data, max_pixels=6_000).size == (100, 60)


def test_pillow_decompression_bomb_error_becomes_image_error():
    data = png_bytes(20000, 20000, 1, 0, rows=None, idat=b"")  # beyond Pillow's own hard limit
    with pytest.raises(ImageError, match="too large"):
        load_image(data, max_pixels=10**9)


# ---------------------------------------------------------------- canvas geometry
def test_padding_is_zero_after_normalisation():
    assert normalised(PAD_FILL).abs().max() < 0.02
    t, _ = canvas_tensor(Image.new("RGB", (40, 20), RED), "top-left", 40)
    assert t[:, 20:, :].abs().max() < 0.02


def test_pad_to_canvas_rejects_a_mismatched_canvas():
    with pytest.raises(ValueError):
        pad_to_canvas(Image.new("RGB", (10, 5)), canvas_geometry(5, 10, "center"))


@pytest.mark.parametrize("anchor,rows", [("top-left", (0, 32)), ("center", (16, 48))])
def test_wide_image_content_rows_exact_without_resize(anchor: str, rows: tuple[int, int]):
    t, canvas = canvas_tensor(Image.new("RGB", (64, 32), RED), anchor, 64)
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    assert canvas == canvas_geometry(64, 32, anchor)
    top, bottom = rows
    red = normalised(RED).view(3, 1, 1)
    assert torch.allclose(t[:, top:bottom, :], red.expand(3, bottom - top, 64), atol=1e-6)
    padding_rows = [r for r in range(64) if not top <= r < bottom]
    assert t[:, padding_rows, :].abs().max() < 0.02


@pytest.mark.parametrize("anchor", ["top-left", "center"])
def test_tall_image_content_columns_after_resize(anchor: str):
    # 1:2 tall image on a 64 canvas resized to 32: content is 16 columns wide
    t, canvas = canvas_tensor(Image.new("RGB", (32, 64), GREEN), anchor, 32)
    left = 0 if anchor == "top-left" else 8
    assert canvas.offset_x == (0 if anchor == "top-left" else 16) and canvas.offset_y == 0
    green = normalised(GREEN).view(3, 1, 1)
    inner = t[:, :, left + 2:left + 14]  # away from the bicubic seam
    assert torch.allclose(inner, green.expand_as(inner), atol=0.02)
    pad_cols = [c for c in range(32) if c < left - 2 or c >= left + 18]
    assert t[:, :, pad_cols].abs().max() < 0.02


def test_resize_is_pil_bicubic_then_clip_normalisation():
    img = noise(48, 30, seed=3)
    t, canvas = canvas_tensor(img, "center", 24)
    expected = pad_to_canvas(img, canvas).resize((24, 24), Image.Resampling.BICUBIC)
    ref = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255
    ref = (ref - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(t, ref, atol=1e-6)
