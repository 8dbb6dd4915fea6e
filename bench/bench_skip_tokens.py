"""Skip tokens: views encoded, LLM visual tokens and time to first token, skip tokens on vs off.

One model per grid (2x2 and 3x3), built once with skip tokens on; "off" is a second processor
on the *same* model whose config has `skip_tokens=False` (it marks no view as skipped, so the
model encodes every view and never uses `skip_img`). Same weights, same run, on/off measured
back to back in random order, median of N repeats.

TTFT = the Generator's path for one request with a 1-token budget: `model.embed_inputs`
(experts on the kept views + projector + layout) + `model.llm.generate(inputs_embeds=...,
max_new_tokens=1)` (LLM prefill over the whole prompt + first token). The processor (image
decode, canvas, tokenisation) is excluded: the image is already loaded and processed.

Target (issue): time saving >= 90% of token saving (ratio >= 0.9) for rows with a saving.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/bench_skip_tokens.py [--quick]
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads spin only briefly before sleeping. On a CPU
# shared with other jobs, long spinning starves the thread doing the work (2-thread runs stalled
# ~100 ms per step under load), while OMP_WAIT_POLICY=PASSIVE adds ~10 ms per forward of wake-ups.
# Set GOMP_SPINCOUNT / OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import random
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_args, bench_config, config_line, fmt_ms, machine_line, make_image, md_table,  # noqa: E402
                          median, pct, publish, setup)
from sphinx_model.conversation import Conversation, Message  # noqa: E402
from sphinx_model.loading import build_from_config  # noqa: E402
from sphinx_model.processor import SphinxProcessor  # noqa: E402

NAME = "bench_skip_tokens"
RATIOS = [(1, 1), (2, 1), (1, 2), (3, 1), (4, 1)]  # width : height
LONG_SIDE = 672
PROMPT = "Describe the image in detail."
TARGET = 0.9


def conversation() -> Conversation:
    # Empty system text: with the byte tokenizer the released system prompt alone is ~160
    # positions (~35 with a real Llama tokenizer), which would swamp the visual tokens.
    return Conversation([Message.system(""), Message.user(PROMPT, image=True)])


def ttft(model, batch) -> tuple[float, float]:
    """One request's time to first token, split as (embed_inputs seconds, LLM prefill + first token seconds)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        t1 = time.perf_counter()
        model.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=1,
                           do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                           pad_token_id=0)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def paired(on: list[float], off: list[float]) -> float:
    """Median over rounds of on/off measured in the same round."""
    return median([a / b for a, b in zip(on, off)])


def ideal_ratio(r: dict, embed_share: float) -> str:
    """The ratio if embed time were proportional to views encoded and LLM time to positions,
    with no fixed costs: share * view saving + (1 - share) * position saving, over token saving."""
    v, t, p = r["views"], r["vis_tokens"], r["positions"]
    tok_save = 1 - t["on"] / t["off"]
    if tok_save <= 0:
        return "n/a"
    ideal = embed_share * (1 - v["on"] / v["off"]) + (1 - embed_share) * (1 - p["on"] / p["off"])
    return f"{ideal / tok_save:.2f}"


def run_grid(grid: int, quick: bool, repeats: int, warmup: int) -> tuple[list[dict], str]:
    torch.manual_seed(grid)
    cfg = bench_config(grid=grid, quick=quick)
    model, proc_on = build_from_config(cfg)
    model.eval()
    proc_off = SphinxProcessor(cfg.replace(skip_tokens=False), proc_on.tokenizer)
    rows = []
    for i, (w, h) in enumerate(RATIOS):
        size = (LONG_SIDE, LONG_SIDE * h // w) if w >= h else (LONG_SIDE * w // h, LONG_SIDE)
        img = make_image(*size, seed=10 * grid + i)
        batches = {}
        for mode, proc in (("on", proc_on), ("off", proc_off)):
            b = proc([conversation()], [img])
            batches[mode] = b
        pim = proc_on.process_image(img)
        rows.append(dict(ratio=f"{w}:{h}", size=f"{size[0]}x{size[1]}", grid=grid, batches=batches,
                         views={m: int((~b["view_skip"]).sum()) for m, b in batches.items()},
                         vis_tokens={m: int((b["input_ids"] == -200).sum()) for m, b in batches.items()},
                         positions={m: int(b["input_ids"].shape[1]) for m, b in batches.items()},
                         times={"on": [], "off": []}, skipped=pim.skipped))
    for _ in range(warmup):
        for r in rows:
            for mode in ("on", "off"):
                ttft(model, r["batches"][mode])
    rng = random.Random(grid)
    for _ in range(repeats):
        for r in rows:  # on/off back to back, in random order, so load changes hit both alike
            modes = ["on", "off"]
            rng.shuffle(modes)
            for mode in modes:
                r["times"][mode].append(ttft(model, r["batches"][mode]))
    return rows, config_line(cfg, model)


def main(argv: list[str] | None = None) -> str:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args(argv)
    setup(args.threads)
    repeats = args.repeats or (2 if args.quick else 11)
    warmup = 1 if args.quick else 2
    all_rows, configs = [], []
    for grid in args.grids:
        rows, cline = run_grid(grid, args.quick, repeats, warmup)
        all_rows += rows
        configs.append(cline)

    table, breakdown, ratios, ratios_min = [], [], [], []
    for r in all_rows:
        v, t, p = r["views"], r["vis_tokens"], r["positions"]
        on = [e + g for e, g in r["times"]["on"]]
        off = [e + g for e, g in r["times"]["off"]]
        tok_save = 1 - t["on"] / t["off"]
        pos_save = 1 - p["on"] / p["off"]
        view_save = 1 - v["on"] / v["off"]
        time_save = 1 - paired(on, off)               # median over rounds of on/off (same round)
        time_save_min = 1 - min(on) / min(off)
        if tok_save > 0:
            ratio, ratio_min = time_save / tok_save, time_save_min / tok_save
            ratios.append(ratio)
            ratios_min.append(ratio_min)
            ratio_s = f"{ratio:.2f}" + (" ✓" if ratio >= TARGET else " ✗")
            ratio_min_s = f"{ratio_min:.2f}"
        else:
            ratio_s = ratio_min_s = "n/a"
        table.append([f"{r['grid']}x{r['grid']}", r["ratio"], r["size"], f"{v['on']} / {v['off']}",
                      f"{t['on']} / {t['off']}", pct(tok_save) if tok_save else "0 (n/a)",
                      f"{p['on']} / {p['off']}", pct(pos_save) if pos_save else "0",
                      f"{fmt_ms(median(on))} / {fmt_ms(median(off))}", pct(time_save), ratio_s,
                      f"{fmt_ms(min(on))} / {fmt_ms(min(off))}", pct(time_save_min), ratio_min_s])
        emb_on, emb_off = [e for e, _ in r["times"]["on"]], [e for e, _ in r["times"]["off"]]
        llm_on, llm_off = [g for _, g in r["times"]["on"]], [g for _, g in r["times"]["off"]]
        breakdown.append([f"{r['grid']}x{r['grid']}", r["ratio"], pct(view_save) if view_save else "0",
                          f"{fmt_ms(median(emb_on))} / {fmt_ms(median(emb_off))}", pct(1 - paired(emb_on, emb_off)),
                          pct(pos_save) if pos_save else "0",
                          f"{fmt_ms(median(llm_on))} / {fmt_ms(median(llm_off))}", pct(1 - paired(llm_on, llm_off)),
                          pct(median(emb_off) / median(off)), ideal_ratio(r, median(emb_off) / median(off))])
    met = [x >= TARGET for x in ratios]
    overall = (f"**Target (time saving >= {TARGET:.0%} of visual-token saving, medians): "
               f"{'met' if all(met) else 'NOT met'} — {sum(met)}/{len(met)} rows with a saving meet it; "
               f"ratio median {median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f} "
               f"(from per-config minimum times instead: median {median(ratios_min):.2f}, "
               f"min {min(ratios_min):.2f}).**"
               if ratios else "No row with a saving.")
    header = ["grid", "W:H", "image px", "views enc. on / off", "visual tokens on / off", "token saving",
              "LLM positions on / off", "position saving", f"TTFT ms on / off (median of {repeats})",
              "time saving", "time / token saving", "TTFT ms on / off (min)", "time saving (min)",
              "ratio (min)"]
    bd_header = ["grid", "W:H", "view saving", "embed_inputs ms on / off", "embed saving",
                 "position saving", "LLM prefill ms on / off", "prefill saving", "embed share of TTFT (off)",
                 "ratio if time ∝ work"]
    body = "\n".join([
        "## Skip tokens: views, visual tokens, time to first token (bench/bench_skip_tokens.py)",
        "",
        f"- Machine: {machine_line()}",
        *[f"- Model: {c}" for c in configs],
        "- Same model and weights for on and off (one model per grid, built with skip tokens on; "
        "\"off\" = a second processor with `skip_tokens=False`). Anchor top-left; one image per request, batch 1.",
        f"- Prompt: empty system text + \"{PROMPT}\" (byte tokenizer: 1 position per byte).",
        "- TTFT = `embed_inputs` (experts on kept views + projector + layout) + `llm.generate(inputs_embeds, "
        "max_new_tokens=1)` (prefill + first token). Processor excluded (image already loaded and "
        f"processed). {warmup} warm-up round(s), then {repeats} rounds; in each round every row runs on and off "
        "back to back in random order.",
        "- token saving = visual tokens saved / visual tokens off; position saving = the same over the whole "
        "prompt (text included); time saving = 1 - median over rounds of TTFT(on)/TTFT(off) of the same round "
        "(paired, so load swings hit both); ratio = time saving / token saving (target >= 0.9). The *(min)* "
        "columns use each configuration's fastest round instead (least disturbed by other processes).",
        "",
        md_table(header, table),
        "",
        overall,
        "",
        "Breakdown (medians; savings paired per round as above). \"ratio if time ∝ work\" = (embed share x view "
        "saving + LLM share x position saving) / token saving: the ratio with no fixed costs, below 1 where the "
        "text positions (which skip tokens cannot save) weigh more than the global view (never skipped) saves.",
        "",
        md_table(bd_header, breakdown),
    ])
    return publish(NAME, body, args)


if __name__ == "__main__":
    main()
