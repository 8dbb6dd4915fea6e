"""What a value must be to be stored: the same rule, and so the same outcome, on every backend.

SQLite and PostgreSQL disagree at the edges. PostgreSQL refuses a NUL character in text and
`NaN` in JSON, and enforces `VARCHAR(n)`; SQLite stores all three (and turns a NaN float
into NULL). A lone surrogate (invalid UTF-8 from an API) fails on both, but with a driver
error. Every text, JSON and number a caller hands the repository goes through these checks
first, so the same input is accepted, or refused with the same `ValueError`, whatever the
database behind it.
"""
from __future__ import annotations

import json
import math
from typing import Any

MAX_JSON_BYTES = 1 << 20  # generation settings and parsed boxes are small; 1 MiB is generous


def clean_text(value: Any, field: str, max_len: int | None = None) -> str:
    """`value` if it is a str that every backend stores unchanged; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be text, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{field} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} is not valid Unicode (it holds a lone surrogate)") from None
    if max_len is not None and len(value) > max_len:
        raise ValueError(f"{field} is longer than {max_len} characters")
    return value


def clean_json(value: Any, field: str) -> Any:
    """A JSON-serialisable value of finite numbers whose strings pass `clean_text`; returned
    unchanged (tuples read back as lists, on every backend alike). Anything else is a ValueError."""
    if value is None:
        return None
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{field} is not plain JSON ({e})") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise ValueError(f"{field} is larger than {MAX_JSON_BYTES} bytes of JSON")
    stack = [value]
    while stack:  # every string inside (keys too): no NUL, no lone surrogate
        item = stack.pop()
        if isinstance(item, str):
            clean_text(item, field)
        elif isinstance(item, dict):
            stack.extend(k for k in item if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return value


def clean_number(value: Any, field: str) -> float | None:
    """None, or a finite number (NaN and infinities are stored differently by each backend)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r:.40}")
    return float(value)
