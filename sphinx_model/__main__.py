"""Command line: `python -m sphinx_model chat ...`, `convert-accessory SRC DST` and `push FOLDER REPO_ID`.

Every failure a user can cause (a bad flag value, a missing or hostile file, a device this
machine lacks, a prompt the model cannot take) prints one `error: ...` line on stderr and
exits 2. Anything else is a bug: one line too, exit 1, and `--debug` prints the traceback.
"""
from __future__ import annotations

import argparse
import sys
import threading
import traceback
from typing import NoReturn

EXIT_USAGE = 2
EXIT_BUG = 1


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `error:` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(text).split())[:500] or type(error).__name__


def _chat_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("chat", parents=[common],
                       help="answer questions about an image (one answer with --prompt, else interactive)")
    p.add_argument("--model", default=None,
                   help="checkpoint folder, hub repo id, preset name, or released:NAME (a released SPHINX folder, "
                        "downloaded and converted once; e.g. released:SPHINX-Tiny) "
                        "(default: the demo model in assets/demo)")
    p.add_argument("--image", help="image file (omit for a text-only chat)")
    p.add_argument("--prompt", help="ask one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, help="capped to the room the context leaves")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--boxes", action="store_true", help="also print boxes in the answer as image pixels")
    p.add_argument("--quantize", choices=["8bit", "4bit"], default=None,
                   help="bitsandbytes-quantise the LLM's linear layers (4bit: NF4, double quantisation, bf16 "
                        "compute); the visual experts stay in --dtype (bf16 by default)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="spread the model over the GPUs and the CPU; what does not fit --max-memory runs on the CPU")
    p.add_argument("--max-memory", default=None, help="memory cap per device for --device-map, e.g. 0=20GiB,cpu=64GiB")


def _push_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("push", parents=[common], help="publish a checkpoint folder as a Hugging Face Hub repo",
                       description="Upload a checkpoint folder in this project's format to the Hugging Face Hub; "
                                   "`--model USER/REPO` loads it back.")
    p.add_argument("folder", help="checkpoint folder (e.g. the output of convert-accessory)")
    p.add_argument("repo_id", help="hub repo to create or update, e.g. you/sphinx-tiny")
    p.add_argument("--private", action="store_true", help="create the repo private")


def _convert_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from .released.cli import add_arguments

    add_arguments(sub.add_parser("convert-accessory", parents=[common],
                                 help="convert a released LLaMA2-Accessory SPHINX folder to our format",
                                 description="Convert a released LLaMA2-Accessory SPHINX folder."))


def _answer(gen, conv, image, settings, show_boxes: bool, processor, pil) -> str:
    from .boxes import canvas_to_pixels, parse_regions

    pieces = []
    cancel = threading.Event()
    try:
        for piece in gen.stream(conv, image, settings, cancel=cancel):
            print(piece, end="", flush=True)
            pieces.append(piece)
    except KeyboardInterrupt:
        cancel.set()
        print(" [stopped]", end="")
    print()
    text = "".join(pieces)
    if show_boxes and pil is not None:
        canvas = processor.geometry(*pil.size)
        for r in parse_regions(text):
            px = ",".join(f"{v:.0f}" for v in canvas_to_pixels(r.coords, canvas))
            print(f"  {r.label or '-'}: [{px}] px")
    return text


def _default_model() -> str:
    """The project's own demo model, shipped in the repository's assets/demo."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "assets" / "demo"
    if not (demo / "sphinx_config.json").is_file():
        raise ValueError(f"no --model given and no demo model at {demo}; pass --model PATH_OR_ID_OR_PRESET")
    return str(demo)


def _read_question() -> str | None:
    """The next question from stdin; None at the end. Undecodable input is a usage error."""
    try:
        return input("you> ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def chat(args: argparse.Namespace) -> int:
    import torch

    from . import released  # noqa: F401  (registers released:NAME with the loader)
    from .conversation import Conversation, Message
    from .image_processing import load_image
    from .loading.checkpoint import load_model, resolve_device
    from .serving.generation import GenerationSettings, Generator
    from .text import check_text

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
    if args.prompt is not None and not check_text(args.prompt, "--prompt").strip():
        raise ValueError("--prompt is empty")
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = load_model(args.model or _default_model(), device=None if args.device_map else device,
                                  dtype=args.dtype, quantize=args.quantize, device_map=args.device_map,
                                  max_memory=args.max_memory)
    pil = load_image(args.image, max_pixels=processor.config.max_pixels) if args.image else None
    image = processor.process_image(pil) if pil is not None else None
    gen = Generator(model, processor)
    conv = Conversation()
    while True:
        question = args.prompt if args.prompt is not None else _read_question()
        if question is None or question in ("exit", "quit"):
            return 0
        if not question:
            continue
        check_text(question, "the question")
        conv.append(Message.user(question, image=not conv.messages and image is not None))
        answer = _answer(gen, conv, image, settings, args.boxes, processor, pil)
        conv.append(Message.assistant(answer))
        if args.prompt is not None:
            return 0


def _foreseen() -> tuple[type[BaseException], ...]:
    """Failures a user can cause; each class carries a message meant for them."""
    from .loading import CheckpointError

    return (CheckpointError, ValueError, KeyError, OSError, UnicodeError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command too; absent there = unset
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an unexpected error")
    parser = _Parser(prog="python -m sphinx_model", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _chat_parser(sub, common)
    _convert_parser(sub, common)
    _push_parser(sub, common)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert-accessory":
            from .released.cli import run_convert

            return run_convert(args)
        if args.command == "push":
            from .released.hub import push_to_hub

            print(push_to_hub(args.folder, args.repo_id, private=args.private))
            return 0
        return chat(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into exit codes
        if args.debug:
            traceback.print_exc()
        if isinstance(e, _foreseen()):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (a bug; rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
