"""Command line: `python -m sphinx_model chat ...` and `python -m sphinx_model convert-accessory SRC DST`."""
from __future__ import annotations

import argparse
import sys
import threading


def _chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="answer questions about an image (one answer with --prompt, else interactive)")
    p.add_argument("--model", required=True, help="checkpoint folder, hub repo id, or preset name")
    p.add_argument("--image", help="image file (omit for a text-only chat)")
    p.add_argument("--prompt", help="ask one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--boxes", action="store_true", help="also print boxes in the answer as image pixels")


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-accessory", help="convert a released LLaMA2-Accessory SPHINX folder to our format",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


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


def chat(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import CheckpointError, load_model
    from .conversation import Conversation, Message
    from .generation import GenerationSettings, Generator
    from .image_processing import ImageError, load_image

    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_model(args.model, device=device, dtype=args.dtype)
        pil = load_image(args.image, max_pixels=processor.config.max_pixels) if args.image else None
        image = processor.process_image(pil) if pil is not None else None
    except (CheckpointError, ImageError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = Generator(model, processor)
    conv = Conversation()
    first = True
    while True:
        if args.prompt is not None:
            question = args.prompt
        else:
            try:
                question = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not question:
                continue
            if question in ("exit", "quit"):
                return 0
        conv.append(Message.user(question, image=first and image is not None))
        first = False
        try:
            answer = _answer(gen, conv, image, settings, args.boxes, processor, pil)
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"error: {e}", file=sys.stderr)
            return 2
        conv.append(Message.assistant(answer))
        if args.prompt is not None:
            return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m sphinx_model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _chat_parser(sub)
    _convert_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "convert-accessory":
        from .convert_accessory import main_convert

        return main_convert(args.rest)
    return chat(args)


if __name__ == "__main__":
    sys.exit(main())
