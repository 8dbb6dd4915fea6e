"""`python -m train.gates.probe RUN_FOLDER`: what a Gate A model's residual stream still holds.

Two measurements on grounding questions about two-object training scenes:

- the mean norm of each layer's residual stream, at visual and at text positions, and of what each
  layer's attention and MLP add. An LLM whose MLP writes a vector of norm ~100x the embeddings into
  every position ("massive activations") leaves the tokens' own content a small, noisy part of it.
- held-out accuracy of ridge read-outs (fit on 80%, scored on 20%), at the input of a chosen layer's
  attention: the visual tokens' shape / colour / size (what a selecting head's key needs) and, at the
  positions that write a coordinate, the attributes the question names (what its query needs).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from sphinx_model.positions import rotary_positions
from sphinx_model.processor import IMAGE_TOKEN_ID

from ..demo_tokenizer import NUMBER_PIECES
from ..world.tasks import TaskWriter
from ..world.vocab import COLOUR_NAMES, SHAPES, SIZES
from .attend import attributes, visual_slots
from .pointing import (
    GateRun,
    OracleSphinx,
    collate,
    load_run,
    make_sample,
    training_scenes,
)

WORDS = (*SHAPES, *COLOUR_NAMES, *SIZES)
GROUPS = {"shape": (0, len(SHAPES)), "colour": (len(SHAPES), len(SHAPES) + len(COLOUR_NAMES)),
          "size": (len(SHAPES) + len(COLOUR_NAMES), len(WORDS))}


def _hot(words: list[str]) -> torch.Tensor:
    v = torch.zeros(len(WORDS))
    for w in words:
        v[WORDS.index(w)] = 1.0
    return v


def ridge_accuracy(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0) -> dict[str, float | None]:
    """Held-out argmax accuracy per attribute group of a ridge read-out x -> y (last 20% held out;
    rows with no word of a group do not count for it)."""
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    n = len(x) * 4 // 5
    w = torch.linalg.solve(x1[:n].T @ x1[:n] + lam * torch.eye(x1.shape[1]), x1[:n].T @ y[:n])
    pred, truth = x1[n:] @ w, y[n:]
    out: dict[str, float | None] = {}
    for name, (a, b) in GROUPS.items():
        has = truth[:, a:b].sum(1) > 0
        out[name] = (pred[has, a:b].argmax(1) == truth[has, a:b].argmax(1)).float().mean().item() if has.any() else None
    return out


@torch.no_grad()
def probe(model: OracleSphinx, proc, run: GateRun, layer: int, questions: int, seed: int = 0) -> dict:
    llm = model.model.llm
    model.eval()
    kept: dict[str, torch.Tensor] = {}
    adds: dict[tuple[str, int], torch.Tensor] = {}
    hooks = [llm.model.layers[layer].self_attn.register_forward_pre_hook(
        lambda m, a, k: kept.__setitem__("x", k["hidden_states"]), with_kwargs=True)]
    for i, block in enumerate(llm.model.layers):
        hooks.append(block.self_attn.register_forward_hook(lambda m, a, o, i=i: adds.__setitem__(("attn", i), o[0])))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: adds.__setitem__(("mlp", i), o)))
    coord_ids = torch.tensor([proc.tokenizer.convert_tokens_to_ids(p) for p in NUMBER_PIECES])
    rng = random.Random(seed)
    scenes = [s for s in training_scenes(run) if len(s.objects) == 2]
    xq, yq, xk, yk = [], [], [], []
    norms: dict[str, list[float]] = {}
    for scene in scenes[:questions]:
        asked = TaskWriter(scene, proc.config.anchor).grounding_object(rng)
        if asked is None:
            continue
        question, answer, _, phrase = asked
        sample = make_sample(scene, question, answer, proc, None, run.system)
        b = collate([sample], proc)
        embeds = model.embed(b["input_ids"], b["feats"], b["view_skip"])
        out = llm(inputs_embeds=embeds, output_hidden_states=True,
                  position_ids=rotary_positions(b["input_ids"], b["attention_mask"], run.shared_image_position))
        image = b["input_ids"][0] == IMAGE_TOKEN_ID
        for i in range(len(llm.model.layers)):
            for part, t in (("resid", out.hidden_states[i]), ("attn", adds[("attn", i)]), ("mlp", adds[("mlp", i)])):
                for where, m in (("visual", image), ("text", ~image)):
                    norms.setdefault(f"{i}/{part}/{where}", []).append(t[0][m].float().norm(dim=-1).mean().item())
        x = kept["x"][0].float()
        for t in torch.isin(b["labels"][0, 1:], coord_ids).nonzero()[:, 0]:
            xq.append(x[t])
            yq.append(_hot(phrase.split()[1:]))
        image_at = image.nonzero()[:, 0]
        for i, f in enumerate(visual_slots(sample.feats, sample.skipped)):
            held = None if f is None else attributes(f)
            if held is not None:
                xk.append(x[image_at[i]])
                yk.append(_hot(list(held)))
    for h in hooks:
        h.remove()
    return {"layer": layer, "questions": questions,
            "norms": {k: sum(v) / len(v) for k, v in norms.items()},
            "key": ridge_accuracy(torch.stack(xk), torch.stack(yk)),
            "query": ridge_accuracy(torch.stack(xq), torch.stack(yq))}


def format_report(r: dict, layers: int) -> str:
    n = r["norms"]
    lines = ["| layer | residual in (visual / text) | attention adds | MLP adds |", "|---|---|---|---|"]
    for i in range(layers):
        lines.append(f"| {i} | " + " | ".join(f"{n[f'{i}/{p}/visual']:.1f} / {n[f'{i}/{p}/text']:.1f}"
                                              for p in ("resid", "attn", "mlp")) + " |")
    fmt = lambda acc: ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in acc.items())
    lines += ["", f"read-outs at layer {r['layer']}'s attention input (held-out accuracy):",
              f"- visual tokens (key side): {fmt(r['key'])}",
              f"- coordinate-writing positions, the named attributes (query side): {fmt(r['query'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.gates.probe", description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a gate run folder (run.json and weights.safetensors)")
    ap.add_argument("--layer", type=int, default=2, help="read out at this layer's attention input")
    ap.add_argument("--questions", type=int, default=150)
    a = ap.parse_args(argv)
    try:
        run, model, proc = load_run(a.run)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    layers = model.model.llm.config.num_hidden_layers
    if not 0 <= a.layer < layers:
        print(f"--layer: the model has layers 0-{layers - 1}", file=sys.stderr)
        return 1
    print(format_report(probe(model, proc, run, a.layer, a.questions), layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
