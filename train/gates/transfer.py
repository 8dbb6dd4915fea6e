"""`python -m train.gates.transfer --gate GATE_A_RUN --experts EXPERT_STATE`: Gate C's first step.

Gate A taught the demo-sized LLM to point on oracle tokens (perfect per-token attributes); Gate B
teaches the experts to see. This carries the first onto the second without training the LLM: a new
projector, and the box read-out of `box_positions`, are fitted so that the real experts' tokens of a
scene land where the oracle tokens of the same scene land after Gate A's projector and read-out: a
per-token regression on the frozen experts' outputs, minutes on a CPU, where teaching an LLM to point
took hours. Tokens that hold an object or a word weigh more than empty ones (`held_weight`): they are
what the answers are about, and they are a tenth of the tokens.

The LLM, the per-slot canvas table and the image start/end/skip embeddings are Gate A's, the experts
Gate B's; the result is a complete checkpoint (`save_pretrained`, loadable like any other) in OUT/model,
scored from pixels on the gate's own held-out questions (grounding, detection; no system prompt, as
Gate A trained). OUT/result.json holds the fit and the scores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from sphinx_model.config import ProjectorConfig
from sphinx_model.modeling import SphinxForCausalLM
from sphinx_model.processor import SphinxProcessor

from ..feature_files import FeatureCache
from ..world.scene import Scene, render_scene
from .oracle import CASE, CELL_LETTERS, HAS_WORD, OBJ, scene_features
from .pointing import OracleSphinx, eval_questions, evaluate, load_run


@dataclass
class TransferRun:
    gate: Path                       # a Gate A run folder (run.json + weights[.bf16].safetensors)
    experts: Path                    # an expert run's state/ folder (python -m train.experts)
    out: Path = Path("runs/gate_c/transfer")
    scenes: int = 1500               # training scenes of the world (seed 0, training renderer)
    fit_eval_scenes: int = 150       # scenes of the held-out world the fit itself is measured on
    eval_scenes: int = 100           # per held-out set, for the pointing scores
    epochs: int = 6
    lr: float = 3e-3
    batch_tokens: int = 4096
    held_weight: float = 10.0        # an object's or word's token weighs this much more than an empty one
    threads: int = 1
    seed: int = 0
    projector_hidden: int = 0        # > 0: an mlp_ln projector of this hidden width (0: linear_ln, as released)
    readout_hidden: int = 0          # > 0: the box read-out through a GELU layer of this width (0: linear)
    feature_cache: Path | None = None  # these experts' outputs for the training world's images
                                       # (python -m train.feature_cache): read, not computed again


class ExpertFed(torch.nn.Module):
    """The real model behind the gate's `embed`: its visual tokens come from the experts' features."""

    def __init__(self, model: SphinxForCausalLM):
        super().__init__()
        self.model = model

    def embed(self, input_ids: torch.Tensor, feats: torch.Tensor, view_skip: torch.Tensor) -> torch.Tensor:
        return self.model.fill_image_tokens(input_ids, self.model.layout_images(self.model.visual_proj(feats),
                                                                                view_skip, feats))


def real_model(oracle: OracleSphinx, experts_state: Path, projector_hidden: int = 0,
               readout_hidden: int = 0) -> SphinxForCausalLM:
    """Gate A's model with the experts put back: its LLM and canvas tables, the expert run's experts,
    a fresh projector and box read-out (their input is now the experts' fused channels; with a hidden
    width, each is a two-layer MLP: the oracle's one-hot channels are not a linear function of them)."""
    projector = ProjectorConfig("mlp_ln", oracle.model.config.projector.norm_eps, projector_hidden) \
        if projector_hidden else ProjectorConfig(norm_eps=oracle.model.config.projector.norm_eps)
    model = SphinxForCausalLM(oracle.model.config.replace(projector=projector, box_readout_hidden=readout_hidden))
    not_carried = ("visual_proj.", "canvas_pos.readout.", *(f"{e}." for e in model.expert_keys))
    carried = {k: v for k, v in oracle.model.state_dict().items() if not k.startswith(not_carried)}
    missing, unexpected = model.load_state_dict(carried, strict=False)
    fresh = {k for k in missing if not k.startswith(not_carried)}
    if unexpected or fresh:
        raise ValueError(f"Gate A's model does not fit: unexpected {unexpected[:3]}, missing {sorted(fresh)[:3]}")
    weights = load_file(Path(experts_state) / "weights.safetensors")
    for key in model.expert_keys:
        own = {k[len(f"experts.{key}."):]: v for k, v in weights.items() if k.startswith(f"experts.{key}.")}
        if not own:
            raise ValueError(f"{experts_state}: no weights for the expert {key!r}")
        getattr(model, key).load_state_dict(own)
    model.eval()
    return model


def scene_image(scene: Scene):
    """A pool scene's picture, drawn again from its id (`renderer-seed-index`)."""
    renderer, seed, index = scene.id.split("-")[:3]
    return render_scene(int(seed), int(index), renderer)[1]


@torch.no_grad()
def real_features(model: SphinxForCausalLM, proc: SphinxProcessor, image) -> tuple[torch.Tensor, list[bool]]:
    """One picture -> (every view's fused expert tokens (V, T, C), zeros where a view is skipped; skipped)."""
    processed = proc.process_image(image)
    skip = torch.tensor([processed.skipped])
    _, fused = model.expert_features(processed.pixels[None], skip)
    out = torch.zeros(len(processed.skipped), *fused.shape[1:])
    out[~skip[0]] = fused.float()
    return out, processed.skipped


def encoded(model: SphinxForCausalLM, proc: SphinxProcessor,
            scenes: Iterable[tuple[Scene, object]]) -> Iterator[tuple[Scene, torch.Tensor, list[bool]]]:
    """(scene, picture) -> (scene, its kept views' expert tokens (K, T, C), which views are skipped),
    computed now."""
    for scene, image in scenes:
        feats, skipped = real_features(model, proc, image)
        yield scene, feats[[not s for s in skipped]], skipped


def cached(cache: FeatureCache, seed: int, count: int) -> Iterator[tuple[Scene, torch.Tensor, list[bool]]]:
    """The first `count` scenes of the training world `seed` whose pictures the cache holds (as
    `python -m train.synthetic` names them), with their cached expert tokens (K, T, C)."""
    for index in range(count):
        entry = cache.load(cache.root / "images" / f"train-{seed}-{index:06d}.png")
        if entry is not None:
            yield render_scene(seed, index)[0], entry.features, entry.skipped


@torch.no_grad()
def token_pairs(oracle: OracleSphinx, proc: SphinxProcessor, scenes: Iterable[tuple[Scene, torch.Tensor, list[bool]]],
                desc: str, total: int | None = None, text: str = "word") -> dict[str, torch.Tensor]:
    """Per kept token of the scenes: the experts' features X (bf16), where Gate A's projector puts the
    oracle token Y (text in the gate's form, `oracle.TEXT_FORMS`) and what its box read-out reads R,
    and whether the token holds something (an object, a word, a letter)."""
    cfg = proc.config
    g = int(round((cfg.tokens_per_view - 1) ** 0.5))
    xs, ys, rs, held = [], [], [], []
    for scene, feats, skipped in tqdm(scenes, desc=desc, total=total, leave=False):
        o = scene_features(scene, cfg.anchor, cfg.grid, g, text)[[not s for s in skipped]]   # (K, T, F)
        if o.shape[:2] != feats.shape[:2]:
            raise ValueError(f"{scene.id}: the features hold {tuple(feats.shape[:2])} views x tokens, "
                             f"the scene's truth {tuple(o.shape[:2])}")
        xs.append(feats.flatten(0, 1).bfloat16())
        ys.append(oracle.model.visual_proj(o).flatten(0, 1))
        rs.append(oracle.model.canvas_pos.readout(o).flatten(0, 1))
        held.append(((o[..., OBJ] > 0) | (o[..., HAS_WORD] > 0) | (o[..., CELL_LETTERS:CASE].sum(-1) > 0)).flatten())
    return {"x": torch.cat(xs), "y": torch.cat(ys), "r": torch.cat(rs), "held": torch.cat(held)}


def fit_losses(model: SphinxForCausalLM, pairs: dict[str, torch.Tensor], idx: torch.Tensor,
               held_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = pairs["x"][idx].float()
    w = 1.0 + (held_weight - 1.0) * pairs["held"][idx].float()
    proj = ((model.visual_proj(x) - pairs["y"][idx]) ** 2).mean(-1)
    box = ((model.canvas_pos.readout(x) - pairs["r"][idx]) ** 2).mean(-1)
    return (w * proj).sum() / w.sum(), (w * box).sum() / w.sum()


@torch.no_grad()
def fit_quality(model: SphinxForCausalLM, pairs: dict[str, torch.Tensor]) -> dict[str, float]:
    """On the tokens that hold something: the projected tokens' cosine to their oracle targets, and the
    read-out boxes' mean edge error in cell units (a cell is 1/8 of a view)."""
    x, held = pairs["x"][pairs["held"]].float(), pairs["held"]
    cos = F.cosine_similarity(model.visual_proj(x), pairs["y"][held], dim=-1)
    edge = (model.canvas_pos.readout(x) - pairs["r"][held]).abs().mean()
    return {"held_tokens": int(held.sum()), "cosine": round(float(cos.mean()), 4),
            "cosine_p10": round(float(cos.quantile(0.1)), 4), "box_edge_cells": round(float(edge), 4)}


def fit(model: SphinxForCausalLM, pairs: dict[str, torch.Tensor], run: TransferRun) -> list[dict]:
    params = [*model.visual_proj.parameters(), *model.canvas_pos.readout.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    n = pairs["x"].shape[0]
    steps = run.epochs * ((n + run.batch_tokens - 1) // run.batch_tokens)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=run.lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(run.seed)
    log = []
    bar = tqdm(total=steps, desc="fit projector")
    for epoch in range(run.epochs):
        for idx in torch.randperm(n, generator=gen).split(run.batch_tokens):
            proj, box = fit_losses(model, pairs, idx, run.held_weight)
            opt.zero_grad(set_to_none=True)
            (proj + box).backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(proj=f"{proj.item():.4f}", box=f"{box.item():.4f}")
        log.append({"epoch": epoch + 1, "proj": round(proj.item(), 5), "box": round(box.item(), 5)})
    bar.close()
    model.requires_grad_(False)
    return log


def transfer(run: TransferRun) -> dict:
    from sphinx_model.loading import save_pretrained

    torch.manual_seed(run.seed)
    torch.set_num_threads(run.threads)
    run.out.mkdir(parents=True, exist_ok=True)
    gate_run, oracle, proc = load_run(run.gate)
    oracle.eval()
    model = real_model(oracle, run.experts, run.projector_hidden, run.readout_hidden)
    started = time.time()
    if run.feature_cache is not None:
        cache = FeatureCache(run.feature_cache)
        cache.check(model)               # the cache must hold what these experts make of the pictures
        training = cached(cache, 0, run.scenes)
    else:                                # scenes are drawn as they are encoded: no pictures held at once
        training = encoded(model, proc, (render_scene(0, i) for i in range(run.scenes)))
    text = gate_run.text_features
    pairs = token_pairs(oracle, proc, training, "training tokens", run.scenes, text)
    held_out = token_pairs(oracle, proc, encoded(model, proc, (render_scene(1002, i, "heldout")
                                                               for i in range(run.fit_eval_scenes))),
                           "held-out tokens", run.fit_eval_scenes, text)
    features_min = (time.time() - started) / 60
    log = fit(model, pairs, run)
    quality = {"train": fit_quality(model, pairs), "heldout": fit_quality(model, held_out)}
    print(json.dumps(quality), file=sys.stderr)
    folder = save_pretrained(model, proc, run.out / "model")
    gate_run.eval_scenes = run.eval_scenes
    cache: dict[str, torch.Tensor] = {}

    def features(scene: Scene) -> torch.Tensor:
        if scene.id not in cache:
            cache[scene.id] = real_features(model, proc, scene_image(scene))[0]
        return cache[scene.id]

    scores = evaluate(ExpertFed(model), proc, None, eval_questions(gate_run), system=gate_run.system,
                      shared_image_position=gate_run.shared_image_position, features=features)
    result = {"run": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()},
              "features_minutes": round(features_min, 2), "total_minutes": round((time.time() - started) / 60, 2),
              "tokens": int(pairs["x"].shape[0]), "fit": log, "quality": quality, "model": str(folder),
              "scores": scores}
    (run.out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.gates.transfer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gate", type=Path, required=True, help="a Gate A run folder (run.json + weights)")
    ap.add_argument("--experts", type=Path, required=True, help="an expert run's state/ folder")
    ap.add_argument("--out", type=Path, default=TransferRun.out)
    ap.add_argument("--feature-cache", type=Path, default=None,
                    help="these experts' cached outputs for the training world (python -m train.feature_cache)")
    for name in ("scenes", "fit_eval_scenes", "eval_scenes", "epochs", "batch_tokens", "threads", "seed",
                 "projector_hidden", "readout_hidden"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TransferRun, name))
    for name in ("lr", "held_weight"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(TransferRun, name))
    a = ap.parse_args(argv)
    try:
        result = transfer(TransferRun(**vars(a)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, table in result["scores"].items():
        print(f"{name}: grounding {table['grounding']:.2f}, detection F1 {table['detection']:.2f} "
              f"({table['questions']} questions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
