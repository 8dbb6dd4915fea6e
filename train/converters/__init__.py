"""Dataset converters: public dataset formats -> JSONL of THE conversation schema.

Each format module registers one converter with `@register(name, task=..., options=...)`;
importing this package imports them all, so `REGISTRY` knows every format. Use
`convert(format, source, out, common, options)` from code, or the CLI
`python -m train.convert FORMAT IN OUT [options]`.

Formats: llava, coco-captions, coco-detection, refcoco, vqa, text, pdf-ocr, som (see each
module's docstring for the exact input it accepts).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from sphinx_model.conversation import Conversation, SchemaError, write_jsonl

from .base import REGISTRY, CommonOptions, Converter, ConvertError, Stats, register
from . import coco_captions, coco_detection, llava, pdf_ocr, refcoco, som, text, vqa  # noqa: E402,F401 (registers)

__all__ = ["REGISTRY", "CommonOptions", "ConvertError", "Converter", "Stats", "convert", "register"]


def convert(fmt: str, source: str | Path, out: str | Path, common: CommonOptions | None = None,
            options: Any = None) -> Stats:
    """Convert `source` to the JSONL file `out`; returns what was written and skipped.

    Generated images go under `out`'s folder and are referenced relative to it. The file is
    written to `out.part` and renamed at the end, so a failed run leaves no half file.
    Every dialogue is validated as a training sample; invalid ones are skipped and counted.
    """
    converter = REGISTRY.get(fmt)
    out = Path(out)
    options = converter.options() if options is None else options
    _check_output(out, [Path(source), *(v for v in vars(options).values() if isinstance(v, Path))])
    out.parent.mkdir(parents=True, exist_ok=True)
    common = replace(common or CommonOptions(), out_dir=out.parent)
    stats = Stats()
    tmp = out.with_name(out.name + ".part")
    try:
        stats.written = write_jsonl(tmp, _checked(converter, Path(source), common, options, stats))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def _check_output(out: Path, inputs: list[Path]) -> None:
    """OUT is a file we may replace: never a folder, never one of the inputs (or a link to one)."""
    if out.is_dir():
        raise ConvertError(f"OUT {out} is a folder; name the JSONL file to write")
    for src in inputs:
        same = out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            raise ConvertError(f"OUT {out} is the input {src}; converting would overwrite it")


def _checked(converter: Converter, source: Path, common: CommonOptions, options: Any,
             stats: Stats) -> Iterator[Conversation]:
    for conv in converter.fn(source, common, options, stats):
        conv.task = common.task or conv.task or converter.task
        try:
            conv.validate(for_training=True)
        except SchemaError:
            stats.skip("invalid dialogue")
            continue
        yield conv
