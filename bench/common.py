"""Shared helpers of the model-package benchmarks (bench_skip_tokens, bench_decode, bench_batching).

* `bench_config` — the "bench" model: big enough that the visual experts and the LLM do real
  work on a CPU, small enough that a full benchmark finishes in a few minutes on 2 cores.
* `machine_line`, `config_line` — what every results table states about where it ran.
* `write_section` — replace one `<!-- NAME -->...<!-- /NAME -->` section of bench/RESULTS.md,
  leaving every other section (other engineers' benchmarks) untouched.
* `TokenClock` — a generate() streamer that timestamps every new token (decode latency
  without prefill), and `generate_fixed` — the Generator's call to `llm.generate` with a
  fixed number of new tokens (no early EOS), so runs are comparable.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sphinx_model.config import SphinxConfig, get_preset

from bench.results import RESULTS, write_section  # noqa: F401  (re-exported for the bench scripts)

BENCH_DIR = Path(__file__).resolve().parent

# The bench LLM: a Llama of 4 layers at hidden 512 (byte tokenizer, vocab 384 as the test presets).
BENCH_LLM = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 4}
# Both experts give a 7x7 grid + 1 global token = 50 tokens per view:
#   ConvNeXt-atto (open_clip/timm trunk, random init) at 224 px: 224 / 32 = 7;
#   DINOv2 ViT-S/14 (dim 384, 6 heads, 6 of its 12 blocks, random init) at 98 px: 98 / 14 = 7.
BENCH_CONVNEXT = ("convnext_atto", 224)
BENCH_DINOV2 = ("vit_small_patch14_dinov2", 98, {"depth": 6})
BENCH_TOKENS_PER_VIEW = 50


def bench_config(grid: int = 2, canvas: int | None = None, quick: bool = False) -> SphinxConfig:
    """The benchmark model config (random init, float32) for a `grid x grid` layout.

    `quick` gives the tiny test preset's sizes (smoke runs only; numbers mean nothing)."""
    base = get_preset("sphinx-test-tiny")
    if quick:
        canvas = canvas or 64 * grid
        return base.replace(name=f"bench-quick-g{grid}", grid=grid, canvas_size=canvas)
    llm = dict(base.llm.__dict__)
    llm["config"] = {**base.llm.config, **BENCH_LLM}
    convnext, dinov2 = base.experts
    experts = [dict(convnext.__dict__, model_name=BENCH_CONVNEXT[0], image_size=BENCH_CONVNEXT[1], options={}),
               dict(dinov2.__dict__, model_name=BENCH_DINOV2[0], image_size=BENCH_DINOV2[1], options=BENCH_DINOV2[2])]
    canvas = canvas or BENCH_CONVNEXT[1] * grid  # 448 for 2x2, 672 for 3x3: ConvNeXt cells need no resize
    return base.replace(name=f"bench-g{grid}", llm=llm, experts=experts, grid=grid, canvas_size=canvas,
                        tokens_per_view=BENCH_TOKENS_PER_VIEW, max_length=4096)


def config_line(cfg: SphinxConfig, model: Any | None = None) -> str:
    c = cfg.llm.config or {}
    ex = ", ".join(f"{e.kind} `{e.model_name}`@{e.image_size}px"
                   + (f" {e.options}" if e.options else "") for e in cfg.experts)
    params = ""
    if model is not None:
        llm_p = sum(p.numel() for p in model.llm.parameters()) / 1e6
        vis_p = sum(p.numel() for e in model.experts for p in e.parameters()) / 1e6
        params = f"; params: LLM {llm_p:.1f}M, experts {vis_p:.1f}M"
    return (f"`{cfg.name}` (random init, {cfg.llm.dtype}): canvas {cfg.canvas_size}, grid {cfg.grid}x{cfg.grid}, "
            f"anchor {cfg.anchor}, {cfg.tokens_per_view} tokens/view; experts: {ex}; "
            f"LLM: {c.get('model_type')} {c.get('num_hidden_layers')} layers, hidden {c.get('hidden_size')}, "
            f"ffn {c.get('intermediate_size')}, heads {c.get('num_attention_heads')}/{c.get('num_key_value_heads')} kv, "
            f"vocab {c.get('vocab_size')}; tokenizer {cfg.tokenizer}{params}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op threads (set explicitly), "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}"
            + (f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in os.environ else "")
            + ", no GPU; "
            f"load average at the end of the run {load} (the machine is shared: timings are noisy, "
            f"on/off runs are interleaved and medians are reported)")


def setup(threads: int, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)


def base_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny model, few repeats; writes no results unless --results is given")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median taken)")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"markdown file to write the section into (default {RESULTS.relative_to(BENCH_DIR.parent)} "
                         "for full runs, nothing for --quick)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    return ap


def results_path(args: argparse.Namespace) -> Path | None:
    if args.no_write:
        return None
    if args.results is not None:
        return args.results
    return None if args.quick else RESULTS


def publish(name: str, body: str, args: argparse.Namespace) -> str:
    """Print a benchmark's section and write it to RESULTS.md (a --quick run is marked as such)."""
    if args.quick:
        body = "**[QUICK SMOKE RUN: numbers meaningless]**\n\n" + body
    print(body)
    path = results_path(args)
    if path is not None:
        write_section(name, body, path)
        print(f"\nwritten to {path}")
    return body


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --- timing -----------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class TokenClock(BaseStreamer):
    """generate() streamer that records when each new token arrives.

    generate() first `put`s the prompt ids (an empty tensor when it was given only
    `inputs_embeds`), then one `put` per decoding step with the (B,) new tokens."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now)

    def end(self) -> None:
        pass

    @property
    def step_latencies(self) -> list[float]:
        """Seconds between consecutive new tokens (decode steps only; prefill excluded)."""
        return [b - a for a, b in zip(self.times, self.times[1:])]

    @property
    def first_token(self) -> float:
        return self.times[0] - self.start


def generate_fixed(llm: Any, tokenizer: Any, new_tokens: int, *, inputs_embeds: torch.Tensor | None = None,
                   input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor,
                   stopping_criteria: StoppingCriteriaList | None = None,
                   streamer: BaseStreamer | None = None) -> torch.Tensor:
    """Greedy `llm.generate` as `Generator._generate_ids` calls it, but with exactly
    `new_tokens` new tokens (EOS suppressed until then by `min_new_tokens`). Returns the new
    tokens (B, new_tokens); raises if a stopping criterion ended generation early."""
    with torch.inference_mode():
        out = llm.generate(inputs_embeds=inputs_embeds, input_ids=input_ids, attention_mask=attention_mask,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           temperature=None, top_p=None, top_k=None, use_cache=True,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           stopping_criteria=stopping_criteria or StoppingCriteriaList(), streamer=streamer)
    if input_ids is not None:
        out = out[:, input_ids.shape[1]:]
    if out.shape[1] != new_tokens:
        raise RuntimeError(f"generation stopped after {out.shape[1]} of {new_tokens} tokens")
    return out


# --- inputs -----------------------------------------------------------------------------------
def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image with real content everywhere (noise + shapes)."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    for k in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        d.rectangle([x0, y0, x0 + width // 4, y0 + height // 4],
                    fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"
