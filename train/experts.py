"""`python -m train.experts --config train/configs/demo_experts.yaml`: pretrain the visual
experts on the synthetic world, then write the one-stage run's starting checkpoint.

SPHINX-X gets its experts pretrained (CLIP-ConvNeXt, DINOv2) and keeps them frozen; the
demo world has no such models, so this stage teaches them to see first: the experts are
built exactly as the model builds them (registry, open_clip/timm), run on the views the
model cuts, and trained with linear dense heads on the targets of `train.world.targets`
(what and where each object, word and mark is; how many of each shape and colour a view
holds). Linear heads keep the knowledge linearly readable, which is what the model's
linear projector needs. The heads are then dropped and the experts frozen.

Outputs in OUTPUT_DIR: metrics.jsonl (loss and per-head accuracy), state/ (resumable:
experts + heads + optimizer as safetensors, step and RNG as JSON), and init/ — a complete
checkpoint of ours (trained experts, BPE tokenizer trained on the dialogues, random LLM and
projector) that `train/configs/demo.yaml` starts from.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou
from tqdm import tqdm

from sphinx_model.config import SphinxConfig, get_preset
from sphinx_model.experts import build_expert
from sphinx_model.image_processing import canvas_tensor, load_image
from sphinx_model.modeling import extract_views
from sphinx_model.tiling import num_views

from .config import ConfigError, build, read_yaml, resolve_path
from .evaluate import HELDOUT_WORLDS
from .world.scene import Scene, render_scene
from .world.targets import CASES, CELL_SLOTS, LETTERS, MAX_CHARS, MAX_MARK, ViewTargets, view_targets
from .world.vocab import COLOUR_NAMES, SHAPES, SIZES, WORDS

HEADS = {"obj": 1, "shape": len(SHAPES), "colour": len(COLOUR_NAMES), "size": len(SIZES), "obj_box": 4,
         "has_word": 1, "word": len(WORDS) + 1, "word_box": 4, "mark": MAX_MARK + 1}
# v5: reading per letter (which letter at each place of the word, case apart) and marks learnt on
# marked tokens only (68% of object tokens carry no mark: a mark head over all of them learnt "none").
SPELL_HEADS = {"has_mark": 1, "chars": MAX_CHARS * (len(LETTERS) + 1), "case": len(CASES)}
# v5b: reading per cell (the letters inside each token's own cell; `read_cells`)
CELL_HEADS = {"cell_chars": CELL_SLOTS * (len(LETTERS) + 1)}
WHERE = ("obj_where", "word_where")  # boxes in the view's frame: a head of their own (added in v3),
                                      # so earlier states still load into `token`
POS_WEIGHT = 4.0  # most tokens hold nothing: presence losses weigh the rare positive tokens up
COUNTS = len(SHAPES) + len(COLOUR_NAMES)


@dataclass
class ExpertRun:
    preset: str = "sphinx-demo"            # the model whose experts are trained (architecture only)
    data: Path = Path("data/world_train")  # a `python -m train.synthetic` folder
    eval_scenes: int = 200                 # the last scenes of `data`, held out for accuracy
    output_dir: Path = Path("runs/demo_experts")
    steps: int = 1000
    batch_size: int = 16                   # scenes per step (x views per scene)
    lr: float = 2.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    log_every: int = 20
    eval_every: int = 250
    save_every: int = 250
    vocab_size: int = 1536                 # BPE tokenizer of the init checkpoint
    threads: int = 0                       # torch threads; 0 = torch's default
    workers: int = 1                       # DataLoader workers (image decoding)
    loss_weights: dict = field(default_factory=lambda: {"obj_box": 4.0, "word_box": 2.0, "counts": 0.5,
                                                         "obj_where": 8.0, "word_where": 4.0})
    init_from: Path | None = None          # an earlier run's state/ folder: its experts (and heads) start
                                           # this run, with a fresh optimizer and schedule
    world_seed: int | None = None          # render scenes on the fly from this seed instead of reading `data`;
                                           # held-out read-outs then use train.evaluate's HELDOUT_WORLDS
    imagenet_init: bool = False            # timm_cnn experts start from EfficientNet-Lite0's ImageNet weights
    spell_heads: bool = False              # the v5 heads: letters per place, case, has-mark (SPELL_HEADS)
    tokenizer_scenes: int = 2000           # with world_seed: scenes whose dialogues train the init's tokenizer
    read_cells: bool = False               # a head reads the letters inside each token's cell (CELL_HEADS)
    text_rich_share: float = 0.0           # with world_seed: this share of training scenes is drawn with 4-8
                                           # words and marks (render_scene text_rich); held-out sets never are
    freeze_blocks: int = 0                 # timm_cnn experts: the stem and the first N stages stay as they start
                                           # (ImageNet): no backward through the high-resolution layers


class SceneViews(Dataset):
    """Scene -> (canvas tensor, dense targets of every view), as the model will see it."""

    def __init__(self, root: Path, scenes: list[dict], config: SphinxConfig, token_grid: int):
        self.root, self.scenes, self.config, self.token_grid = root, scenes, config, token_grid

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ViewTargets]:
        row = self.scenes[i]
        scene = Scene.from_dict({k: v for k, v in row.items() if k != "image"})
        image = load_image(self.root / row["image"], max_pixels=self.config.max_pixels)
        pixels, _ = canvas_tensor(image, self.config.anchor, self.config.canvas_size)
        return pixels, view_targets(scene, self.config.anchor, self.config.grid, self.token_grid)


class RenderedViews(Dataset):
    """Scene `index` of world `seed` rendered on the fly -> (canvas tensor, dense targets): no world folder."""

    def __init__(self, seed: int, count: int, config: SphinxConfig, token_grid: int, renderer: str = "train",
                 text_rich_share: float = 0.0):
        self.seed, self.count, self.config, self.token_grid, self.renderer = seed, count, config, token_grid, renderer
        self.text_rich_share = text_rich_share

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ViewTargets]:
        rich = (i * 2654435761 % 1000) / 1000 < self.text_rich_share  # a fixed, well-spread choice per index
        scene, image = render_scene(self.seed, i, self.renderer, text_rich=rich)
        pixels, _ = canvas_tensor(image, self.config.anchor, self.config.canvas_size)
        return pixels, view_targets(scene, self.config.anchor, self.config.grid, self.token_grid)


def collate(items: list[tuple[torch.Tensor, ViewTargets]]) -> tuple[torch.Tensor, ViewTargets]:
    pixels = torch.stack([p for p, _ in items])
    fields = ViewTargets.__dataclass_fields__
    targets = ViewTargets(**{k: torch.cat([getattr(t, k) for _, t in items]) for k in fields})
    return pixels, targets  # targets: views of all scenes, scene-major (matches extract_views)


class DenseHeads(nn.Module):
    """Linear read-outs of one expert's tokens: per grid token, and counts from token 0."""

    def __init__(self, dim: int, spell: bool = False, cells: bool = False):
        super().__init__()
        self.token = nn.Linear(dim, sum(HEADS.values()))
        self.where = nn.Linear(dim, 4 * len(WHERE))
        self.counts = nn.Linear(dim, COUNTS)
        self.spell = nn.Linear(dim, sum(SPELL_HEADS.values())) if spell else None
        self.cells = nn.Linear(dim, sum(CELL_HEADS.values())) if cells else None

    def forward(self, feats: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = self.token(feats[:, 1:])                       # (V, G, sum heads)
        parts = dict(zip(HEADS, out.split(list(HEADS.values()), dim=-1)))
        parts.update(zip(WHERE, self.where(feats[:, 1:]).split(4, dim=-1)))
        if self.spell is not None:
            parts.update(zip(SPELL_HEADS, self.spell(feats[:, 1:]).split(list(SPELL_HEADS.values()), dim=-1)))
            parts["chars"] = parts["chars"].unflatten(-1, (MAX_CHARS, len(LETTERS) + 1))  # (V, G, P, 27)
        if self.cells is not None:
            parts["cell_chars"] = self.cells(feats[:, 1:]).unflatten(-1, (CELL_SLOTS, len(LETTERS) + 1))
        return parts, self.counts(feats[:, 0])               # (V, COUNTS)


def head_losses(pred: dict[str, torch.Tensor], counts: torch.Tensor, t: ViewTargets,
                weights: dict) -> tuple[torch.Tensor, dict[str, float]]:
    has_obj, has_word = t.obj > 0, t.word > 0
    pos = torch.tensor(POS_WEIGHT)
    zero = counts.sum() * 0
    terms = {
        "obj": F.binary_cross_entropy_with_logits(pred["obj"][..., 0], t.obj, pos_weight=pos),
        "shape": F.cross_entropy(pred["shape"].flatten(0, 1), t.shape.flatten(), ignore_index=-100),
        "colour": F.cross_entropy(pred["colour"].flatten(0, 1), t.colour.flatten(), ignore_index=-100),
        "size": F.cross_entropy(pred["size"].flatten(0, 1), t.size.flatten(), ignore_index=-100),
        "has_word": F.binary_cross_entropy_with_logits(pred["has_word"][..., 0], has_word.float(), pos_weight=pos),
        "word": F.cross_entropy(pred["word"][has_word], t.word[has_word]) if has_word.any() else zero,
        "mark": F.cross_entropy(pred["mark"][has_obj], t.mark[has_obj]) if has_obj.any() and "chars" not in pred
        else zero,
        "counts": F.smooth_l1_loss(counts, t.counts),
        "obj_box": F.l1_loss(pred["obj_box"][has_obj], t.obj_box[has_obj]) if has_obj.any() else zero,
        "word_box": F.l1_loss(pred["word_box"][has_word], t.word_box[has_word]) if has_word.any() else zero,
        "obj_where": F.l1_loss(pred["obj_where"][has_obj], t.obj_where[has_obj]) if has_obj.any() else zero,
        "word_where": F.l1_loss(pred["word_where"][has_word], t.word_where[has_word]) if has_word.any() else zero,
    }
    if "chars" in pred:
        has_mark = t.mark > 0
        terms["mark"] = F.cross_entropy(pred["mark"][has_mark], t.mark[has_mark]) if has_mark.any() else zero
        terms["has_mark"] = (F.binary_cross_entropy_with_logits(pred["has_mark"][..., 0][has_obj],
                                                                 has_mark[has_obj].float()) if has_obj.any() else zero)
        terms["chars"] = F.cross_entropy(pred["chars"][has_word].flatten(0, 1), t.chars[has_word].flatten()) \
            if has_word.any() else zero
        terms["case"] = F.cross_entropy(pred["case"][has_word], t.case[has_word]) if has_word.any() else zero
    if "cell_chars" in pred:
        held = t.cell_chars[..., 0] != -100
        terms["cell_chars"] = F.cross_entropy(pred["cell_chars"][held].flatten(0, 1), t.cell_chars[held].flatten()) \
            if held.any() else zero
    total = sum(weights.get(k, 1.0) * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def head_accuracy(pred: dict[str, torch.Tensor], counts: torch.Tensor, t: ViewTargets,
                  views_per_scene: int = 1) -> dict[str, float]:
    has_obj, has_word = t.obj > 0, t.word > 0
    acc = {"obj_f1": _f1(pred["obj"][..., 0] > 0, has_obj)}
    for k in ("shape", "colour", "size"):
        acc[k] = float((pred[k].argmax(-1)[has_obj] == getattr(t, k)[has_obj]).float().mean()) if has_obj.any() else 0.0
    acc["word_f1"] = _f1(pred["has_word"][..., 0] > 0, has_word)
    acc["word"] = float((pred["word"].argmax(-1)[has_word] == t.word[has_word]).float().mean()) if has_word.any() else 0.0
    has_mark = t.mark > 0
    acc["mark"] = float((pred["mark"].argmax(-1)[has_mark] == t.mark[has_mark]).float().mean()) if has_mark.any() else 0.0
    acc["box_l1"] = float((pred["obj_box"][has_obj] - t.obj_box[has_obj]).abs().mean()) if has_obj.any() else 0.0
    acc["where_l1"] = float((pred["obj_where"][has_obj] - t.obj_where[has_obj]).abs().mean()) if has_obj.any() else 0.0
    if views_per_scene > 1:  # the global view's frame is the canvas: a box read there is a grounding answer
        g_obj = has_obj[::views_per_scene]
        iou = box_iou(pred["obj_where"][::views_per_scene][g_obj], t.obj_where[::views_per_scene][g_obj]).diagonal()
        acc["global_iou50"] = float((iou >= 0.5).float().mean()) if g_obj.any() else 0.0
    acc["count_exact"] = float((counts.round() == t.counts).all(-1).float().mean())
    acc["box_iou50"] = _cell_box_iou50(pred["obj_box"], t, has_obj)
    if "chars" in pred:
        acc["word_exact"] = float((pred["chars"].argmax(-1)[has_word] == t.chars[has_word]).all(-1).float().mean()) \
            if has_word.any() else 0.0
        acc["case"] = float((pred["case"].argmax(-1)[has_word] == t.case[has_word]).float().mean()) \
            if has_word.any() else 0.0
        acc["has_mark_f1"] = _f1((pred["has_mark"][..., 0] > 0)[has_obj], has_mark[has_obj])
    if views_per_scene > 1:  # identity belongs on the sub-view tokens (the global view sees at half the scale)
        sub = torch.ones_like(has_mark)
        sub[::views_per_scene] = False
        acc["mark_sub"] = float((pred["mark"].argmax(-1)[has_mark & sub] == t.mark[has_mark & sub]).float().mean()) \
            if (has_mark & sub).any() else 0.0
    if "cell_chars" in pred:
        acc.update(cell_reading(pred["cell_chars"].argmax(-1), t, views_per_scene))
    return acc


def cell_reading(cells: torch.Tensor, t: ViewTargets, views_per_scene: int = 1) -> dict[str, float]:
    """Reading from the per-cell letters (V, G, CELL_SLOTS): `letter` is the share of letters read right
    in the cells that hold some; `word_read` reads each word lying wholly inside a sub-view by walking
    the cells of its row under its box, left to right, and counts the words spelt exactly."""
    held = t.cell_chars > 0
    acc = {"letter": float((cells[held] == t.cell_chars[held]).float().mean()) if held.any() else 0.0}
    g = math.isqrt(cells.shape[1])
    right = total = 0
    for v, k in (t.word > 0).nonzero().tolist():
        if views_per_scene > 1 and v % views_per_scene == 0:
            continue
        x0, _, x1, _ = t.word_where[v, k].tolist()
        if x0 < 0 or x1 > 1:
            continue  # cut by the view's edge: its letters are not all in this view
        row = k // g
        c0, c1 = max(0, int(x0 * g)), min(g - 1, int(x1 * g - 1e-6))
        read = [c for col in range(c0, c1 + 1) for c in cells[v, row * g + col].tolist() if c > 0]
        truth = [c for c in t.chars[v, k].tolist() if c > 0]
        right += read == truth
        total += 1
    acc["word_read"] = right / total if total else 0.0
    return acc


def _cell_box_iou50(rel: torch.Tensor, t: ViewTargets, has_obj: torch.Tensor) -> float:
    """Share of object tokens whose cell-relative box, placed in its cell, overlaps the truth at IoU >= 0.5
    (in the view's frame; IoU does not depend on the frame's scale)."""
    if not has_obj.any():
        return 0.0
    g = math.isqrt(rel.shape[1])
    k = torch.arange(rel.shape[1])
    origin = torch.stack([k % g, k // g, k % g, k // g], dim=-1).float()  # (G, 4) cell column/row
    boxes = (origin + rel) / g                                           # (V, G, 4) view frame
    iou = box_iou(boxes[has_obj], t.obj_where[has_obj]).diagonal()
    return float((iou >= 0.5).float().mean())


def _f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(1.0, float(pred.sum()) + float(truth.sum()))


def _read_scenes(root: Path) -> list[dict]:
    path = root / "scenes.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: write the world first with `python -m train.synthetic --out {root}`")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_run(path: Path, overrides: dict) -> ExpertRun:
    raw = read_yaml(path, "expert run config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping")
    raw.update(overrides)
    run = build(ExpertRun, raw, where=str(path))
    base = path.resolve().parent
    run.data, run.output_dir = resolve_path(base, run.data), resolve_path(base, run.output_dir)
    if run.init_from is not None:
        run.init_from = resolve_path(base, run.init_from)
        if not (run.init_from / "weights.safetensors").is_file():
            raise ConfigError(f"init_from: {run.init_from / 'weights.safetensors'} does not exist")
    if run.steps < 1 or run.batch_size < 1 or run.lr <= 0 or run.eval_scenes < 1:
        raise ConfigError("steps, batch_size and eval_scenes must be >= 1 and lr > 0")
    return run


def freeze_stem(trunk: nn.Module, blocks: int) -> None:
    """Keep a timm EfficientNet trunk's stem and first `blocks` stages as they are: no gradients, and
    their batch norms in eval mode (the expert trainer never switches modes). Most of a step's CPU
    time is the backward of these high-resolution layers."""
    stages = getattr(trunk, "blocks", None)
    if stages is None or not 0 < blocks < len(stages):
        raise ConfigError(f"freeze_blocks: the trunk has {0 if stages is None else len(stages)} stages; "
                          f"give 1..{0 if stages is None else len(stages) - 1}, got {blocks}")
    for module in (trunk.conv_stem, trunk.bn1, *stages[:blocks]):
        module.requires_grad_(False)
        module.eval()


# --- the loop ---------------------------------------------------------------------------------
class ExpertTrainer:
    def __init__(self, run: ExpertRun):
        self.run = run
        self.config = get_preset(run.preset)
        torch.manual_seed(run.seed)
        random.seed(run.seed)
        self.experts = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for ecfg in self.config.experts:
            expert = build_expert(ecfg)
            expert.requires_grad_(True)  # trained here; frozen again in the model (build_expert)
            self.experts[ecfg.key] = expert
            if run.imagenet_init and ecfg.kind == "timm_cnn":
                from .imagenet_init import load_imagenet_trunk

                load_imagenet_trunk(expert.trunk)
            if run.freeze_blocks and ecfg.kind == "timm_cnn":
                freeze_stem(expert.trunk, run.freeze_blocks)
            self.heads[ecfg.key] = DenseHeads(expert.out_dim, spell=run.spell_heads, cells=run.read_cells)
        grids = {e.grid_size for e in self.experts.values()}
        if len(grids) != 1:
            raise ConfigError(f"experts disagree on the token grid: {grids}")
        self.token_grid = grids.pop()
        params = [p for p in list(self.experts.parameters()) + list(self.heads.parameters()) if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optim = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}], lr=run.lr, betas=(0.9, 0.95))
        self.step = 0

    def lr_at(self, step: int) -> float:
        r = self.run
        if step < r.warmup_steps:
            return r.lr * (step + 1) / r.warmup_steps
        progress = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
        return r.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def forward(self, pixels: torch.Tensor, targets: ViewTargets) -> tuple[torch.Tensor, dict, dict]:
        total, logs, accs = 0.0, {}, {}
        for key, expert in self.experts.items():
            views = extract_views(pixels, expert.image_size, self.config.grid)   # (B*V, 3, s, s)
            feats = expert(views)                                                 # (B*V, T, C)
            pred, counts = self.heads[key](feats)
            loss, terms = head_losses(pred, counts, targets, self.run.loss_weights)
            total = total + loss
            logs.update({f"{key}/{k}": v for k, v in terms.items()})
            accs.update({f"{key}/acc/{k}": v for k, v in
                         head_accuracy(pred, counts, targets, num_views(self.config.grid)).items()})
        return total, logs, accs

    # --- state: safetensors + JSON only (nothing in it can execute on load) -----------------
    def save_state(self) -> None:
        from safetensors.torch import save_file

        folder = self.run.output_dir / "state"
        tmp = folder.with_name("state.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in {**_prefixed("experts.", self.experts.state_dict()),
                                                  **_prefixed("heads.", self.heads.state_dict())}.items()},
                  tmp / "weights.safetensors")
        opt = self.optim.state_dict()
        tensors, meta = {}, {"step": self.step, "param_groups": opt["param_groups"], "state": {}}
        for pid, st in opt["state"].items():
            meta["state"][str(pid)] = {k: (float(v) if v.ndim == 0 else None) for k, v in st.items()}
            for k, v in st.items():
                if v.ndim > 0:
                    tensors[f"{pid}.{k}"] = v.contiguous()
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        if folder.exists():
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        tmp.rename(folder)

    def load_state(self) -> bool:
        from safetensors.torch import load_file

        folder = self.run.output_dir / "state"
        if not (folder / "state.json").is_file():
            return False
        weights = load_file(folder / "weights.safetensors")
        self.experts.load_state_dict(_unprefixed("experts.", weights))
        self.heads.load_state_dict(_unprefixed("heads.", weights))
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "optimizer.safetensors")
        state = {}
        for pid, st in meta["state"].items():
            state[int(pid)] = {k: (torch.tensor(v) if v is not None else tensors[f"{pid}.{k}"]) for k, v in st.items()}
        self.optim.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step = int(meta["step"])
        return True

    def load_init(self, folder: Path) -> list[str]:
        """Start from another run's weights (experts exactly; heads where they match): the heads this
        run adds start fresh. Returns the names that started fresh."""
        from safetensors.torch import load_file

        weights = load_file(folder / "weights.safetensors")
        self.experts.load_state_dict(_unprefixed("experts.", weights))
        missing, unexpected = self.heads.load_state_dict(_unprefixed("heads.", weights), strict=False)
        if unexpected:
            raise ConfigError(f"init_from {folder}: heads this run does not have: {unexpected[:4]}")
        return list(missing)

    def train(self, resume: bool = False) -> None:
        run = self.run
        run.output_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.load_state():
            print(f"resumed at step {self.step}", file=sys.stderr)
        elif run.init_from is not None:
            fresh = self.load_init(run.init_from)
            print(f"started from {run.init_from}; fresh: {', '.join(fresh) or 'nothing'}", file=sys.stderr)
        if run.threads:
            torch.set_num_threads(run.threads)
        train_set, eval_sets = self.datasets()
        gen = torch.Generator().manual_seed(run.seed + self.step)  # a resumed run draws fresh batches
        loader = DataLoader(train_set, batch_size=run.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                            num_workers=run.workers, generator=gen, persistent_workers=run.workers > 0)
        metrics = open(run.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        bar = tqdm(total=run.steps, initial=self.step, desc="experts")
        t0 = time.time()
        while self.step < run.steps:
            for pixels, targets in loader:
                if self.step >= run.steps:
                    break
                for g in self.optim.param_groups:
                    g["lr"] = self.lr_at(self.step)
                loss, logs, accs = self.forward(pixels, targets)
                self.optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optim.param_groups for p in g["params"]], 2.0)
                self.optim.step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if self.step % run.log_every == 0:
                    metrics.write(json.dumps({"step": self.step, "split": "train", "loss": float(loss.detach()),
                                              "elapsed_s": round(time.time() - t0, 1), **logs, **accs}) + "\n")
                    metrics.flush()
                if self.step % run.eval_every == 0 or self.step == run.steps:
                    for split, eval_set in eval_sets.items():
                        metrics.write(json.dumps({"step": self.step, "split": split,
                                                  **self.evaluate(eval_set)}) + "\n")
                    metrics.flush()
                if self.step % run.save_every == 0 or self.step == run.steps:
                    self.save_state()
        bar.close()
        metrics.close()

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        """Training scenes and the held-out ones: rendered on the fly from `world_seed`, or a world folder's."""
        run = self.run
        if run.world_seed is not None:
            big = 10_000_000  # as many scenes as steps ask for; indices never repeat within a run
            train_set = RenderedViews(run.world_seed, big, self.config, self.token_grid,
                                      text_rich_share=run.text_rich_share)
            return train_set, {split: RenderedViews(seed, run.eval_scenes, self.config, self.token_grid, renderer)
                               for split, (_, seed, renderer) in zip(("eval", "eval_heldout"), HELDOUT_WORLDS)}
        scenes = _read_scenes(run.data)
        if len(scenes) <= run.eval_scenes:
            raise ConfigError(f"{run.data} has {len(scenes)} scenes; need more than eval_scenes={run.eval_scenes}")
        return (SceneViews(run.data, scenes[:-run.eval_scenes], self.config, self.token_grid),
                {"eval": SceneViews(run.data, scenes[-run.eval_scenes:], self.config, self.token_grid)})

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        loader = DataLoader(dataset, batch_size=self.run.batch_size, collate_fn=collate)
        sums: dict[str, float] = {}
        n = 0
        for pixels, targets in loader:
            loss, _, accs = self.forward(pixels, targets)
            for k, v in {"loss": float(loss), **accs}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        return {k: round(v / n, 4) for k, v in sums.items()}


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _unprefixed(prefix: str, sd: dict) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --- the starting checkpoint of the one-stage run ----------------------------------------------
def rendered_dialogue_texts(seed: int, scenes: int, anchor: str) -> list[str]:
    """The questions and answers of the world's dialogues about its first `scenes` scenes, and its
    text-only exchanges: the tokenizer's corpus when the run renders its world (no data.jsonl)."""
    from .world.tasks import TEXT_ONLY, dialogue

    texts = [t for q, a in TEXT_ONLY for t in (q, a)]
    for i in tqdm(range(scenes), desc="tokenizer corpus", leave=False):
        scene, _ = render_scene(seed, i)
        turns, _ = dialogue(scene, random.Random(f"tokenizer-{seed}-{i}"), anchor)
        texts += [t for q, a in turns for t in (q, a)]
    return texts


def write_init(trainer: ExpertTrainer, out: Path) -> Path:
    """Trained experts + a BPE tokenizer of the dialogues + random LLM/projector -> `out`."""
    from sphinx_model.loading import save_pretrained
    from sphinx_model.modeling import SphinxForCausalLM
    from sphinx_model.processor import SphinxProcessor

    from .demo_tokenizer import corpus_texts, single_token_numbers, train_tokenizer

    run = trainer.run
    words = [w for word in WORDS for w in (word, word.upper(), word.capitalize())]
    texts = (rendered_dialogue_texts(run.world_seed, run.tokenizer_scenes, trainer.config.anchor)
             if run.world_seed is not None else corpus_texts([run.data / "data.jsonl"]))
    tok = train_tokenizer(texts, run.vocab_size, extra_texts=[" ".join(words)] * 2)
    if single_token_numbers(tok) < 1.0:
        raise RuntimeError("the tokenizer did not make every box coordinate a single token")
    llm = dict(trainer.config.llm.config or {})
    llm["vocab_size"] = len(tok)
    config = trainer.config.replace(llm={**trainer.config.llm.__dict__, "config": llm}, tokenizer=None)
    torch.manual_seed(run.seed)
    model = SphinxForCausalLM(config)
    for key, expert in trainer.experts.items():
        getattr(model, key).load_state_dict(expert.state_dict())
    return save_pretrained(model, SphinxProcessor(config, tok), out)


# Gate B of issue 18: held-out read-outs the experts must reach (names as in head_accuracy)
GATE_B = {"shape": 0.95, "colour": 0.98, "size": 0.9, "word_read": 0.9, "mark_sub": 0.95, "box_iou50": 0.95}
# runs from before the per-cell reading and the sub-view mark read-out: their nearest read-outs
GATE_B_EARLIER = {"word_read": "word_exact", "mark_sub": "mark"}


def gate_b_table(metrics: Path) -> str:
    """The last held-out read-outs of an expert run's metrics.jsonl against Gate B's targets: per
    expert, and the better of the experts (the projector reads them side by side)."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    last = {}
    for r in rows:
        if r.get("split") != "train":
            last[r["split"]] = r
    if not last:
        raise ConfigError(f"{metrics}: no held-out evaluation yet")
    experts = sorted({k.split("/")[0] for r in last.values() for k in r if "/acc/" in k})
    head = ["read-out", "target"] + [f"{e} ({split})" for split in last for e in experts] + ["met (both sets)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, target in GATE_B.items():
        if not any(f"{e}/acc/{name}" in r for r in last.values() for e in experts):
            name = GATE_B_EARLIER.get(name, name)
        values = [last[split].get(f"{e}/acc/{name}") for split in last for e in experts]
        best = [max(last[split].get(f"{e}/acc/{name}", 0.0) for e in experts) for split in last]
        cells = ["—" if v is None else f"{v:.2f}" for v in values]
        lines.append(f"| {name} | >= {target:g} | " + " | ".join(cells) + f" | {'yes' if min(best) >= target else 'no'} |")
    step = max(r["step"] for r in last.values())
    return f"Step {step}, held-out sets: {', '.join(last)}.\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.experts", description="Pretrain the visual experts "
                                 "on the synthetic world and write the one-stage run's starting checkpoint.")
    ap.add_argument("--table", type=Path, default=None, metavar="RUN_DIR",
                    help="print a run's last held-out read-outs against Gate B's targets and exit")
    ap.add_argument("--config", type=Path, required=False)
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/state")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    args = ap.parse_args(argv)
    if args.table is not None:
        try:
            print(gate_b_table(args.table / "metrics.jsonl"))
        except (ConfigError, OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.config is None:
        ap.error("--config is required (or --table RUN_DIR)")
    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key] = json.loads(value) if value[:1] in "[{0123456789-" or value in ("true", "false") else value
        run = load_run(args.config, overrides)
        trainer = ExpertTrainer(run)
        trainer.train(resume=args.resume)
        out = write_init(trainer, run.output_dir / "init")
        print(f"wrote {out}", file=sys.stderr)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
