"""`python -m train.gates.pointing`: Gate A of the demo recipe: can the LLM point?

The demo-sized LLM is trained on grounding and detection dialogues whose visual tokens are
*oracle* features (`train.gates.oracle`: perfect per-token attributes and cell-relative box
edges, no canvas position), laid out exactly as the model lays out real expert tokens (views,
start/end, skip tokens). Mechanisms that give the tokens their place on the canvas are compared
on the same data, steps and seed:

  none              sequence order only (the shipped recipe)
  embedding         `canvas_positions`: a learned per-slot embedding, sin-cos of the slot's canvas box
  embedding+coords  the same, and the coordinate tokens' input and output rows start from sin-cos of
                    their value (`sphinx_model.canvas_positions.init_coordinate_embeddings`)
  features          the slot's canvas box appended to each token's features, before the projector
  box               `box_positions` too: the sin-cos code of the box a linear read-out of the token's
                    features places in its cell (read-out set to a perfect expert's box head)
  box+coords        the same, and the coordinate rows as in embedding+coords

Held-out scenes (another seed of the training renderer, and the held-out renderer) are scored
with `train.evaluate`'s own metrics (grounding acc@0.5, detection F1@0.5), greedy.
Scenes come from a cached pool (`scene_pool`: their truth, never their pixels), so a step pays
for the LLM only. The recipe's other knobs: where the LLM starts (`--init-llm`, `--init-weights`
for a curriculum's next step), the projector's start (`--word-projector`), the visual tokens'
scale (`--visual-norm`), the loss's weighting (`--loss-per-answer`), rotary positions
(`--shared-image-position`), the task mix (`--detection-share`, `--max-objects`).
Writes OUT/NAME/run.json, metrics.jsonl (with the teacher-forced coordinate accuracy),
weights.safetensors and result.json; `--table` prints the comparison.
"""
from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from sphinx_model.canvas_positions import init_coordinate_embeddings
from sphinx_model.config import ProjectorConfig, SphinxConfig, get_preset
from sphinx_model.conversation import Conversation, Message
from sphinx_model.modeling import SphinxForCausalLM, _projector
from sphinx_model.positions import rotary_positions
from sphinx_model.processor import IMAGE_TOKEN_ID, ProcessedImage, SphinxProcessor
from sphinx_model.tiling import canvas_geometry, skipped_views, token_cells
from sphinx_model.tokenizer import load_tokenizer

from ..demo_tokenizer import NUMBER_PIECES
from ..evaluate import HELDOUT_WORLDS, METRICS, Question, scene_questions, score, summarise
from ..losses import answer_mean_loss
from ..world.scene import Scene, WorldObject
from ..world.tasks import TEXT_ONLY, TaskWriter
from ..world.vocab import COLOUR_NAMES, PLURALS, SHAPES, SIZES, WORDS
from .attend import (
    BoxTarget,
    Supervision,
    named_words,
    object_slots,
    phrase_positions,
    visual_slots,
)
from .oracle import (
    COLOUR,
    FEATURES,
    TEXT_FORMS,
    SHAPE,
    SIZE,
    WORD,
    perfect_box_readout,
    scene_features,
)
from .scene_pool import scene_pool

MECHANISMS = ("none", "embedding", "embedding+coords", "features", "box", "box+coords")
# the world's tasks whose answers an oracle token can give and a real expert's token can too (reading is left
# out: the oracle names a word, a real expert reads its letters per cell)
OTHER_TASKS = ("count_shape", "count_colour", "colour_of", "shape_of", "som", "region", "caption")
READING_TASKS = ("ocr", "spotting")   # asked only when named (--other-tasks); with --text-features cells they are
                                      # read from per-cell letters, as a real expert's tokens give them


@dataclass
class GateRun:
    mechanism: str = "embedding+coords"
    name: str | None = None            # run folder under `out` (default: the mechanism)
    out: Path = Path("runs/gate_a")
    tokenizer: str = "assets/demo"
    canvas_size: int = 512
    token_grid: int = 8                # tokens per view side (the expert map)
    minutes: float = 20.0              # wall-clock budget of training (evaluation not counted)
    max_steps: int = 100_000
    batch_size: int = 16
    lr: float = 1.5e-3
    warmup_steps: int = 30
    detection_share: float = 0.5       # the rest is grounding
    other_share: float = 0.0           # > 0: this share of the samples asks one of the world's other tasks
                                       # (OTHER_TASKS: counts, attributes, marks, regions, captions), so the LLM
                                       # keeps every answer format while it learns to point
    max_objects: int = 0               # > 0: only scenes with at most this many objects (a curriculum's first step)
    eval_scenes: int = 100             # per held-out set
    eval_metrics: tuple[str, ...] = ("grounding", "detection")  # `train.evaluate`'s metrics the run is scored on
    eval_every_minutes: float = 0.0    # 0: evaluate only at the end
    save_every_minutes: float = 0.0    # > 0: weights.safetensors rewritten this often (a killed run continues with --init-weights)
    seed: int = 0
    threads: int = 2
    device: str = "cpu"                # "cuda" on a GPU machine: the same run, minutes instead of hours
    bf16: bool = True                  # autocast: this CPU multiplies bf16 about 3x faster than fp32
    system: str | None = None          # the system prompt (None: the template's own, ~45 tokens)
    init_llm: Path | None = None       # a demo checkpoint folder whose LLM weights start the run
    init_weights: Path | None = None   # an earlier gate run's weights.safetensors (a curriculum's last step)
    shared_image_position: bool = False  # every visual token of an image at one rotary position (`position_ids`)
    loss_per_answer: bool = False      # average the loss per answer, not per token (`answer_mean_loss`)
    word_projector: bool = False       # projector rows start at the text embeddings of what each channel names
    visual_norm: float = 0.0           # > 0: visual tokens and their position codes start at this norm
    pool: Path = Path("runs/scene_pool")  # cached scene truth (`scene_pool`)
    pool_scenes: int = 40_000          # training scenes drawn from (one-object scenes are ~4% of them)
    attend_weight: float = 0.0         # > 0: attention supervision (`attend`) of one head, this weight
    attend_layer: int = 2
    attend_head: int = 0
    gather_weight: float = 0.0         # > 0: the first hop supervised too (`attend.phrase_loss`), this weight
    gather_layer: int = 1
    gather_head: int = 1
    query_weight: float = 0.0          # > 0: the attend layer's input at coordinates must name the question's words (`attend.named_loss`)
    name_weight: float = 0.0           # > 0: a head looks at the objects a detection answer names next (`attend.naming_loss`)
    name_layer: int = 3
    name_head: int = 1
    text_features: str = "word"        # the oracle's text (`oracle.TEXT_FORMS`): "cells" = per-cell letters, as experts read
    text_only_share: float = 0.0       # > 0: this share of the samples is a text-only exchange (`world.tasks.TEXT_ONLY`),
                                       # so the LLM still chats without an image
    token_noise: float = 0.0           # > 0: training adds Gaussian noise of this size relative to each visual token's norm
                                       # (0.33 ~ cosine 0.95, the transfer's fit), so decisions hold on imperfect tokens
    look_weight: float = 0.0           # > 0: the name head looks, while a short answer is written, at what it is read from
    other_tasks: tuple[str, ...] = OTHER_TASKS  # which of them `other_share` asks (uniformly)


class OracleSphinx(nn.Module):
    """The demo model with its experts replaced by oracle features (the projector sees FEATURES)."""

    def __init__(self, config: SphinxConfig, extra: int):
        super().__init__()
        self.model = SphinxForCausalLM(config)
        d = self.model.llm.config.hidden_size
        # linear on the oracle's channels (`align_projector` starts its rows at word embeddings)
        self.model.visual_proj = _projector(FEATURES + extra, d, ProjectorConfig(norm_eps=config.projector.norm_eps))
        for key in self.model.expert_keys:  # never run: oracle features stand in for them
            getattr(self.model, key).requires_grad_(False)

    def embed(self, input_ids: torch.Tensor, feats: torch.Tensor, view_skip: torch.Tensor) -> torch.Tensor:
        tokens = self.model.visual_proj(feats)                            # (K, T, F) -> (K, T, d)
        return self.model.fill_image_tokens(input_ids, self.model.layout_images(tokens, view_skip, feats))


def build(run: GateRun) -> tuple[OracleSphinx, SphinxProcessor, torch.Tensor | None]:
    tok = load_tokenizer(run.tokenizer)
    base = get_preset("sphinx-demo")
    llm = dict(base.llm.config, vocab_size=len(tok), max_position_embeddings=1024)
    experts = [dict(e) for e in base.to_dict()["experts"]]
    experts[0]["image_size"] = run.token_grid * 32                        # ConvNeXt: stride 32
    experts[1]["image_size"] = run.token_grid * 16                        # ViT: patch 16
    experts[1]["options"] = dict(experts[1]["options"], img_size=run.token_grid * 16)
    config = base.replace(llm=dict(base.to_dict()["llm"], config=llm), experts=experts,
                          canvas_size=run.canvas_size, tokens_per_view=1 + run.token_grid ** 2,
                          canvas_positions=run.mechanism.startswith(("embedding", "box")),
                          box_positions=run.mechanism.startswith("box"))
    cells = None
    if run.mechanism == "features":
        cells = torch.tensor(token_cells(config.grid, config.tokens_per_view), dtype=torch.float32)
    model = OracleSphinx(config, extra=4 if cells is not None else 0)
    if config.box_positions:  # the read-out reads the oracle's channels, not the experts'
        model.model.canvas_pos.readout = nn.Linear(FEATURES, 4)
        perfect_box_readout(model.model.canvas_pos.readout)
    if run.init_llm is not None:
        load_llm_weights(model.model.llm, run.init_llm)
    if run.init_weights is not None:
        load_gate_weights(model, run.init_weights)
    elif run.mechanism.endswith("+coords"):
        ids = [tok.convert_tokens_to_ids(p) for p in NUMBER_PIECES]
        values = [float(p) for p in NUMBER_PIECES]
        init_coordinate_embeddings(model.model.llm.get_input_embeddings().weight, ids, values)
        init_coordinate_embeddings(model.model.llm.get_output_embeddings().weight, ids, values)
    if run.word_projector:           # after an earlier run's weights too: a curriculum step may re-align it
        align_projector(model.model.visual_proj[0], model.model.llm.get_input_embeddings().weight, tok)
    if run.visual_norm > 0:
        scale_visual_tokens(model.model, run.visual_norm)
    return model, SphinxProcessor(config, tok), cells


def load_llm_weights(llm: nn.Module, folder: Path) -> None:
    """The `llm.*` tensors of a demo checkpoint (same LLM shape and tokenizer) into `llm`."""
    state = load_file(Path(folder) / "model.safetensors")
    own = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    missing, unexpected = llm.load_state_dict(own, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise ValueError(f"{folder}: its LLM does not fit the gate's (missing {missing[:3]}, unexpected {unexpected[:3]})")


def align_projector(linear: nn.Linear, embeddings: torch.Tensor, tok) -> None:
    """Each one-hot channel of the oracle (shape, colour, size, word) maps to the LLM's embedding of the
    word it names, so a token's projected vector reads, in the LLM's own terms, e.g. "small red ellipse";
    the other channels keep a small random start. (A real expert's linear read-out heads compose with the
    same embeddings to give this start.)"""
    names = [(first + i, n) for first, group in ((SHAPE, SHAPES), (COLOUR, COLOUR_NAMES), (SIZE, SIZES), (WORD, WORDS))
             for i, n in enumerate(group)]
    with torch.no_grad():
        linear.weight.mul_(0.1)
        linear.bias.zero_()
        for channel, word in names:
            ids = tok.encode(" " + word, add_special_tokens=False)
            linear.weight[:, channel] = embeddings[ids].sum(0).to(linear.weight.dtype)


def scale_visual_tokens(model: SphinxForCausalLM, norm: float) -> None:
    """Start the projector's LayerNorm, the per-slot table and the box code at `norm` (the text
    embeddings' is ~0.5-0.8 in the demo LLM; a LayerNorm'd token's is sqrt(d) = 16)."""
    with torch.no_grad():
        d = model.visual_proj[1].weight.shape[0]
        model.visual_proj[1].weight.fill_(norm / d ** 0.5)
        if model.canvas_pos is not None:
            pos = model.canvas_pos
            pos.table.mul_(norm / pos.table.norm(dim=-1).mean())
            if pos.box_scale is not None:
                pos.box_scale.fill_(norm / (d / 2) ** 0.5)


def load_gate_weights(model: OracleSphinx, path: Path) -> None:
    """An earlier gate run's tensors, where their shapes fit (a run on another token grid keeps
    its own freshly initialised per-slot table; the LLM, projector and box read-out carry over)."""
    state = load_file(Path(path))
    own = model.state_dict()
    for k, v in list(state.items()):      # a run from before the oracle's "cells" channels: their columns start at 0
        if k in own and v.dim() == 2 and own[k].shape[0] == v.shape[0] and own[k].shape[1] > v.shape[1] \
                and k.endswith(("visual_proj.0.weight", "canvas_pos.readout.weight")):
            state[k] = torch.cat([v, v.new_zeros(v.shape[0], own[k].shape[1] - v.shape[1])], dim=1)
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("model.llm.") for k in fits):
        raise ValueError(f"{path}: no LLM weights of this gate's shape in it")
    model.load_state_dict(fits, strict=False)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    feats: torch.Tensor      # (kept views, T, F)
    skipped: list[bool]
    targets: list[BoxTarget] = field(default_factory=list)  # per box of the answer: its object, where it is named
    looks: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (answer-writing positions, slots read)
    asks: list[tuple[list[int], list[int]]] = field(default_factory=list)   # (answer-writing positions, asking words)


def make_sample(scene: Scene, question: str, answer: str | None, proc: SphinxProcessor,
                cells: torch.Tensor | None, system: str | None = None,
                features: Callable[[Scene], torch.Tensor] | None = None, text: str = "word") -> Sample:
    """`features`: the scene's visual tokens (every view) from elsewhere than its truth, e.g. real experts;
    `text`: the oracle's text form (`oracle.TEXT_FORMS`)."""
    cfg = proc.config
    canvas = canvas_geometry(scene.width, scene.height, cfg.anchor)
    skipped = skipped_views(canvas, cfg.grid, cfg.skip_tokens)
    feats = features(scene) if features is not None else \
        scene_features(scene, cfg.anchor, cfg.grid, int(round((cfg.tokens_per_view - 1) ** 0.5)), text)
    if cells is not None:
        feats = torch.cat([feats, cells.view(feats.shape[0], feats.shape[1], 4)], dim=-1)
    feats = feats[[not s for s in skipped]]
    msgs = [Message.user(question, image=True)] + ([Message.assistant(answer)] if answer is not None else [])
    if system is not None:
        msgs.insert(0, Message.system(system))
    image = ProcessedImage(torch.empty(0), canvas, skipped)
    enc = proc.encode(Conversation(msgs), [image], add_generation_prompt=answer is None)
    return Sample(enc.input_ids, enc.labels, feats, skipped)


def text_sample(question: str, answer: str, proc: SphinxProcessor, system: str | None = None) -> Sample:
    """An exchange without an image (no visual tokens, no views)."""
    msgs = [Message.user(question), Message.assistant(answer)]
    if system is not None:
        msgs.insert(0, Message.system(system))
    enc = proc.encode(Conversation(msgs), [], add_generation_prompt=False)
    return Sample(enc.input_ids, enc.labels, torch.zeros(0, proc.config.tokens_per_view, FEATURES), [])


def training_sample(rng: random.Random, scenes: list[Scene], run: GateRun, proc: SphinxProcessor,
                    cells: torch.Tensor | None) -> Sample:
    """A grounding or detection dialogue about a scene drawn from the (already filtered) pool, with
    the objects its boxes are about (for `attend`); or one of the other tasks, or a text-only exchange."""
    if run.text_only_share and rng.random() < run.text_only_share:
        return text_sample(*rng.choice(TEXT_ONLY), proc, run.system)
    while True:
        scene = rng.choice(scenes)
        writer = TaskWriter(scene, proc.config.anchor)
        if run.other_share and rng.random() < run.other_share:
            task = rng.choice(run.other_tasks)
            qa = writer.task_table()[task](rng)
            if qa is not None:
                sample = make_sample(scene, qa[0], qa[1], proc, cells, run.system, text=run.text_features)
                if run.look_weight:
                    sample.looks = answer_looks(task, qa[0], scene, sample)
                    sample.asks = asking_words(sample, proc)
                return sample
            continue
        if rng.random() < run.detection_share:
            qa = writer.detection(rng)
            # each box is named by its group's "<p>name</p>" in the answer (the name's first word follows ">")
            named = [(name, o) for name, group in writer.detection_groups().items() for o in group]
        else:
            qa = writer.grounding_object(rng)                       # "the brown triangle" -> " brown triangle"
            named = [(" " + qa[3].removeprefix("the ").strip(), qa[2])] if qa is not None else []
        if qa is not None:
            sample = make_sample(scene, qa[0], qa[1], proc, cells, run.system, text=run.text_features)
            if run.attend_weight or run.gather_weight or run.query_weight or run.name_weight:  # only supervision reads them
                sample.targets = box_targets(sample, named, proc)
            return sample


def box_targets(sample: Sample, named: list[tuple[str, WorldObject]], proc: SphinxProcessor) -> list[BoxTarget]:
    """Per box of the answer (in order): its object's visual slots, and the positions and attribute
    words of the name that names it (searched from the last one found, so each detection group's
    name is found in turn after the question)."""
    slots = visual_slots(sample.feats, sample.skipped)
    answer = next((i for i, label in enumerate(sample.labels) if label != -100), 0)
    targets, after, last = [], 0, None
    for name, obj in named:
        if name != last:                                             # a detection group's boxes share its name
            ids = proc.tokenizer.encode(name, add_special_tokens=False)
            phrase = phrase_positions(sample.input_ids, ids, after if name.startswith(" ") else max(after, answer))
            after, last = (phrase[-1] + 1 if phrase else after), name
        targets.append(BoxTarget(object_slots(slots, obj), phrase, named_words(name)))
    return targets


GLOBAL_POOLED_SLOT = 1     # layout: the global view first (never skipped), its start token, then its pooled token


def answer_writes(sample: Sample) -> list[int]:
    """The positions that write a short answer: each answer token's predecessor, the end token left out
    (empty for an answer of one token, i.e. the end token alone)."""
    answer = [i for i, label in enumerate(sample.labels) if label != -100]
    return [i - 1 for i in answer[:-1]]


@lru_cache(maxsize=4)
def asking_ids(tok) -> tuple[list[int], ...]:
    """The token ids of every word that can say what a short answer is about (shapes, plurals, colours,
    mark numbers), encoded once per tokenizer rather than once per sample."""
    names = {*SHAPES, *(PLURALS[s] for s in SHAPES), *COLOUR_NAMES, *(str(k) for k in range(1, 10))}
    return tuple(tok.encode(" " + name, add_special_tokens=False) for name in sorted(names))


def answer_looks(task: str, question: str, scene: Scene, sample: Sample) -> list[tuple[list[int], list[int]]]:
    """Where a short answer is read from, for `attend.look_loss`: a count from the global view's pooled
    token (it holds the scene's counts), an attribute from the one object the question names (by its
    shape or colour), a marked object's name from the object with that mark. Every position that writes
    the answer (not its end token) looks there. Empty for the tasks that read no one place."""
    words = set(re.findall(r"[a-z]+|\d+", question.lower()))
    if task in ("count_shape", "count_colour"):
        slots = [GLOBAL_POOLED_SLOT]
    else:
        if task == "colour_of":
            objs = [o for o in scene.objects if o.shape in words]
        elif task == "shape_of":
            objs = [o for o in scene.objects if o.colour in words]
        elif task == "som":
            objs = [o for o in scene.objects if o.mark is not None and str(o.mark) in words]
        else:
            return []
        if len(objs) != 1:
            return []
        slots = object_slots(visual_slots(sample.feats, sample.skipped), objs[0])
    writes = answer_writes(sample)
    return [(writes, slots)] if writes and slots else []


def asking_words(sample: Sample, proc: SphinxProcessor) -> list[tuple[list[int], list[int]]]:
    """Where a short answer's question says what is asked (the shape or colour, plural or not, or the
    mark's number): the positions of the last such word in the question, for `attend.ask_loss`."""
    writes = answer_writes(sample)
    if not writes:
        return []
    question = sample.input_ids[:writes[0] + 1]
    found: list[int] = []
    for ids in asking_ids(proc.tokenizer):
        starts = [i for i in range(len(question) - len(ids) + 1) if question[i:i + len(ids)] == ids]
        if starts and (not found or starts[-1] > found[0]):      # the question's, not an earlier turn's or prompt's
            found = list(range(starts[-1], starts[-1] + len(ids)))
    return [(writes, found)] if found else []


def in_curriculum(scene: Scene, max_objects: int) -> bool:
    """A scene the gate asks about: at least one object, and at most `max_objects` (0: any number)."""
    return bool(scene.objects) and (not max_objects or len(scene.objects) <= max_objects)


def training_scenes(run: GateRun) -> list[Scene]:
    """The training world's cached scenes the run may use (at most `max_objects` objects)."""
    scenes = [s for s in scene_pool(run.seed, run.pool_scenes, folder=run.pool) if in_curriculum(s, run.max_objects)]
    if not scenes:
        raise ValueError(f"no scene of the first {run.pool_scenes} has 1..{run.max_objects} objects")
    return scenes


def collate(samples: list[Sample], proc: SphinxProcessor, left: bool = False) -> dict[str, torch.Tensor]:
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), proc.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(width - n, width) if left else slice(0, n)
        ids[row, cols], labels[row, cols], mask[row, cols] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    images = [s for s in samples if s.skipped]                         # text-only rows have no image
    views = len(images[0].skipped) if images else 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "feats": torch.cat([s.feats for s in images]) if images else samples[0].feats,
            "view_skip": torch.tensor([s.skipped for s in images], dtype=torch.bool).view(len(images), views),
            "targets": [s.targets for s in samples], "looks": [s.looks for s in samples],
            "asks": [s.asks for s in samples]}


def eval_questions(run: GateRun, metrics: tuple[str, ...] = ("grounding", "detection")) -> dict[str, list[Question]]:
    """The held-out sets' questions of `metrics` (`train.evaluate`'s own), on the run's curriculum's scenes."""
    out = {}
    for name, seed, renderer in HELDOUT_WORLDS:
        pool = scene_pool(seed, run.eval_scenes * (40 if run.max_objects else 4), renderer, run.pool)
        scenes = [s for s in pool if in_curriculum(s, run.max_objects)][:run.eval_scenes]
        qs: list[Question] = []
        for scene in scenes:
            qs += [q for q in scene_questions(scene, None, seed) if q.metric in metrics]
        out[name] = qs
    return out


@torch.no_grad()
def greedy(llm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, max_new: int,
           eos: int) -> list[list[int]]:
    """Greedy decoding with the KV cache and explicit positions (left-padded rows) -> new ids per row,
    cut after EOS."""
    cache_kw = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    rows = [[] for _ in range(embeds.shape[0])]
    done = torch.zeros(embeds.shape[0], dtype=torch.bool)
    nxt, last = out.logits[:, -1].argmax(-1), pos[:, -1]
    for _ in range(max_new):
        for r in (~done).nonzero()[:, 0].tolist():
            rows[r].append(int(nxt[r]))
        done |= nxt == eos
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last = last + 1
        out = llm(inputs_embeds=llm.get_input_embeddings()(nxt[:, None]), attention_mask=mask,
                  position_ids=last[:, None], use_cache=True, **{cache_kw: out[cache_kw]})
        nxt = out.logits[:, -1].argmax(-1)
    return rows


def noisy_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, level: float) -> torch.Tensor:
    """`embeds` (B, L, d) with Gaussian noise added at the visual tokens only, its norm `level` times
    each token's own (on average): what an imperfect projector of real experts gives (cosine
    1 / sqrt(1 + level^2) to the perfect token)."""
    image = (input_ids == IMAGE_TOKEN_ID)[..., None]
    scale = embeds.detach().norm(dim=-1, keepdim=True) / embeds.shape[-1] ** 0.5
    return embeds + torch.randn_like(embeds) * scale * level * image


def on_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on `device` (the per-box targets stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: OracleSphinx, proc: SphinxProcessor, cells: torch.Tensor | None,
             questions: dict[str, list[Question]], batch: int = 16, bf16: bool = True,
             system: str | None = None, shared_image_position: bool = False,
             features: Callable[[Scene], torch.Tensor] | None = None, text: str = "word") -> dict[str, dict[str, float]]:
    """Greedy answers to the held-out questions, scored; `features` as in `make_sample` (`model.embed`
    must then take those features)."""
    model.eval()
    device = next(model.parameters()).device
    table = {}
    for name, qs in questions.items():
        scored: list[tuple[Question, dict]] = []
        examples = []
        for i in range(0, len(qs), batch):
            chunk = qs[i:i + batch]
            b = collate([make_sample(q.scene, q.prompt, None, proc, cells, system, features, text) for q in chunk], proc,
                        left=True)
            b = on_device(b, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                embeds = model.embed(b["input_ids"], b["feats"], b["view_skip"])
            longest = max(200 if q.metric in ("detection", "spotting") else 64 if q.metric == "ocr" else 24 for q in chunk)
            pos = rotary_positions(b["input_ids"], b["attention_mask"], shared_image_position)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = greedy(model.model.llm, embeds.float(), b["attention_mask"], pos, longest,
                             proc.tokenizer.eos_token_id)
            for q, ids in zip(chunk, out):
                answer = proc.tokenizer.decode(ids, skip_special_tokens=True)
                scored.append((q, score(q, answer, proc.config.anchor)))
                if len(examples) < 4:
                    examples.append({"prompt": q.prompt, "answer": answer, "truth": q.truth})
        metrics = summarise(scored)
        table[name] = {**{m: row["value"] for m, row in metrics.items()}, "questions": len(qs), "examples": examples}
    model.train()
    return table


def coordinate_accuracy(logits: torch.Tensor, labels: torch.Tensor, coord_ids: torch.Tensor) -> dict[str, float]:
    """Teacher-forced: of the answer positions whose label is a coordinate token, the share whose
    argmax is that token (`exact`) or within 0.03 of it (`near`, about the box precision acc@0.5 needs)."""
    target = labels[:, 1:]
    where = torch.isin(target, coord_ids)
    if not where.any():
        return {"exact": float("nan"), "near": float("nan")}
    guess = logits[:, :-1].argmax(-1)[where]
    truth = target[where]
    value = torch.full((int(max(coord_ids.max(), guess.max())) + 1,), -10.0, device=guess.device)
    value[coord_ids] = torch.arange(len(coord_ids), dtype=torch.float32, device=guess.device) / 100
    return {"exact": (guess == truth).float().mean().item(),
            "near": ((value[guess] - value[truth]).abs() <= 0.03 + 1e-6).float().mean().item()}


def run_record(run: GateRun) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()}


def run_from_record(record: dict) -> GateRun:
    """A run's GateRun back from its run.json (paths as Paths, unknown keys refused)."""
    paths = {"out", "tokenizer", "init_llm", "init_weights", "pool"}
    run = GateRun(**{k: Path(v) if k in paths and v is not None else v for k, v in record.items()})
    run.eval_metrics, run.other_tasks = tuple(run.eval_metrics), tuple(run.other_tasks)
    return run


def load_run(folder: Path) -> tuple[GateRun, OracleSphinx, SphinxProcessor]:
    """A finished (or saved) gate run back from its folder, for the probes: its set-up with its own
    weights (the starts it was given, e.g. the word projector, are already in them)."""
    weights = next((folder / n for n in ("weights.safetensors", "weights.bf16.safetensors") if (folder / n).exists()), None)
    if not (folder / "run.json").exists() or weights is None:   # bf16: as committed in train/gates/results
        raise FileNotFoundError(f"{folder}: needs run.json and weights.safetensors (a gate run's folder)")
    run = run_from_record(json.loads((folder / "run.json").read_text()))
    run.init_weights, run.init_llm, run.max_objects = weights, None, 0
    run.word_projector, run.visual_norm = False, 0.0
    model, proc, _ = build(run)
    return run, model, proc


def save_weights(model: OracleSphinx, folder: Path) -> None:
    """weights.safetensors in `folder` (what `--init-weights` starts a later run from), written whole
    or not at all; the experts, never trained here, are left out."""
    experts = tuple(f"model.{k}." for k in model.model.expert_keys)
    tmp = folder / "weights.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(experts)}, tmp)
    tmp.replace(folder / "weights.safetensors")


def train(run: GateRun) -> dict:
    torch.manual_seed(run.seed)
    torch.set_num_threads(run.threads)
    folder = run.out / (run.name or run.mechanism.replace("+", "_"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(run_record(run), indent=2) + "\n", encoding="utf-8")
    model, proc, cells = build(run)
    device = torch.device(run.device)
    model.to(device)
    supervision = Supervision(model.model.llm, (run.attend_layer, run.attend_head, run.attend_weight),
                              (run.gather_layer, run.gather_head, run.gather_weight), run.query_weight,
                              (run.name_layer, run.name_head, run.name_weight), run.look_weight)
    params = [p for p in model.parameters() if p.requires_grad] + supervision.parameters()
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0, betas=(0.9, 0.98))
    questions = eval_questions(run, run.eval_metrics)
    scenes = training_scenes(run)
    coord_ids = torch.tensor([proc.tokenizer.convert_tokens_to_ids(p) for p in NUMBER_PIECES], device=device)
    rng = random.Random(run.seed)
    log = open(folder / "metrics.jsonl", "w", encoding="utf-8")
    start, step, seen, evals = time.time(), 0, 0, []
    budget = run.minutes * 60
    next_eval = run.eval_every_minutes * 60 if run.eval_every_minutes else None
    next_save = run.save_every_minutes * 60
    bar = tqdm(total=int(budget), unit="s", desc=f"gate A / {run.mechanism}")
    while step < run.max_steps and time.time() - start < budget:
        batch = on_device(collate([training_sample(rng, scenes, run, proc, cells) for _ in range(run.batch_size)],
                                  proc), device)
        seen += run.batch_size
        progress = min(1.0, (time.time() - start) / budget)
        lr = run.lr * min(1.0, (step + 1) / run.warmup_steps) * (0.1 + 0.9 * (1 - progress))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
            embeds = model.embed(batch["input_ids"], batch["feats"], batch["view_skip"])
            if run.token_noise:
                embeds = noisy_tokens(embeds, batch["input_ids"], run.token_noise)
            out = model.model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                  position_ids=rotary_positions(batch["input_ids"], batch["attention_mask"],
                                                            run.shared_image_position),
                                  labels=None if run.loss_per_answer else batch["labels"])
        loss = answer_mean_loss(out.logits, batch["labels"]) if run.loss_per_answer else out.loss
        aux = supervision.losses(batch, coord_ids, IMAGE_TOKEN_ID)
        loss = loss + supervision.total(aux)
        coord = coordinate_accuracy(out.logits.detach(), batch["labels"], coord_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - start
        bar.n = int(min(elapsed, budget))
        bar.set_postfix(step=step, loss=f"{loss.item():.3f}", coord=f"{coord['exact']:.2f}",
                        **({} if aux["attend"] is None else {"attend": f"{aux['attend'].item():.2f}"}))
        log.write(json.dumps({"step": step, "seconds": round(elapsed, 1), "loss": loss.item(), "lr": lr,
                              "coord_exact": coord["exact"], "coord_near": coord["near"],
                              **{k: None if v is None else v.item() for k, v in aux.items()}}) + "\n")
        log.flush()
        if run.save_every_minutes and elapsed >= next_save:
            save_weights(model, folder)
            next_save += run.save_every_minutes * 60
        if next_eval is not None and elapsed >= next_eval:
            table = evaluate(model, proc, cells, questions, bf16=run.bf16, system=run.system,
                             shared_image_position=run.shared_image_position, text=run.text_features)
            evals.append({"step": step, "minutes": round(elapsed / 60, 2), **table})
            log.write(json.dumps({"step": step, "eval": table}) + "\n")
            next_eval += run.eval_every_minutes * 60
            start += time.time() - start - elapsed          # evaluation time is not training time
    bar.close()
    train_minutes = (time.time() - start) / 60
    table = evaluate(model, proc, cells, questions, bf16=run.bf16, system=run.system,
                     shared_image_position=run.shared_image_position, text=run.text_features)
    result = {"run": run_record(run),
              "steps": step, "examples": seen, "train_minutes": round(train_minutes, 2), "final": table,
              "evals": evals}
    save_weights(model, folder)
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def run_label(run: dict) -> str:
    """What set a run apart, in words, for the gate table."""
    parts = [run["mechanism"]]
    if run.get("word_projector"):
        parts.append("word projector")
    if run.get("visual_norm"):
        parts.append(f"visual norm {run['visual_norm']:g}")
    parts.append(f"{run['token_grid']}x{run['token_grid']} tokens/view")
    parts.append(f"<= {run['max_objects']} object(s)" if run.get("max_objects") else "all scenes")
    share = run.get("detection_share", 0.5)
    parts.append("grounding only" if share == 0 else f"detection {share:g}")
    if run.get("other_share"):
        tasks = run.get("other_tasks") or OTHER_TASKS
        parts.append(f"other tasks {run['other_share']:g}" + ("" if tuple(tasks) == OTHER_TASKS else f" ({', '.join(tasks)})"))
    if run.get("text_features", "word") != "word":
        parts.append(f"text as {run['text_features']}")
    if run.get("token_noise"):
        parts.append(f"token noise {run['token_noise']:g}")
    if run.get("text_only_share"):
        parts.append(f"text-only {run['text_only_share']:g}")
    if run.get("look_weight"):
        parts.append(f"short answers look where they read (weight {run['look_weight']:g})")
    if run.get("shared_image_position"):
        parts.append("shared image position")
    if run.get("loss_per_answer"):
        parts.append("loss per answer")
    if run.get("attend_weight"):
        parts.append(f"attention supervision (layer {run['attend_layer']} head {run['attend_head']}, "
                     f"weight {run['attend_weight']:g})")
    if run.get("query_weight"):
        parts.append(f"named words read out at layer {run['attend_layer']} (weight {run['query_weight']:g})")
    if run.get("gather_weight"):
        parts.append(f"first hop supervised (layer {run['gather_layer']} head {run['gather_head']}, "
                     f"weight {run['gather_weight']:g})")
    if run.get("name_weight"):
        parts.append(f"naming supervised (layer {run['name_layer']} head {run['name_head']}, "
                     f"weight {run['name_weight']:g})")
    if run.get("system") == "":
        parts.append("no system prompt")
    if run.get("init_weights"):
        parts.append(f"from {Path(run['init_weights']).parent.name}")
    elif run.get("init_llm"):
        parts.append("LLM from v4")
    else:
        parts.append("fresh LLM")
    parts.append(f"lr {run['lr']:g}")
    return f"{run.get('name') or run['mechanism']}: " + ", ".join(parts)


def format_table(results: list[dict]) -> str:
    lines = ["| run | steps | examples | wall min (2 shared cores) | grounding acc@0.5 (eval / heldout) | detection F1@0.5 (eval / heldout) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        f = r["final"]
        g = " / ".join(f"{f[n].get('grounding', float('nan')):.2f}" for n, _, _ in HELDOUT_WORLDS)
        d = " / ".join(f"{f[n].get('detection', float('nan')):.2f}" for n, _, _ in HELDOUT_WORLDS)
        label = run_label(r["run"])
        lines.append(f"| {label} | {r['steps']} | {r['examples']} | {r['train_minutes']:.1f} | {g} | {d} |")
    return "\n".join(lines)


def evaluate_run(folder: Path, metrics: tuple[str, ...], eval_scenes: int, threads: int = 2) -> dict:
    """A saved gate run scored on `metrics` (e.g. the world's other tasks, to see what the LLM answers
    from oracle tokens before any expert is in the way); written to FOLDER/eval.json."""
    torch.set_num_threads(threads)
    run, model, proc = load_run(folder)
    run.eval_scenes = eval_scenes
    cells = torch.tensor(token_cells(proc.config.grid, proc.config.tokens_per_view), dtype=torch.float32) \
        if run.mechanism == "features" else None
    table = evaluate(model, proc, cells, eval_questions(run, metrics), bf16=run.bf16, system=run.system,
                     shared_image_position=run.shared_image_position, text=run.text_features)
    record = {"run": run_record(run), "metrics": list(metrics), "eval_scenes": eval_scenes, "final": table}
    (folder / "eval.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def format_metrics(table: dict[str, dict]) -> str:
    """Per metric, each held-out set's score (the `evaluate` table of a run)."""
    names = [m for m in METRICS if any(m in table[n] for n, _, _ in HELDOUT_WORLDS)]
    lines = ["| metric | " + " | ".join(n for n, _, _ in HELDOUT_WORLDS) + " |", "|---" * (len(HELDOUT_WORLDS) + 1) + "|"]
    for m in names:
        lines.append(f"| {m} | " + " | ".join(f"{table[n].get(m, float('nan')):.2f}" for n, _, _ in HELDOUT_WORLDS) + " |")
    return "\n".join(lines)


def parse_other_tasks(text: str) -> tuple[str, ...]:
    """'count_shape,som' -> those of OTHER_TASKS."""
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in OTHER_TASKS + READING_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(OTHER_TASKS + READING_TASKS)}")
    return tasks


def parse_metrics(text: str) -> tuple[str, ...]:
    """'grounding,counting' -> the metrics, each one `train.evaluate` knows."""
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.gates.pointing", description=__doc__.split("\n")[0])
    ap.add_argument("--mechanism", choices=MECHANISMS, default=GateRun.mechanism)
    ap.add_argument("--out", type=Path, default=GateRun.out)
    ap.add_argument("--minutes", type=float, default=GateRun.minutes)
    ap.add_argument("--max-steps", type=int, default=GateRun.max_steps)
    ap.add_argument("--batch-size", type=int, default=GateRun.batch_size)
    ap.add_argument("--lr", type=float, default=GateRun.lr)
    ap.add_argument("--eval-scenes", type=int, default=GateRun.eval_scenes)
    ap.add_argument("--eval-every-minutes", type=float, default=0.0)
    ap.add_argument("--detection-share", type=float, default=GateRun.detection_share)
    ap.add_argument("--other-share", type=float, default=GateRun.other_share,
                    help="share of samples asking the world's other tasks (counts, attributes, marks, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-grid", type=int, default=GateRun.token_grid, help="tokens per view side")
    ap.add_argument("--max-objects", type=int, default=0, help="only scenes with at most this many objects")
    ap.add_argument("--name", default=None, help="run folder name (default: the mechanism)")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--threads", type=int, default=GateRun.threads, help="torch threads (CPU)")
    ap.add_argument("--system", default=None, help="system prompt (default: the template's; '' for none)")
    ap.add_argument("--init-weights", type=Path, default=None, help="start from an earlier gate run's weights.safetensors")
    ap.add_argument("--save-every-minutes", type=float, default=0.0, help="rewrite weights.safetensors this often")
    ap.add_argument("--shared-image-position", action="store_true", help="an image's visual tokens share one rotary position")
    ap.add_argument("--loss-per-answer", action="store_true", help="average the loss per answer, not per token")
    ap.add_argument("--word-projector", action="store_true", help="projector rows start at the named words' embeddings")
    ap.add_argument("--visual-norm", type=float, default=0.0, help="visual tokens and position codes start at this norm")
    ap.add_argument("--attend-weight", type=float, default=0.0,
                    help="> 0: supervise one head's attention onto each box's object, with this weight")
    ap.add_argument("--attend-layer", type=int, default=GateRun.attend_layer)
    ap.add_argument("--attend-head", type=int, default=GateRun.attend_head)
    ap.add_argument("--gather-weight", type=float, default=0.0,
                    help="> 0: supervise a head's attention onto the question's naming words at each coordinate")
    ap.add_argument("--gather-layer", type=int, default=GateRun.gather_layer)
    ap.add_argument("--gather-head", type=int, default=GateRun.gather_head)
    ap.add_argument("--query-weight", type=float, default=0.0,
                    help="> 0: a linear read-out of the attend layer's input at coordinates must name the question's words")
    ap.add_argument("--name-weight", type=float, default=0.0,
                    help="> 0: a head must look at the objects a detection answer names next, this weight")
    ap.add_argument("--name-layer", type=int, default=GateRun.name_layer)
    ap.add_argument("--name-head", type=int, default=GateRun.name_head)
    ap.add_argument("--text-only-share", type=float, default=0.0,
                    help="share of samples that are text-only exchanges (chat without an image)")
    ap.add_argument("--token-noise", type=float, default=0.0,
                    help="> 0: Gaussian noise on the visual tokens in training, relative to their norm (0.33 ~ cosine 0.95)")
    ap.add_argument("--look-weight", type=float, default=0.0,
                    help="> 0: the name head must look, while a count / attribute / mark answer is written, at what it is read from")
    ap.add_argument("--other-tasks", type=parse_other_tasks, default=GateRun.other_tasks,
                    help=f"comma-separated tasks --other-share asks, uniformly (a task named twice is asked twice as "
                         f"often; default: {','.join(OTHER_TASKS)})")
    ap.add_argument("--text-features", choices=TEXT_FORMS, default=GateRun.text_features,
                    help="the oracle's text: 'word' (the word's identity) or 'cells' (per-cell letters, as experts read)")
    ap.add_argument("--init-llm", type=Path, default=None, help="start the LLM from this demo checkpoint folder")
    ap.add_argument("--eval-metrics", type=parse_metrics, default=GateRun.eval_metrics,
                    help="comma-separated train.evaluate metrics the held-out sets are scored on "
                         f"(default grounding,detection; any of {','.join(METRICS)})")
    ap.add_argument("--evaluate", type=Path, default=None, metavar="RUN",
                    help="score a saved run's folder on --eval-metrics (--eval-scenes a set) and exit")
    ap.add_argument("--table", action="store_true", help="print the table of the runs found in --out and exit")
    a = ap.parse_args(argv)
    if a.evaluate is not None:
        try:
            record = evaluate_run(a.evaluate, a.eval_metrics, a.eval_scenes, a.threads)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 1
        print(format_metrics(record["final"]))
        return 0
    if a.table:
        results = [json.loads(p.read_text()) for p in sorted(a.out.glob("*/result.json"))]
        results = [r for r in results if "final" in r]   # other gates' records share the results folder
        if not results:
            print(f"no runs in {a.out}", file=sys.stderr)
            return 1
        print(format_table(results))
        return 0
    run = GateRun(mechanism=a.mechanism, out=a.out, minutes=a.minutes, max_steps=a.max_steps,
                  batch_size=a.batch_size, lr=a.lr, eval_scenes=a.eval_scenes,
                  eval_every_minutes=a.eval_every_minutes, eval_metrics=a.eval_metrics, detection_share=a.detection_share, other_share=a.other_share, seed=a.seed, max_objects=a.max_objects,
                  token_grid=a.token_grid,
                  name=a.name,
                  bf16=not a.fp32, system=a.system, init_llm=a.init_llm,
                  init_weights=a.init_weights, word_projector=a.word_projector, visual_norm=a.visual_norm,
                  loss_per_answer=a.loss_per_answer, save_every_minutes=a.save_every_minutes,
                  shared_image_position=a.shared_image_position, attend_weight=a.attend_weight,
                  attend_layer=a.attend_layer, attend_head=a.attend_head, gather_weight=a.gather_weight,
                  gather_layer=a.gather_layer, gather_head=a.gather_head, query_weight=a.query_weight,
                  name_weight=a.name_weight, name_layer=a.name_layer, name_head=a.name_head,
                  look_weight=a.look_weight, token_noise=a.token_noise, text_only_share=a.text_only_share, other_tasks=a.other_tasks, text_features=a.text_features,
                  device=a.device, threads=a.threads)
    if run.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device on this machine", file=sys.stderr)
        return 1
    if not run.device.startswith(("cpu", "cuda")):
        print(f"--device {run.device}: use cpu or cuda", file=sys.stderr)
        return 1
    llm = get_preset("sphinx-demo").llm.config
    if not all(0 <= layer < llm["num_hidden_layers"] and 0 <= head < llm["num_attention_heads"]
               for layer, head in ((run.attend_layer, run.attend_head), (run.gather_layer, run.gather_head),
                                   (run.name_layer, run.name_head))):
        print(f"--attend-/--gather-/--name-layer and -head: the demo LLM has layers 0-{llm['num_hidden_layers'] - 1} and "
              f"heads 0-{llm['num_attention_heads'] - 1}", file=sys.stderr)
        return 1
    missing = [f"{flag} {path}" for flag, path in (("--init-weights", run.init_weights),
                                                     ("--init-llm", run.init_llm and run.init_llm / "model.safetensors"))
               if path is not None and not Path(path).is_file()]
    if missing:
        print(f"not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    result = train(run)
    print(format_table([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
