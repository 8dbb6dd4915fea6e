"""Pixel-value rules shared by the model's image loader and the store, torch-free.

The store must keep exactly the picture the model answered about, so both sides convert
high-bit-depth images with this one rule.
"""
from __future__ import annotations

import numpy as np


def to_uint8(values: np.ndarray) -> np.ndarray:
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
