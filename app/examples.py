"""The clickable examples of each tab, read from `assets/examples/examples.json`.

The files are made by `assets/examples/generate.py` (scenes of the demo model's world and a
sample PDF); examples whose files are missing are left out, so the app starts without them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import REPO_ROOT

EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"


@dataclass(frozen=True)
class Examples:
    chat: list[dict[str, Any]] = field(default_factory=list)        # {"text", "files"}
    grounding: list[list[str]] = field(default_factory=list)        # [image, phrase]
    som: list[list[str]] = field(default_factory=list)              # [image, question]
    ocr: list[list[str]] = field(default_factory=list)              # [file]


def _path(name: str, root: Path) -> str | None:
    p = root / name
    return str(p) if p.is_file() else None


def load_examples(root: Path = EXAMPLES_DIR) -> Examples:
    index = root / "examples.json"
    if not index.is_file():
        return Examples()
    spec = json.loads(index.read_text(encoding="utf-8"))
    chat = []
    for ex in spec.get("chat", []):
        files = [_path(f, root) for f in ex.get("files", [])]
        if all(files):
            chat.append({"text": ex["text"], "files": files})
    grounding = [[p, ex["phrase"]] for ex in spec.get("grounding", []) if (p := _path(ex["image"], root))]
    som = [[p, ex["question"]] for ex in spec.get("som", []) if (p := _path(ex["image"], root))]
    ocr = [[p] for ex in spec.get("ocr", []) if (p := _path(ex["file"], root))]
    return Examples(chat, grounding, som, ocr)
