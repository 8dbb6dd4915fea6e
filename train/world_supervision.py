"""Attention supervision for the one-stage trainer on the synthetic world (issue 18, Gate C).

Gate A taught the LLM to point with three auxiliary losses on chosen heads (`train.gates.attend`):
at each position that writes a box coordinate, one head looks at that box's object's visual tokens
(`attend`) and another at the words that name it (`gather`); at the positions that write a
detection group's name, a head looks at the objects that name is about (`name`). Plain multi-task
fine-tuning of that LLM on every task of the world lost the pointing within 200 steps (Gate C,
recipes v5c and v5d); these losses keep the same heads doing the same job while the rest is learned.

The truth comes from the record itself: a world record's one image is `images/<renderer>-<seed>-
<index>.png`, whose scene is drawn again (`render_scene`, deterministic) for its objects and the
visual tokens that hold each one (`train.world.targets`, the experts' own assignment). Each box an
answer writes (four coordinate tokens, in order) is matched to the object whose box it is; boxes of
anything else (a word's, in text spotting) are kept as empty targets so the order stays aligned.
A record that is not a world scene gets no targets and only the language-model loss. Training only:
nothing changes at inference.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import torch

from sphinx_model.conversation import Conversation
from sphinx_model.processor import Encoded, SphinxProcessor

from .demo_tokenizer import NUMBER_PIECES
from .gates.attend import BoxTarget, Supervision, named_words, object_slots, visual_slots
from .gates.oracle import scene_features
from .world.scene import RENDERERS, Scene, WorldObject, render_scene
from .world.tasks import TaskWriter

SCENE_IMAGE = re.compile(r"^(?P<renderer>[a-z]+)-(?P<seed>\d+)-(?P<index>\d+)$")
MATCH_TOLERANCE = 0.011          # a written coordinate is its object's, rounded to 2 decimals


@dataclass
class HeadSpec:
    """One supervised head: (layer, head) and the loss's weight (0 = off)."""
    layer: int
    head: int
    weight: float


def build_supervision(llm: torch.nn.Module, attend: HeadSpec, gather: HeadSpec, name: HeadSpec) -> Supervision:
    """The gate's supervision on this LLM's heads (no attribute read-out: it would be a parameter the
    checkpoint does not keep)."""
    layers = len(llm.model.layers)
    heads = llm.config.num_attention_heads
    for what, spec in (("attend", attend), ("gather", gather), ("name", name)):
        if spec.weight and not (0 <= spec.layer < layers and 0 <= spec.head < heads):
            raise ValueError(f"supervision {what}: layer {spec.layer}, head {spec.head} is not in this LLM "
                             f"({layers} layers x {heads} heads)")
    return Supervision(llm, (attend.layer, attend.head, attend.weight), (gather.layer, gather.head, gather.weight),
                       0.0, (name.layer, name.head, name.weight))


def scene_of(ref: str | None) -> tuple[str, int, int] | None:
    """(renderer, seed, index) of a world image path, None for any other picture."""
    if not ref:
        return None
    m = SCENE_IMAGE.match(PurePosixPath(ref).stem)
    if m is None or m["renderer"] not in RENDERERS:
        return None
    return m["renderer"], int(m["seed"]), int(m["index"])


def phrase_candidates(obj: WorldObject) -> list[str]:
    """The ways the world names an object, longest first ("small red circle", "red circle", ...)."""
    return [f"{obj.size} {obj.colour} {obj.shape}", f"{obj.colour} {obj.shape}", f"{obj.size} {obj.shape}",
            obj.shape]


class WorldBoxTargets:
    """(conversation, its encoding) -> one BoxTarget per box its answers write, or None (no targets)."""

    def __init__(self, processor: SphinxProcessor, cache_scenes: int = 4096):
        cfg = processor.config
        self.tokenizer = processor.tokenizer
        self.anchor, self.grid = cfg.anchor, cfg.grid
        self.token_grid = int(round((cfg.tokens_per_view - 1) ** 0.5))
        self.values = {self.tokenizer.convert_tokens_to_ids(p): float(p) for p in NUMBER_PIECES}  # token id -> value
        if len(self.values) != len(NUMBER_PIECES) or self.tokenizer.unk_token_id in self.values:
            raise ValueError("supervision needs a tokenizer with one token per box coordinate 0.00-1.00 "
                             "(the demo tokenizer's); this one has none")
        self._scenes: OrderedDict[tuple[str, int, int], Scene] = OrderedDict()
        self._cache = cache_scenes
        self._names: dict[str, list[int]] = {}

    def scene(self, key: tuple[str, int, int]) -> Scene:
        if key not in self._scenes:
            self._scenes[key] = render_scene(key[1], key[2], key[0])[0]
            if len(self._scenes) > self._cache:
                self._scenes.popitem(last=False)
        self._scenes.move_to_end(key)
        return self._scenes[key]

    def __call__(self, conv: Conversation, encoded: Encoded) -> list[BoxTarget] | None:
        refs = conv.image_refs
        key = scene_of(refs[0]) if len(refs) == 1 and len(encoded.images) == 1 else None
        if key is None:
            return None
        scene = self.scene(key)
        skipped = list(encoded.images[0].skipped)
        feats = scene_features(scene, self.anchor, self.grid, self.token_grid)[[not s for s in skipped]]
        slots = visual_slots(feats, skipped)
        writer = TaskWriter(scene, self.anchor)
        truth = [(o, torch.tensor(writer.canvas_box(o.box))) for o in scene.objects]
        targets = []
        for first, box in self.written_boxes(encoded.labels):
            obj = next((o for o, b in truth if float((b - box).abs().max()) <= MATCH_TOLERANCE), None)
            if obj is None:                        # a word's box (spotting), or one the answer got wrong
                targets.append(BoxTarget([]))
                continue
            phrase, name = self.name_positions(encoded.input_ids, first, obj)
            targets.append(BoxTarget(object_slots(slots, obj), phrase, named_words(name)))
        return targets

    def written_boxes(self, labels: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        """(position of its first coordinate, its 4 values) for each box the answers write; a run of
        coordinates that is not a multiple of four (a truncated answer) leaves its rest out."""
        where = [i for i, t in enumerate(labels) if t in self.values]
        return [(where[k], torch.tensor([self.values[labels[i]] for i in where[k:k + 4]]))
                for k in range(0, len(where) - len(where) % 4, 4)]

    def name_positions(self, input_ids: Sequence[int], before: int, obj: WorldObject) -> tuple[list[int], str]:
        """The positions of the last naming of `obj` before position `before` (the question's phrase
        for a grounding answer, the group's `<p>name</p>` for a detection one), and that name."""
        best: tuple[tuple[int, int], list[int], str] = ((-1, 0), [], "")
        for name in phrase_candidates(obj):
            ids = self._names.setdefault(name, self.tokenizer.encode(" " + name, add_special_tokens=False))
            alone = self._names.setdefault(">" + name, self.tokenizer.encode(name, add_special_tokens=False))
            for words in (ids, alone):          # after "<p>" a name may have no leading space
                n = len(words)
                at = next((a for a in range(before - n, -1, -1) if list(input_ids[a:a + n]) == words), None)
                if at is not None and (at + n, n) > best[0]:    # the latest naming, the longest at that end
                    best = ((at + n, n), list(range(at, at + n)), name)
        return best[1], best[2]
