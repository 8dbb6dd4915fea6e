"""Shared machinery of the dataset converters: options, skip accounting, the registry, input I/O.

A converter turns one public dataset format into dialogues of THE conversation schema
(`sphinx_model.conversation`). It is a generator: it yields `Conversation`s and records every
record it drops in `Stats` under a short reason, so that one bad record never stops a run and
the caller can see what was lost. Input-level problems (unreadable file, unknown structure)
raise `ConvertError`, which the CLI turns into one line and exit status 2.

Input is untrusted. Ids and category ids go through `record_key` (an integer or a string,
never a list or an object), image sizes through `size_ok` (no canvas larger than the model
accepts), JSONL lines must be UTF-8 (a line that is not is skipped and counted, never turned
into U+FFFD), and text from a data set that we paste next to our own box markup (category
names, OCR words, referring sentences) goes through `label_text`: if it would read as box
markup (`<p>..</p>`, `[x,y,..]`) the item is skipped, so a data set can never forge boxes.

Torch-free; heavy optional libraries (PyMuPDF, supervision, OpenCV) are imported by the
converters that need them, inside the function.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_model.boxes import parse_regions
from sphinx_model.conversation import Conversation, Message
from sphinx_model.tiling import Anchor

MAX_IMAGE_PIXELS = 64_000_000  # the model's image loader refuses larger images (image_processing.load_image)


class ConvertError(Exception):
    """The input as a whole cannot be converted (missing, not JSON, unknown structure)."""


@dataclass(frozen=True)
class CommonOptions:
    """Options every format takes. Field metadata `help` becomes the CLI help."""

    out_dir: Path = field(default=Path("."), metadata={"cli": False})  # folder of OUT: generated images go here
    image_root: Path | None = field(default=None, metadata={
        "help": "folder the source image paths are relative to; when given, records whose image "
                "is missing there are skipped (and sizes may be read from the files)"})
    image_prefix: str = field(default="", metadata={
        "help": "prepended to every source image path written to the output (e.g. 'train2017/')"})
    anchor: Anchor = field(default="top-left", metadata={
        "help": "where the image sits on its square canvas; box text is relative to that canvas"})
    seed: int = field(default=0, metadata={"help": "seed for prompt choice (output is deterministic per seed)"})
    max_turns: int = field(default=8, metadata={
        "help": "most question/answer pairs in one dialogue; more are split into further dialogues"})
    task: str | None = field(default=None, metadata={"help": "task name to write (default: the format's)"})

    def __post_init__(self) -> None:
        check_option(self.max_turns >= 1, "--max-turns must be >= 1")
        check_option("\x00" not in self.image_prefix, "--image-prefix must not contain NUL")

    def rng(self, *key: object) -> random.Random:
        """A generator seeded by (seed, key): stable across runs and independent of record order."""
        return random.Random(":".join(str(k) for k in (self.seed, *key)))

    def image_ref(self, path: str) -> str:
        return self.image_prefix + path.lstrip("/")

    def image_missing(self, ref: str) -> bool:
        """True only when an image root is known and the file is not under it."""
        return self.image_root is not None and not (self.image_root / ref).is_file()


def check_option(ok: bool, message: str) -> None:
    """Options are validated where they are built (CLI or API alike): a bad one is a ConvertError."""
    if not ok:
        raise ConvertError(message)


def plain_folder(name: str) -> bool:
    """A relative folder name that stays inside the folder it is joined to (no `..`, not absolute)."""
    p = Path(name)
    return bool(name) and "\x00" not in name and not p.is_absolute() and ".." not in p.parts


@dataclass
class Stats:
    """What a run wrote and what it dropped, by reason."""

    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] += n

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": dict(sorted(self.skipped.items()))}

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
        return f"written {self.written}, skipped {self.total_skipped}" + (f" ({reasons})" if reasons else "")


ConvertFn = Callable[[Path, CommonOptions, Any, Stats], Iterator[Conversation]]


@dataclass(frozen=True)
class NoOptions:
    """For formats without options of their own."""


@dataclass(frozen=True)
class Converter:
    name: str
    fn: ConvertFn
    options: type  # a frozen dataclass of format-specific options (CLI flags)
    task: str  # default `task` written on every sample
    summary: str  # one line for `--help`


class Registry:
    """Format name -> converter. Filled by the `register` decorator of each format module."""

    def __init__(self) -> None:
        self._items: dict[str, Converter] = {}

    def register(self, name: str, *, task: str, options: type = NoOptions) -> Callable[[ConvertFn], ConvertFn]:
        def deco(fn: ConvertFn) -> ConvertFn:
            if name in self._items:
                raise ValueError(f"converter {name!r} registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._items[name] = Converter(name, fn, options, task, doc[0] if doc else "")
            return fn
        return deco

    def get(self, name: str) -> Converter:
        try:
            return self._items[name]
        except KeyError:
            raise ConvertError(f"unknown format {name!r} (known: {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return sorted(self._items)


REGISTRY = Registry()
register = REGISTRY.register


# --- reading inputs ----------------------------------------------------------------------
def regular_file(path: Path) -> Path:
    """`path` if it is a regular file; ConvertError otherwise (a FIFO or a device would hang or read empty)."""
    if not path.exists():
        raise ConvertError(f"input not found: {path}")
    if not path.is_file():
        raise ConvertError(f"input is not a regular file: {path}")
    return path


def load_json(path: Path) -> Any:
    """A whole JSON file; ConvertError (one line) when it is missing or malformed."""
    try:
        with open(regular_file(path), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text ({e.reason})") from None
    except RecursionError:
        raise ConvertError(f"{path}: JSON nested too deeply to read") from None


def iter_records(path: Path, stats: Stats) -> Iterator[Any]:
    """Records of a JSON list, of a JSON object's `data` list of objects, or of a JSONL file.

    JSONL is recognised by structure (the first line is a complete JSON value and more
    lines follow); a malformed JSONL line is skipped as "malformed JSON line".
    """
    if is_jsonl(path):
        yield from _iter_jsonl(path, stats)
        return
    data = load_json(path)
    if isinstance(data, dict) and _is_record_list(data.get("data")):
        data = data["data"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ConvertError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from data


def _is_record_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def is_jsonl(path: Path) -> bool:
    """JSON Lines, told by structure: the first line is a whole JSON value and more lines follow."""
    with open(regular_file(path), encoding="utf-8", errors="replace") as f:  # (a sniff: decoding is strict below)
        first = f.readline()
        second = f.readline()
    return bool(first.strip() and second.strip() and _is_json(first))


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _iter_jsonl(path: Path, stats: Stats) -> Iterator[Any]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("line not UTF-8")
                continue
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                stats.skip("malformed JSON line")


def record_key(value: Any) -> int | str | None:
    """An id usable as a key: an integer or a non-empty string. Lists, objects, booleans and
    floats (which JSON allows anywhere) give None, and the caller skips the record."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value and "\x00" not in value):
        return value
    return None


def size_ok(width: Any, height: Any) -> bool:
    """Positive integer sides whose canvas the model would accept (so nothing allocates gigabytes)."""
    return (type(width) is int and type(height) is int and width > 0 and height > 0
            and width * height <= MAX_IMAGE_PIXELS)


def label_text(value: Any) -> str | None:
    """Text from a data set that may stand next to our box markup: a non-empty string (whitespace
    collapsed) that holds no `<p>`/`</p>` tag and nothing `parse_regions` would read as a box or
    point. None means "skip this item": pasted into an answer it would forge boxes."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text or "<p>" in text or "</p>" in text or parse_regions(text):
        return None
    return text


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():  # a FIFO would block Image.open
        return None
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError):
        return None


# --- building dialogues ------------------------------------------------------------------
def chunked(pairs: list[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    size = max(1, size)
    for i in range(0, len(pairs), size):
        yield pairs[i:i + size]


def dialogue(pairs: Iterable[tuple[str, str]], image: str | None, *, id: str, task: str | None = None,
             meta: dict[str, Any] | None = None) -> Conversation:
    """A user/assistant dialogue from (question, answer) pairs; the image goes in the first turn.

    `task` may be left None: `convert` then writes the format's task (or `--task`).
    """
    conv = Conversation(id=id, task=task, meta=dict(meta or {}))
    for i, (q, a) in enumerate(pairs):
        conv.append(Message.user(q, image=image if (i == 0 and image is not None) else False))
        conv.append(Message.assistant(a))
    return conv


def dialogues(pairs: list[tuple[str, str]], image: str | None, common: CommonOptions, *, id: str,
              task: str | None = None, meta: dict[str, Any] | None = None) -> Iterator[Conversation]:
    """`pairs` as one dialogue, or several of at most `max_turns` pairs (ids get `#k`)."""
    chunks = list(chunked(pairs, common.max_turns))
    for k, chunk in enumerate(chunks):
        yield dialogue(chunk, image, id=id if len(chunks) == 1 else f"{id}#{k}", task=task, meta=meta)
