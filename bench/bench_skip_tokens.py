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

import random
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_args, bench_config, config_line, fmt_ms, machine_line, make_image, md_table,  # noqa: E402
                          median, pct, results_path, setup, timed, write_section)
from sphinx_model.checkpoint import build_from_config  # noqa: E402
from sphinx_model.conversation import Conversation, Message  # noqa: E402
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


def ttft(model, batch) -> int:
    with torch.inference_mode():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=1,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                                 pad_token_id=0)
    return int(out[0, -1])


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
                t, _ = timed(lambda: ttft(model, r["batches"][mode]))
                r["times"][mode].append(t)
    return rows, config_line(cfg, model)


def main(argv: list[str] | None = None) -> str:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args(argv)
    setup(args.threads)
    repeats = args.repeats or (2 if args.quick else 9)
    warmup = 1 if args.quick else 2
    all_rows, configs = [], []
    for grid in args.grids:
        rows, cline = run_grid(grid, args.quick, repeats, warmup)
        all_rows += rows
        configs.append(cline)

    table, ratios = [], []
    for r in all_rows:
        v, t, p = r["views"], r["vis_tokens"], r["positions"]
        on, off = median(r["times"]["on"]), median(r["times"]["off"])
        tok_save = 1 - t["on"] / t["off"]
        pos_save = 1 - p["on"] / p["off"]
        time_save = 1 - on / off
        if tok_save > 0:
            ratio = time_save / tok_save
            ratios.append(ratio)
            ratio_s = f"{ratio:.2f}" + (" ✓" if ratio >= TARGET else " ✗")
        else:
            ratio_s = "n/a"
        table.append([f"{r['grid']}x{r['grid']}", r["ratio"], r["size"], f"{v['on']} / {v['off']}",
                      f"{t['on']} / {t['off']}", pct(tok_save) if tok_save else "0 (n/a)",
                      f"{p['on']} / {p['off']}", pct(pos_save) if pos_save else "0",
                      f"{fmt_ms(on)} / {fmt_ms(off)}", pct(time_save), ratio_s])
    met = [x >= TARGET for x in ratios]
    overall = (f"**Target (time saving >= {TARGET:.0%} of visual-token saving): "
               f"{'met' if all(met) else 'NOT met'} — {sum(met)}/{len(met)} rows with a saving meet it; "
               f"ratio median {median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}.**"
               if ratios else "No row with a saving.")
    header = ["grid", "W:H", "image px", "views enc. on / off", "visual tokens on / off", "token saving",
              "LLM positions on / off", "position saving", f"TTFT ms on / off (median of {repeats})",
              "time saving", "time / token saving"]
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
        f"processed). {warmup} warm-up round(s), then {repeats} rounds; on/off back to back in random order; "
        "medians.",
        "- token saving = visual tokens saved / visual tokens off; position saving = the same over the whole "
        "prompt (text included); ratio = time saving / token saving.",
        "",
        md_table(header, table),
        "",
        overall,
    ])
    if args.quick:
        body = body.replace("## Skip tokens", "## [QUICK SMOKE RUN — numbers meaningless] Skip tokens", 1)
    print(body)
    path = results_path(args)
    if path is not None:
        write_section(NAME, body, path)
        print(f"\nwritten to {path}")
    return body


if __name__ == "__main__":
    main()
