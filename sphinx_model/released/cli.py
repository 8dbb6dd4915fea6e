"""`python -m sphinx_model convert-accessory SRC DST [...]`: the converter's command line.

SRC is a released folder, or `released:NAME` downloaded first (hub.py); apart from the
converter (convert.py) so that the converter does not need the download, which needs it.
"""
from __future__ import annotations

import argparse
import sys

from ..loading.checkpoint import CheckpointError
from ..modeling import DTYPES
from .convert import convert_accessory
from .hub import download_released, is_released


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The converter's command-line arguments (shared by `python -m sphinx_model convert-accessory`)."""
    parser.add_argument("src", help="released folder (consolidated.*.model.pth, config.json, meta.json, "
                                    "tokenizer.model), or released:NAME to download it first (e.g. released:SPHINX-Tiny)")
    parser.add_argument("dst", help="output checkpoint folder")
    parser.add_argument("--base-preset", help="preset giving experts/canvas/template (default: from meta.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--allow-unmapped", action="store_true", help="convert even if keys do not map")
    return parser


def run_convert(ns: argparse.Namespace) -> int:
    """Convert with parsed arguments; foreseeable failures print one `error:` line, exit 2."""
    try:
        src = download_released(ns.src) if is_released(ns.src) else ns.src
        report = convert_accessory(src, ns.dst, base_preset=ns.base_preset, dtype=ns.dtype,
                                   allow_unmapped=ns.allow_unmapped, progress=True)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    print(f"wrote {ns.dst}")
    return 0


def main_convert(argv: list[str]) -> int:
    """`python -m sphinx_model convert-accessory SRC DST [...]`; returns the exit code."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m sphinx_model convert-accessory",
                                                   description="Convert a released LLaMA2-Accessory SPHINX folder."))
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # usage errors and --help
        return int(e.code or 0)
    return run_convert(ns)
