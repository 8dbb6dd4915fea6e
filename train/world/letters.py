"""Where each letter of a drawn word sits: the reading targets' ground truth.

A word's truth is its ink box (`WorldWord.box`); its letters' places are not stored, so they are
measured again from the font it was drawn with: each letter's ink centre along the word's
advance (kerning aside), scaled onto the ink box. Exact to a pixel or two, which is far finer
than the token cells (32 px of expert input) the targets are assigned to.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

from .scene import WorldWord
from .vocab import HELDOUT_FONTS, TRAIN_FONTS, font_paths

_MEASURE_PX = 64  # the size the font is measured at: ratios along the word do not depend on it


@lru_cache(maxsize=None)
def _font_by_stem() -> dict[str, Path]:
    return {p.stem: p for p in font_paths(TRAIN_FONTS) + font_paths(HELDOUT_FONTS)}


@lru_cache(maxsize=64)
def _font(stem: str) -> ImageFont.FreeTypeFont:
    path = _font_by_stem().get(stem)
    if path is None:
        raise ValueError(f"word drawn with an unknown font {stem!r}")
    return ImageFont.truetype(str(path), _MEASURE_PX)


def letter_centres(word: WorldWord) -> list[float]:
    """The x centre of each character of `word.text`, in the scene's pixels (same frame as its box)."""
    font, text = _font(word.font), word.text
    ink_left, _, ink_right, _ = font.getbbox(text)
    span = max(1e-6, ink_right - ink_left)
    x0, _, x1, _ = word.box
    centres = []
    for i, ch in enumerate(text):
        left, _, right, _ = font.getbbox(ch)
        at = font.getlength(text[:i]) + (left + right) / 2
        centres.append(x0 + (at - ink_left) / span * (x1 - x0))
    return centres
