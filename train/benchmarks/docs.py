"""Images of local task files: a document names its image(s) by path, the task YAML says
`doc_to_visual: !function train.benchmarks.docs.doc_to_visual`.

Paths are read through `sphinx_model.image_processing.load_image` (regular files only, EXIF
orientation applied, RGB); a path that is missing or unreadable raises, and the model reports
the document instead of answering it.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from sphinx_model.image_processing import load_image


def image_paths(doc: Mapping[str, Any]) -> list[str]:
    """`doc["image"]` (one path) or `doc["images"]` (several), in order; [] for a text-only document."""
    if doc.get("images") is not None:
        return [str(p) for p in doc["images"]]
    if doc.get("image") not in (None, ""):
        return [str(doc["image"])]
    return []


def doc_to_visual(doc: Mapping[str, Any]) -> list[Image.Image]:
    """The document's images, loaded."""
    return [load_image(Path(p)) for p in image_paths(doc)]
