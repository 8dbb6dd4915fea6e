"""Quantised loading: weight memory and per-token decode latency at fp32 / bf16 / 8-bit / 4-bit, same run.

One random-init checkpoint (the bench model of bench/common.py, its LLM's FFN widened to 1408 =
22 x 64 because bitsandbytes' CPU 4-bit kernel packs 64-wide blocks) is saved once and loaded
four ways through `from_pretrained` (`dtype=`, `quantize=`), exactly as users load it. For each:
the bytes of every tensor (LLM and whole model), the per-token decode latency (gap between
streamed tokens, prefill excluded; image in `inputs_embeds`; K new tokens, no early EOS) and
the cosine of the prompt's logits to fp32's. Variants run back to back in random order each
round; medians over rounds.

Second table (no timing, computed from parameter counts on the meta device): every released
member's weight memory at bf16 / 8-bit / 4-bit and whether it fits one 24 GB card.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/bench_quantize.py [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # see bench_decode.py

import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (TokenClock, base_args, bench_config, config_line, generate_fixed, machine_line,  # noqa: E402
                          make_image, md_table, median, publish, setup)
from sphinx_model.conversation import Conversation, Message  # noqa: E402
from sphinx_model.loading import build_from_config, from_pretrained, save_pretrained  # noqa: E402

NAME = "bench_quantize"
VARIANTS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "8-bit": {"quantize": "8bit"},
            "4-bit (NF4)": {"quantize": "4bit"}}
PROMPT = "Describe the image in detail."
GiB = 1024 ** 3
CARD_GIB = 22.0   # of a 24 GB card (22.35 GiB) left after the CUDA context
# The released members' LLMs (public model cards); only their shapes matter here.
LLMS = {
    "TinyLlama-1.1B": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "LLaMA2-13B": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "Mixtral-8x7B": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
                         num_experts_per_tok=2),
}
MEMBERS = [("SPHINX-Tiny", "sphinx-tiny", "TinyLlama-1.1B"), ("SPHINX-Tiny-1k", "sphinx-tiny-1k", "TinyLlama-1.1B"),
           ("SPHINX", "sphinx", "LLaMA2-13B"), ("SPHINX-1k", "sphinx-1k", "LLaMA2-13B"),
           ("SPHINX-v2-1k", "sphinx-v2-1k", "LLaMA2-13B"), ("SPHINX-MoE", "sphinx-moe-released", "Mixtral-8x7B"),
           ("SPHINX-MoE-1k", "sphinx-moe-1k", "Mixtral-8x7B")]


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def measured(args) -> tuple[str, str]:
    k = args.new_tokens or (4 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 7)
    cfg = bench_config(grid=2, quick=args.quick)
    cfg = cfg.replace(llm={**cfg.llm.__dict__, "config": {**cfg.llm.config, "intermediate_size": 1408}})
    model, processor = build_from_config(cfg)
    folder = save_pretrained(model.eval(), processor, Path(tempfile.mkdtemp(prefix="bench_quantize.")) / "ckpt")
    conv = Conversation([Message.user(PROMPT, image=True)])
    batch = processor([conv], [make_image(cfg.canvas_size, cfg.canvas_size, seed=1)])
    loaded = {name: from_pretrained(folder, **kw) for name, kw in VARIANTS.items()}

    def prefill_logits(name: str) -> torch.Tensor:
        m = loaded[name][0]
        with torch.inference_mode():
            return m(**batch).logits.float().flatten()

    reference = prefill_logits("fp32")
    cosine = {n: float(torch.nn.functional.cosine_similarity(prefill_logits(n), reference, dim=0)) for n in VARIANTS}
    sizes = {n: (tensor_bytes(m.llm), tensor_bytes(m)) for n, (m, _) in loaded.items()}

    def run(name: str) -> TokenClock:
        m, p = loaded[name]
        clock = TokenClock()
        with torch.inference_mode():
            embeds = m.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        generate_fixed(m.llm, p.tokenizer, k, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                       streamer=clock)
        return clock

    for n in VARIANTS:  # warm-up (bitsandbytes repacks its CPU weights on the first forward)
        run(n)
    per: dict[str, list[float]] = {n: [] for n in VARIANTS}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(VARIANTS)
        rng.shuffle(order)
        for n in order:
            per[n].append(statistics.median(run(n).step_latencies))
    fp32_llm, fp32_all = sizes["fp32"]
    rows = [[n, f"{sizes[n][0] / 2**20:.1f}", f"{sizes[n][0] / fp32_llm:.2f}", f"{sizes[n][1] / 2**20:.1f}",
             f"{median(per[n]) * 1e3:.1f}", f"{median(per[n]) / median(per['fp32']):.2f}", f"{cosine[n]:.4f}"]
            for n in VARIANTS]
    header = ["variant", "LLM weights MiB", "vs fp32", "whole model MiB", "per-token ms (median gap)",
              "vs fp32", "logits cosine to fp32"]
    info = (f"- Machine: {machine_line()}\n- Model: {config_line(cfg, model)} (FFN 1408)\n"
            f"- Context {batch['input_ids'].shape[1]} positions (image + \"{PROMPT}\"), batch 1, greedy, {k} new "
            f"tokens, {repeats} rounds after a warm-up, variants in random order per round. 8-bit = LLM.int8 "
            "(threshold 6), 4-bit = NF4 + double quantisation, bf16 compute; the visual experts and the projector "
            "stay bf16 in both, lm_head and embeddings stay bf16.")
    return info, md_table(header, rows)


def released_table() -> str:
    """Weight memory of every released member from parameter counts (meta device, nothing allocated)."""
    from accelerate import init_empty_weights

    from sphinx_model.config import get_preset
    from sphinx_model.loading.quantize import bytes_per_weight, quantized_weight_names
    from sphinx_model.modeling import SphinxForCausalLM

    rows = []
    for member, preset, llm in MEMBERS:
        base = get_preset(preset)
        cfg = base.replace(llm={**base.llm.__dict__, "name_or_path": None, "config": LLMS[llm]})
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SphinxForCausalLM(cfg)
        llm_sd = model.llm.state_dict()
        small = set(quantized_weight_names(model.llm))
        n_small = sum(llm_sd[k].numel() for k in small)
        n_llm = sum(t.numel() for t in llm_sd.values())
        n_all = sum(t.numel() for t in model.state_dict().values())
        kv = 2 * 2 * cfg.llm.config["num_hidden_layers"] * cfg.llm.config["num_key_value_heads"] * \
            (cfg.llm.config["hidden_size"] // cfg.llm.config["num_attention_heads"])      # bytes per position
        positions = cfg.num_views * (cfg.tokens_per_view + 2) + 1024
        gib = {m: (n_small * bytes_per_weight(m) + (n_all - n_small) * 2) / GiB for m in (None, "8bit", "4bit")}
        fits = {m: "yes" if g + kv * positions / GiB <= CARD_GIB else "no" for m, g in gib.items()}
        rows.append([member, llm, f"{n_llm / 1e9:.2f}B + {(n_all - n_llm) / 1e9:.2f}B",
                     *[f"{gib[m]:.1f} ({fits[m]})" for m in (None, "8bit", "4bit")]])
    header = ["member", "LLM", "params: LLM + vision", "bf16 GiB (fits 24 GB?)", "8-bit GiB (fits?)", "4-bit GiB (fits?)"]
    note = (f"Weights only, from parameter counts: quantised = the LLM's linear layers and Mixtral's experts "
            f"(8-bit 1 byte, NF4 {bytes_per_weight('4bit'):.3f} bytes with its double-quantised scales); "
            "embeddings, lm_head, norms, the visual experts and the projectors stay bf16 (2 bytes). "
            f"\"fits\" = weights + a bf16 KV cache for the image tokens and 1024 text tokens <= {CARD_GIB:g} GiB "
            "(a 24 GB card less its CUDA context); activations of the visual experts come on top, one view at "
            "a time. Whatever does not fit runs on the CPU with `--device-map auto --max-memory 0=20GiB,cpu=...`.")
    return md_table(header, rows) + "\n\n" + note


def main(argv: list[str] | None = None) -> str:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 32)")
    args = ap.parse_args(argv)
    setup(args.threads)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    info, table = measured(args)
    body = "\n".join(["## Quantised loading: memory and decode latency (bench/bench_quantize.py)", "", info, "",
                      table, "", "### The released members on one 24 GB GPU (parameter counts)", "", released_table()])
    return publish(NAME, body, args)


if __name__ == "__main__":
    main()
