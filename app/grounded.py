"""Grounded answers as a person reads them, as in the Kosmos-2 demo: each `<p>phrase</p> [box]`
becomes the phrase, highlighted in the colour its box has in the overlay, with a short tag
("box 1"); the raw model text stays as it was (stored, and one click away in the UI).

Regions are counted in the order `sphinx_model.boxes.parse_regions` finds them (the order the
overlay draws them), boxes and points each numbered from 1, and coloured as `app.render`
colours them: the n-th box (or point) takes the n-th colour of the same supervision palette.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from sphinx_model.boxes import _COORDS, _NAME  # the patterns parse_regions reads: the same regions, in order

from .render import PALETTE

Segment = tuple[str, str | None]     # (text, tag) as gr.HighlightedText takes them
_JOINER = re.compile(r"\s*[;,]?\s*")  # between a phrase and its box, or between two boxes of one phrase


@dataclass
class Grounded:
    segments: list[Segment] = field(default_factory=list)
    colors: dict[str, str] = field(default_factory=dict)    # tag -> "#rrggbb", the overlay's colour

    @property
    def tags(self) -> list[str]:
        return list(self.colors)

    def markdown(self) -> str:
        """For the Chatbot: HTML-escaped text, each grounded phrase in bold with its tag."""
        out = []
        for text, tag in self.segments:
            if tag is None:
                out.append(html.escape(text, quote=False))
            elif text and text != "+":
                out.append(f"**{html.escape(text.strip(), quote=False)}** ‹{tag}›")
            else:
                out.append(f"‹{tag}›")
        return "".join(out)


def _coords(m: re.Match[str]) -> int | None:
    """2 (point), 4 (box), or None when parse_regions would skip it."""
    try:
        values = [float(v) for v in m.group(1).split(",")]
    except ValueError:
        return None
    if len(values) not in (2, 4) or any(v != v for v in values):
        return None
    return len(values)


def grounded(text: str, phrase: str | None = None) -> Grounded:
    """The answer's segments and tag colours. `phrase`: the name of bare boxes (a Grounding
    answer is only boxes: they are the asked phrase's)."""
    g = Grounded()
    if not isinstance(text, str):
        return g
    tokens = sorted([(m.start(), m.end(), "name", m) for m in _NAME.finditer(text)]
                    + [(m.start(), m.end(), "coords", m) for m in _COORDS.finditer(text)], key=lambda t: t[0])
    counts = {"box": 0, "point": 0}
    pos = 0
    pending: str | None = None           # a phrase waiting for its box
    last_tagged = False                  # the previous token was a region of a phrase
    plain: list[str] = []

    def flush_plain() -> None:
        if plain:
            g.segments.append(("".join(plain), None))
            plain.clear()

    for start, end, kind, m in tokens:
        size = _coords(m) if kind == "coords" else None
        between = text[pos:start] if start >= pos else ""
        if kind == "coords" and size is not None:
            region = "box" if size == 4 else "point"
            counts[region] += 1
            tag = f"{region} {counts[region]}"
            g.colors[tag] = PALETTE.by_idx(counts[region] - 1).as_hex()
            if start < pos:              # inside a phrase: counted (the overlay draws it), not shown again
                continue
            joined = _JOINER.fullmatch(between) is not None
            if pending is not None and joined:
                flush_plain()
                g.segments.append((pending, tag))
                pending, last_tagged = None, True
            elif last_tagged and joined:
                g.segments.append(("+", tag))
            else:
                if pending is not None:
                    plain.append(f"<p>{pending}</p>")
                    pending = None
                plain.append(between)
                flush_plain()
                g.segments.append((phrase or "", tag) if phrase else ("", tag))
                last_tagged = bool(phrase)
            pos = end
            continue
        if start < pos:
            continue
        if pending is not None:
            plain.append(f"<p>{pending}</p>")
            pending = None
        plain.append(between)
        if kind == "name":
            pending = m.group(1).strip()
        else:                            # coordinates parse_regions skips: text as written
            plain.append(m.group(0))
        last_tagged = False
        pos = end
    if pending is not None:
        plain.append(f"<p>{pending}</p>")
    plain.append(text[pos:])
    flush_plain()
    g.segments = [(t, tag) for t, tag in g.segments if t or tag]
    return g
