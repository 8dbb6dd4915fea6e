"""One validator per kind of input, shared by the UI events and the API endpoints.

Every value a client sends (typed text, a number, a page, a mark list, the data of a like or
a click) passes through exactly one function here before a handler uses it. Each returns the
value in the form the handler needs or raises `InputError` with one line that names the
input; nothing here touches the model or the store. Text is checked against what the store
can keep (`storage.values`), so a prompt the store would refuse is refused before the model
spends any time on it.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from storage.values import clean_text

MAX_PROMPT_CHARS = 8000           # a question, a phrase
MAX_FEEDBACK_CHARS = 8000         # a comment, a corrected answer
MAX_MARKS_CHARS = 20_000          # 30 boxes of four numbers fit in well under 2,000
MAX_MARKS_DEPTH = 2               # a list of lists
MAX_NUMBER_DIGITS = 12            # pixels and counts; beyond this it is not a coordinate


class InputError(ValueError):
    """A value a client sent that cannot be used; one line naming the input."""


# --- text ------------------------------------------------------------------------------------
def prompt_text(value: Any, what: str = "question", limit: int = MAX_PROMPT_CHARS) -> str:
    """Non-empty text (stripped) within `limit` characters that the store can keep."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"the {what} is empty: type something first")
    return _storable(value.strip(), what, limit)


def optional_text(value: Any, what: str, limit: int = MAX_FEEDBACK_CHARS) -> str:
    """Text that may be empty ("" for None), stripped, within `limit`, storable."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"the {what} must be text, got {type(value).__name__}")
    return _storable(value.strip(), what, limit)


def _storable(text: str, what: str, limit: int) -> str:
    if len(text) > limit:
        raise InputError(f"the {what} is {len(text):,} characters; the limit is {limit:,}")
    try:
        return clean_text(text, f"the {what}")
    except ValueError as e:        # a NUL or a lone surrogate: no backend stores it
        raise InputError(f"{e}: remove it and try again") from None


def choice(value: Any, what: str, options: tuple[str, ...], default: str | None = None) -> str:
    """One of `options` ("" or None: `default`)."""
    if (value is None or value == "") and default is not None:
        return default
    if not isinstance(value, str) or value not in options:
        raise InputError(f"{what} must be one of {', '.join(options)}")
    return value


def conversation_id(value: Any) -> str:
    """A conversation id as the app hands them out ("" = a new conversation)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value.strip()):
        raise InputError("no such conversation in your history")
    return value.strip()


# --- numbers ---------------------------------------------------------------------------------
def number(value: Any, what: str, low: float, high: float, *, integer: bool = False) -> float | int:
    """A finite number in [low, high] (an integer if `integer`); numeric strings are read, booleans,
    NaN, infinities and anything else are refused in one line."""
    if isinstance(value, bool) or value is None:
        raise InputError(f"{what} must be a number")
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 32:
            raise InputError(f"{what} must be a number")
        try:
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise InputError(f"{what} must be a number, got {text[:20]!r}") from None
    if not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{what} must be a finite number")
    if integer and value != int(value):
        raise InputError(f"{what} must be a whole number")
    if not low <= value <= high:
        shown = f"{low:g}..{high:g}" if not integer else f"{int(low)}..{int(high)}"
        raise InputError(f"{what} must be in {shown}")
    return int(value) if integer else float(value)


def page_number(value: Any, pages: int) -> int:
    """A 1-based page of a document of `pages` pages; an empty field means page 1, but page 0
    (or any other number outside the document) is refused, never read as another page."""
    if value is None or value == "":
        value = 1
    pages = max(pages, 1)
    try:
        page = int(number(value, "the page", -1e9, 1e9, integer=True))
    except InputError:
        raise InputError(f"the page must be a whole number from 1 to {pages}") from None
    if not 1 <= page <= pages:
        raise InputError(f"page {page} does not exist here: the page must be a whole number from 1 to {pages}")
    return page


# --- Set-of-Mark marks ----------------------------------------------------------------------
def marks_list(text: Any, max_marks: int) -> list[tuple[float, ...]]:
    """A JSON list of [x, y] points / [x0, y0, x1, y1] boxes in pixels, read with bounded size,
    depth and digits (so no input makes the parser recurse or convert a huge integer)."""
    if isinstance(text, list):         # already parsed (a Python caller)
        return _marks(text, max_marks)
    if not isinstance(text, str):
        raise InputError("marks must be text: a JSON list of [x, y] points or [x0, y0, x1, y1] boxes")
    text = text.strip()
    if len(text) > MAX_MARKS_CHARS:
        raise InputError(f"marks are {len(text):,} characters; the limit is {MAX_MARKS_CHARS:,}")
    if _depth(text) > MAX_MARKS_DEPTH:
        raise InputError("marks must be a flat list of [x, y] points or [x0, y0, x1, y1] boxes (nested too deep)")
    try:
        parsed = json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float,
                            parse_constant=_no_constant)
    except InputError:
        raise
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise InputError("marks must be 'model', 'opencv', 'both' or a JSON list of points/boxes") from None
    return _marks(parsed, max_marks)


def _marks(parsed: Any, max_marks: int) -> list[tuple[float, ...]]:
    if not isinstance(parsed, list) or not parsed:
        raise InputError("marks must be a non-empty list of [x, y] points or [x0, y0, x1, y1] boxes")
    if len(parsed) > max_marks:
        raise InputError(f"at most {max_marks} marks, got {len(parsed)}")
    out = []
    for i, item in enumerate(parsed):
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 4) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in item):
            raise InputError(f"mark {i + 1} is not [x, y] or [x0, y0, x1, y1] in pixels")
        out.append(tuple(float(v) for v in item))
    return out


def _depth(text: str) -> int:
    """The deepest bracket nesting, counted without parsing (strings are not valid marks anyway)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_MARKS_DEPTH:
                return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _bounded_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise InputError(f"a mark coordinate has {len(s):,} digits; coordinates are pixels")
    return int(s)


def _bounded_float(s: str) -> float:
    if len(s) > 2 * MAX_NUMBER_DIGITS + 8:
        raise InputError(f"a mark coordinate has {len(s):,} characters; coordinates are pixels")
    value = float(s)
    if not math.isfinite(value):
        raise InputError("mark coordinates must be finite numbers")
    return value


def _no_constant(name: str) -> float:
    raise InputError(f"mark coordinates must be finite numbers, got {name}")


# --- event data (likes, clicks) ------------------------------------------------------------------
def event_payload(evt: Any) -> dict[str, Any]:
    """The data a UI event came with (what Gradio's EventData holds), or one line if there is none."""
    data = getattr(evt, "_data", None) if evt is not None else None
    if not isinstance(data, dict):
        raise InputError("this event came without its data; reload the page and try again")
    return data


def like_event(evt: Any) -> tuple[int, Any]:
    """(message index, verdict) of a like / dislike on a Chatbot message."""
    data = event_payload(evt)
    index = data.get("index")
    if isinstance(index, (list, tuple)) and index:
        index = index[0]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1_000_000:
        raise InputError("this rating names no answer; click the thumb under an answer")
    liked = data.get("liked")
    if liked is not None and not isinstance(liked, (bool, str)):
        raise InputError("a rating is a like or a dislike")
    return index, liked


def click_point(evt: Any) -> tuple[float, float]:
    """(x, y) in pixels of a click on an image."""
    data = event_payload(evt)
    index = data.get("index")
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise InputError("that click has no position on the image")
    x, y = (number(v, "the click position", -1e6, 1e6) for v in index)
    return x, y
