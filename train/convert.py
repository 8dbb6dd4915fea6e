"""`python -m train.convert FORMAT IN OUT [options]`: one dataset file (or folder) -> JSONL.

The flags of each format come from its options dataclass (plus the common ones), so the
CLI and the Python API cannot drift apart. `python -m train.convert FORMAT --help` lists
them. Input problems print one `error:` line and exit with status 2; anything unforeseen
prints one line and exits 1 (`--debug` shows its traceback). Bad records never stop a run:
they are skipped and counted in the summary line.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from train.converters import REGISTRY, CommonOptions, Converter, ConvertError, convert


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _flag_kwargs(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for one dataclass field, from its type hint."""
    kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help", "")}
    if field.default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = field.default
        if field.default not in (None, ""):
            kwargs["help"] += " (default: %(default)s)"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(hint))
    elif hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = hint
    return kwargs


def add_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True):
            group.add_argument("--" + f.name.replace("_", "-"), **_flag_kwargs(f, hints[f.name]))


def options_from(args: argparse.Namespace, cls: type, **extra: Any) -> Any:
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    return cls(**{n: getattr(args, n) for n in names}, **extra)


def build_parser(converter: Converter) -> argparse.ArgumentParser:
    prog = f"python -m train.convert {converter.name}"
    parser = _Parser(prog=prog, description=f"{converter.summary} Writes task '{converter.task}'.")
    parser.add_argument("input", metavar="IN", type=Path, help="input file (or folder, where the format reads one)")
    parser.add_argument("output", metavar="OUT", type=Path, help="output JSONL; generated images go beside it")
    add_options(parser, converter.options, f"{converter.name} options")
    add_options(parser, CommonOptions, "common options")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return parser


def _usage() -> str:
    lines = ["usage: python -m train.convert FORMAT IN OUT [options]", "", "formats:"]
    lines += [f"  {name:<15} {REGISTRY.get(name).summary}" for name in REGISTRY.names()]
    lines += ["", "python -m train.convert FORMAT --help lists a format's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    try:
        converter = REGISTRY.get(argv[0])
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = build_parser(converter).parse_args(argv[1:])
    try:
        if not args.input.exists():
            raise ConvertError(f"input not found: {args.input}")
        common = options_from(args, CommonOptions)
        stats = convert(converter.name, args.input, args.output, common, options_from(args, converter.options))
    except ConvertError as e:
        return _fail(str(e))
    except OSError as e:  # unreadable input, OUT's folder cannot be created, a full disk
        return _fail(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last word: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or ["(no message)"])[0][:300]
        print(f"error: unexpected {type(e).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    print(f"{converter.name}: {args.output}: {stats.summary()}")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
