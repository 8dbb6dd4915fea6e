"""Per-token decode latency: full model (image in the context) vs the bare LLM, same weights.

Three ways to generate at the same context length (same number of prompt positions), greedy,
exactly K new tokens (EOS suppressed with `min_new_tokens`):

  * bare LLM      `model.llm.generate(input_ids=...)`: random text ids, as many as the full prompt;
  * full model    `model.embed_inputs(...)` (image included) + `model.llm.generate(inputs_embeds=...)`;
  * Generator     the full model as `Generator._generate_ids` calls it, i.e. also with its
                  per-step stop-string criterion (`StopOnStrings`, decodes the tail every step).

Per-token latency excludes prefill: a streamer timestamps every new token and the latency is
the median (and mean) gap between consecutive tokens 1..K. The three variants run back to back
in random order in each round; medians over rounds. Target (issue): full model within 5% of
the bare LLM.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/bench_decode.py [--quick]
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads spin only briefly before sleeping. On a CPU
# shared with other jobs, long spinning starves the thread doing the work (2-thread runs stalled
# ~100 ms per step under load), while OMP_WAIT_POLICY=PASSIVE adds ~10 ms per forward of wake-ups.
# Set GOMP_SPINCOUNT / OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import random
import statistics
import sys
from pathlib import Path

import torch
from transformers import StoppingCriteriaList

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (TokenClock, base_args, bench_config, config_line, generate_fixed, machine_line,  # noqa: E402
                          make_image, md_table, median, publish, setup)
from sphinx_model.conversation import Conversation, Message  # noqa: E402
from sphinx_model.loading import build_from_config  # noqa: E402
from sphinx_model.serving.generation import StopOnStrings  # noqa: E402

NAME = "bench_decode"
TARGET = 0.05
PROMPT = "Describe the image in detail."
VARIANTS = ("bare LLM", "full model", "Generator")


def main(argv: list[str] | None = None) -> str:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=None, help="K, tokens generated per run (default 64)")
    args = ap.parse_args(argv)
    setup(args.threads)
    k = args.new_tokens or (6 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 15)

    cfg = bench_config(grid=2, quick=args.quick)
    model, processor = build_from_config(cfg)
    model.eval()
    tok = processor.tokenizer
    conv = Conversation([Message.user(PROMPT, image=True)])  # default (released) system prompt
    batch = processor([conv], [make_image(672, 672, seed=1)])
    n_ctx = batch["input_ids"].shape[1]
    n_vis = int((batch["input_ids"] == -200).sum())
    gen = torch.Generator().manual_seed(0)
    bare_ids = torch.randint(4, 260, (1, n_ctx), generator=gen)  # byte tokens, no specials
    bare_ids[0, 0] = tok.bos_token_id
    mask = batch["attention_mask"]

    def run(variant: str) -> TokenClock:
        clock = TokenClock()
        if variant == "bare LLM":
            generate_fixed(model.llm, tok, k, input_ids=bare_ids, attention_mask=mask, streamer=clock)
            return clock
        with torch.inference_mode():
            embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        criteria = StoppingCriteriaList()
        if variant == "Generator":
            criteria.append(StopOnStrings(tok, processor.template.stop_strings, prompt_len=0))
        generate_fixed(model.llm, tok, k, inputs_embeds=embeds, attention_mask=mask, stopping_criteria=criteria,
                       streamer=clock)
        return clock

    for v in VARIANTS:  # warm-up
        run(v)
    per = {v: {"median": [], "mean": [], "prefill": []} for v in VARIANTS}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(VARIANTS)
        rng.shuffle(order)
        for v in order:
            clock = run(v)
            steps = clock.step_latencies
            assert len(steps) == k - 1, (v, len(steps))
            per[v]["median"].append(statistics.median(steps))
            per[v]["mean"].append(statistics.fmean(steps))
            per[v]["prefill"].append(clock.first_token)

    def paired(v: str, stat: str) -> float:  # median over rounds of variant / bare in the same round
        return median([a / b for a, b in zip(per[v][stat], per["bare LLM"][stat])])

    rows, verdicts = [], []
    for v in VARIANTS:
        med = median(per[v]["median"])
        mean = median(per[v]["mean"])
        if v == "bare LLM":
            r_med = r_mean = "1 (reference)"
            verdict = "—"
        else:
            a, b = paired(v, "median"), paired(v, "mean")
            ok = a <= 1 + TARGET
            verdicts.append((v, ok, a))
            r_med, r_mean = f"{a:.3f} ({100 * (a - 1):+.1f}%)", f"{b:.3f} ({100 * (b - 1):+.1f}%)"
            verdict = "✓ met" if ok else "✗ not met"
        rows.append([v, f"{n_ctx}", f"{med * 1e3:.2f}", r_med, f"{mean * 1e3:.2f}", r_mean,
                     f"{median(per[v]['prefill']) * 1e3:.1f}", verdict])
    header = ["variant", "context positions", "per-token ms (median gap)", "vs bare (paired median)",
              "per-token ms (mean gap)", "vs bare (mean gap)", "prefill / first token ms", "target (<= +5%)"]
    met = all(ok for _, ok, _ in verdicts)
    overall = ("**Target (full-model decode within 5% of the bare LLM): "
               + ("met" if met else "NOT met") + " — "
               + "; ".join(f"{v}: {100 * (a - 1):+.1f}%" for v, _, a in verdicts) + ".**")
    body = "\n".join([
        "## Decode latency: full model vs bare LLM (bench/bench_decode.py)",
        "",
        f"- Machine: {machine_line()}",
        f"- Model: {config_line(cfg, model)}",
        f"- Context: {n_ctx} positions for every variant (full model: BOS + {n_vis} visual tokens of a 672x672 "
        f"image, 5 views + released system prompt + \"{PROMPT}\"; bare LLM: {n_ctx} random byte-token ids). "
        f"Batch 1, greedy, exactly {k} new tokens (`min_new_tokens`, so no early EOS), KV cache on.",
        f"- Per-token latency = gap between consecutive new tokens (a streamer timestamps each), so prefill "
        f"is excluded: {k - 1} decode steps per run; per run the median and the mean gap; {repeats} rounds "
        "(after one warm-up), the three variants back to back in random order each round; table shows "
        "medians over rounds, ratios are medians of same-round ratios.",
        "- full model = `embed_inputs` + `llm.generate(inputs_embeds=...)`; Generator = the same plus the "
        "per-step `StopOnStrings` criterion that `Generator` always installs for the sphinx template.",
        "",
        md_table(header, rows),
        "",
        overall,
    ])
    return publish(NAME, body, args)


if __name__ == "__main__":
    main()
