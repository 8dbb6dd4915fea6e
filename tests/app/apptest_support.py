"""Helpers shared by the app's tests (owners, pictures made on the spot, a pace for the model)."""
from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ALICE = "session:" + "a" * 32
BOB = "session:" + "b" * 32


def scene(w: int = 160, h: int = 96) -> Image.Image:
    img = Image.new("RGB", (w, h), (200, 200, 200))
    d = ImageDraw.Draw(img)
    d.rectangle([w // 8, h // 6, w // 3, h // 2], fill=(220, 30, 30))
    d.ellipse([w // 2, h // 3, w - w // 8, h - h // 8], fill=(30, 70, 220))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tiny_text_model(folder: Path) -> Path:
    """The tiny random-init preset, saved as a checkpoint folder. Its output layer keeps only the
    rows of printable ASCII bytes, so that its (random, unscripted) answers are text that
    streams in many pieces and never ends early; everything else is the preset's random init."""
    from sphinx_model.config import get_preset
    from sphinx_model.loading import build_from_config, save_pretrained

    torch.manual_seed(0)
    model, processor = build_from_config(get_preset("sphinx-test-tiny"))
    keep = torch.zeros(model.llm.lm_head.weight.shape[0], dtype=torch.bool)
    keep[[4 + b for b in range(32, 127)]] = True      # byte tokenizer: id = 4 + byte
    with torch.no_grad():
        model.llm.lm_head.weight[~keep] = 0.0
    save_pretrained(model, processor, folder)
    return folder


class Pace:
    """A pause before every forward pass of the LLM (prefill and each decoding step).

    The tiny random model writes ~500 tokens/s on this CPU, faster than a browser can show
    two partial texts or a click on Stop can land. The pause slows the real model down to
    a person's timescale; what it writes is unchanged (no scripted answers)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def __call__(self, module, args) -> None:  # a forward pre-hook
        if self.seconds > 0:
            time.sleep(self.seconds)


@contextmanager
def paced(model: torch.nn.Module, seconds: float) -> Iterator[Pace]:
    """The LLM of `model` pauses `seconds` before each forward pass while the block runs.

    With 10 ms a token, a 40-token answer spans at least eight of the service's 50 ms stream
    intervals, so it must reach the reader in pieces; unpaced, the tiny model can write it all
    within two intervals and a streaming test would pass or fail on the machine's speed."""
    pace = Pace(seconds)
    hook = model.llm.register_forward_pre_hook(pace)
    try:
        yield pace
    finally:
        hook.remove()


def running_app(service, model_dir: Path, folder: Path, **settings) -> Iterator:
    """The app served in the background on a free port, with its own store in `folder` (a fixture
    body: `yield from running_app(...)`); closed and its store disposed afterwards."""
    from app.handlers.common import AppContext
    from app.launch import serve_in_background
    from app.settings import AppSettings
    from storage import open_store

    config = AppSettings(model=str(model_dir), data_dir=folder / "data", **settings)
    running = serve_in_background(config, AppContext(service, open_store(config.storage), config))
    yield running
    running.close()
    running.context.store.dispose()
