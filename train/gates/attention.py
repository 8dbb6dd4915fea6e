"""`python -m train.gates.attention RUN_FOLDER`: where a Gate A model looks when it starts a box.

For grounding questions about held-out-style scenes with `--objects` objects, the attention of the
position that writes the first coordinate is summed, per layer and head, over the visual tokens of
the named object (target: its shape and colour), of the other objects, and over everything else in
the image (empty tokens, start/end/skip). A model that points by content has a head whose mass sits
on the target; one that only finds "an object" splits it over all objects.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from sphinx_model.positions import rotary_positions
from sphinx_model.processor import IMAGE_TOKEN_ID

from ..world.tasks import PROMPTS, TaskWriter, describe
from .attend import attributes, visual_slots
from .pointing import (
    OracleSphinx,
    collate,
    load_run,
    make_sample,
    training_scenes,
)

KINDS = ("target", "object", "other")


def slot_kinds(feats: torch.Tensor, skipped: list[bool], shape: str, colour: str) -> list[str]:
    """The kind of every visual position of one image, in layout order (start, tokens, end per kept
    view; one skip token per skipped view)."""
    kinds = []
    for f in visual_slots(feats, skipped):
        held = None if f is None else attributes(f)
        kinds.append("other" if held is None else "target" if held[:2] == (shape, colour) else "object")
    return kinds


@torch.no_grad()
def attention_table(model: OracleSphinx, proc, run, objects: int, questions: int, seed: int = 1) -> dict:
    """Mean attention mass per (layer, head, kind) at the first coordinate's position."""
    llm = model.model.llm
    llm.set_attn_implementation("eager")                 # sdpa does not hand attention weights back
    model.eval()
    rng = random.Random(seed)
    scenes = [s for s in training_scenes(run) if len(s.objects) == objects]
    totals: dict[tuple[int, int, str], float] = {}
    n = 0
    for scene in scenes:
        if n == questions:
            break
        named = [(o, p) for o in scene.objects if (p := describe(o, scene, rng))]
        if not named:
            continue
        obj, phrase = rng.choice(named)
        sample = make_sample(scene, PROMPTS["grounding"][0].format(phrase=phrase),
                             TaskWriter(scene, proc.config.anchor).box(obj.box), proc, None, run.system)
        b = collate([sample], proc)
        image_at = (b["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[:, 0]
        kinds = slot_kinds(sample.feats, sample.skipped, obj.shape, obj.colour)
        query = int((b["labels"][0] != -100).nonzero()[0, 0])   # the input there predicts the first coordinate
        out = llm(inputs_embeds=model.embed(b["input_ids"], b["feats"], b["view_skip"]),
                  position_ids=rotary_positions(b["input_ids"], b["attention_mask"], run.shared_image_position),
                  output_attentions=True)
        for layer, att in enumerate(out.attentions):
            a = att[0, :, query, image_at]                          # (heads, visual positions)
            for kind in KINDS:
                chosen = torch.tensor([k == kind for k in kinds])
                mass = a[:, chosen].sum(-1)
                for head, m in enumerate(mass.tolist()):
                    totals[(layer, head, kind)] = totals.get((layer, head, kind), 0.0) + m
        n += 1
    llm.set_attn_implementation("sdpa")
    return {"questions": n, "mass": {f"{l}/{h}/{k}": v / max(n, 1) for (l, h, k), v in totals.items()}}


def format_table(table: dict, layers: int, heads: int) -> str:
    mass = table["mass"]
    lines = ["| layer | " + " | ".join(f"head {h}: target / other objects / rest" for h in range(heads)) + " |",
             "|---|" + "---|" * heads]
    for layer in range(layers):
        cells = [" / ".join(f"{mass[f'{layer}/{h}/{k}']:.2f}" for k in KINDS) for h in range(heads)]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.gates.attention", description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a gate run folder (run.json and weights.safetensors)")
    ap.add_argument("--objects", type=int, default=2, help="scenes with exactly this many objects")
    ap.add_argument("--questions", type=int, default=24)
    a = ap.parse_args(argv)
    try:
        run, model, proc = load_run(a.run)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    table = attention_table(model, proc, run, a.objects, a.questions)
    cfg = model.model.llm.config
    print(f"{table['questions']} grounding questions on {a.objects}-object scenes; attention of the first coordinate's position")
    print(format_table(table, cfg.num_hidden_layers, cfg.num_attention_heads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
