"""Attention supervision: one head learns, from the scene's truth, to look at the object a box is about.

Pointing at a named object takes two hops: the answer's position must first gather the question's
words, then match them against the visual tokens. Neither hop pays off in the loss without the
other, so the plain recipe waits on a plateau (Gate A's two-object runs: no head at layer >= 1 ever
picked the named object). Here one head of one layer gets a direct target at every position that
writes a coordinate: put its attention mass on the visual tokens of that box's object. Its query
must then come to hold the question's words (the first hop), and its key the tokens' attributes.
Training only: nothing changes at inference, and the truth it uses (which tokens hold which object)
is the same truth the answers' boxes come from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..world.scene import WorldObject
from ..world.vocab import COLOUR_NAMES, SHAPES, SIZES
from .oracle import COLOUR, OBJ, SHAPE, SIZE


@dataclass
class BoxTarget:
    """What one box of an answer (boxes in answer order) is about: the visual slots of its object
    (indices among one image's visual positions, layout order), the positions of the words that
    name it (the question's phrase for grounding, the answer's `<p>name</p>` for detection), and
    which attribute words those are (indices in ATTRIBUTE_WORDS)."""
    slots: list[int]
    phrase: list[int] = field(default_factory=list)
    named: list[int] = field(default_factory=list)


def visual_slots(feats: torch.Tensor, skipped: list[bool]) -> list[torch.Tensor | None]:
    """The oracle feature vector of every visual position of one image, in layout order (a skipped
    view's one token, and each kept view's start and end, have none)."""
    slots: list[torch.Tensor | None] = []
    k = 0
    for skip in skipped:
        if skip:
            slots.append(None)
            continue
        slots += [None, *feats[k], None]
        k += 1
    return slots


def attributes(f: torch.Tensor) -> tuple[str, str, str] | None:
    """(shape, colour, size) of the object an oracle token holds, None where it holds none."""
    if f[OBJ] <= 0:
        return None
    return (SHAPES[int(f[SHAPE:COLOUR].argmax())], COLOUR_NAMES[int(f[COLOUR:SIZE].argmax())],
            SIZES[int(f[SIZE:SIZE + len(SIZES)].argmax())])


def object_slots(slots: list[torch.Tensor | None], obj: WorldObject) -> list[int]:
    """The visual positions that hold `obj` (a nameable object is the only one with its attributes)."""
    want = (obj.shape, obj.colour, obj.size)
    return [i for i, f in enumerate(slots) if f is not None and attributes(f) == want]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + turned * sin


class HeadAttention:
    """Keeps the inputs of one attention layer on each forward, so that one head's attention rows
    can be recomputed (with gradients) at chosen query positions."""

    def __init__(self, attention: nn.Module, head: int):
        self.attention, self.head = attention, head
        self.inputs: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handle = attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.inputs = (hidden, kwargs["position_embeddings"])

    def log_probs(self, row: int, queries: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(Q,) query positions of batch row `row` -> (Q, L) log attention of the head over the row's
        positions (causal; `keep` (L,) False where padding)."""
        hidden, (cos, sin) = self.inputs
        a, h = self.attention, self.head
        d = a.head_dim
        rows = slice(h * d, (h + 1) * d)
        kv_head = h // (a.config.num_attention_heads // a.config.num_key_value_heads)
        kv_rows = slice(kv_head * d, (kv_head + 1) * d)
        x = hidden[row]
        q = nn.functional.linear(x[queries], a.q_proj.weight[rows],
                                 None if a.q_proj.bias is None else a.q_proj.bias[rows]).float()
        k = nn.functional.linear(x, a.k_proj.weight[kv_rows],
                                 None if a.k_proj.bias is None else a.k_proj.bias[kv_rows]).float()
        at = row if cos.shape[0] > 1 else 0            # one set of rotary positions for every row, or one a row
        q = _rotate(q, cos[at, queries].float(), sin[at, queries].float())
        k = _rotate(k, cos[at].float(), sin[at].float())
        scores = (q @ k.T) * a.scaling                                     # (Q, L)
        positions = torch.arange(x.shape[0], device=x.device)
        allowed = (positions[None, :] <= queries[:, None]) & keep[None, :]
        return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)

    def remove(self) -> None:
        self.handle.remove()


def _coordinate_writes(labels: torch.Tensor, coord_ids: torch.Tensor) -> torch.Tensor:
    """Positions of one row that write a coordinate (position t writes label t + 1)."""
    return torch.isin(labels[1:], coord_ids).nonzero()[:, 0]


def _mass_losses(probe: HeadAttention, row: int, queries: list[int], wanted: list[torch.Tensor],
                 keep: torch.Tensor) -> list[torch.Tensor]:
    """-log(attention mass on `wanted[i]`) of each query position."""
    logp = probe.log_probs(row, torch.tensor(queries, device=keep.device), keep)
    return [-torch.logsumexp(logp[i, cols], dim=0) for i, cols in enumerate(wanted)]


def _box_writes(labels: torch.Tensor, targets: list[list[BoxTarget]], coord_ids: torch.Tensor):
    """(row, box, its four coordinate-writing positions) for every row whose count of coordinates is
    four per target (a row that does not match, e.g. a malformed answer, is left out)."""
    for row, boxes in enumerate(targets):
        writes = _coordinate_writes(labels[row], coord_ids).tolist()
        if boxes and len(writes) == 4 * len(boxes):
            for b, box in enumerate(boxes):
                yield row, box, writes[4 * b:4 * b + 4]


def _image_columns(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per row, the positions of its visual tokens."""
    return [(row == image_token_id).nonzero()[:, 0] for row in input_ids]


def _head_mass_loss(probe: HeadAttention, attention_mask: torch.Tensor,
                    wanted: list[tuple[int, list[int], torch.Tensor]]) -> torch.Tensor | None:
    """Mean -log(attention mass on the columns) over (row, query positions, columns) entries."""
    losses = []
    rows: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for row, queries, cols in wanted:
        qs, cs = rows.setdefault(row, ([], []))
        qs += queries
        cs += [cols] * len(queries)
    for row, (queries, cols) in rows.items():
        losses += _mass_losses(probe, row, queries, cols, attention_mask[row].bool())
    return torch.stack(losses).mean() if losses else None


def attention_loss(probe: HeadAttention, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor, targets: list[list[BoxTarget]], coord_ids: torch.Tensor,
                   image_token_id: int) -> torch.Tensor | None:
    """Mean over the coordinate-writing positions of -log(attention mass on that box's object's
    visual tokens): the second hop. None where no row counts."""
    wanted, image_at = [], _image_columns(input_ids, image_token_id)
    for row, box, writes in _box_writes(labels, targets, coord_ids):
        if box.slots:
            wanted.append((row, writes, image_at[row][box.slots]))
    return _head_mass_loss(probe, attention_mask, wanted)


def phrase_loss(probe: HeadAttention, labels: torch.Tensor, attention_mask: torch.Tensor,
                targets: list[list[BoxTarget]], coord_ids: torch.Tensor) -> torch.Tensor | None:
    """Mean over the coordinate-writing positions of -log(attention mass on the words that name that
    box's object): the first hop, which brings the name to where the box is written. None where no
    box has its words located."""
    wanted = [(row, writes, torch.tensor(box.phrase, device=labels.device))
              for row, box, writes in _box_writes(labels, targets, coord_ids) if box.phrase]
    return _head_mass_loss(probe, attention_mask, wanted)


def naming_loss(probe: HeadAttention, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                targets: list[list[BoxTarget]], image_token_id: int) -> torch.Tensor | None:
    """Mean over the positions that write an answer's name of an object (a detection group's
    `<p>name`: the position before each of its words) of -log(attention mass on the visual tokens
    of the objects that name is about). Choosing which object to list next is the step the
    coordinate losses leave unsupervised; this gives it a place to look. None where no name is
    written in an answer."""
    wanted, image_at = [], _image_columns(input_ids, image_token_id)
    for row, boxes in enumerate(targets):
        groups: dict[tuple[int, ...], list[int]] = {}
        for box in boxes:
            if box.phrase and box.slots and labels[row, box.phrase[0]] != -100:   # named in the answer
                groups.setdefault(tuple(box.phrase), []).extend(box.slots)
        for phrase, slots in groups.items():
            wanted.append((row, [p - 1 for p in phrase], image_at[row][sorted(set(slots))]))
    return _head_mass_loss(probe, attention_mask, wanted)


def look_loss(probe: HeadAttention, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              looks: list[list[tuple[list[int], list[int]]]], image_token_id: int) -> torch.Tensor | None:
    """Mean over the positions that write a short answer (an attribute, a count, a marked object's name)
    of -log(attention mass on the visual slots that answer is read from): the object asked about, or,
    for a count, the global view's pooled token, which holds the scene's counts. `looks` per row:
    (answer-writing positions, visual slots). None where no row has one."""
    wanted, image_at = [], _image_columns(input_ids, image_token_id)
    for row, entries in enumerate(looks):
        for queries, slots in entries:
            if queries and slots:
                wanted.append((row, queries, image_at[row][slots]))
    return _head_mass_loss(probe, attention_mask, wanted)


def ask_loss(probe: HeadAttention, attention_mask: torch.Tensor,
             asks: list[list[tuple[list[int], list[int]]]]) -> torch.Tensor | None:
    """Mean over the positions that write a short answer of -log(attention mass on the question's words
    that say what is asked: the shape or colour counted or asked about, the mark's number): the first hop
    of a short answer, as `phrase_loss` is of a box. `asks` per row: (answer-writing positions, word
    positions). None where no row has one."""
    wanted = [(row, queries, torch.tensor(words, device=attention_mask.device))
              for row, entries in enumerate(asks) for queries, words in entries if queries and words]
    return _head_mass_loss(probe, attention_mask, wanted)


def phrase_positions(input_ids: list[int], words: list[int], start: int = 0) -> list[int]:
    """Where the token ids `words` first occur, contiguously, in `input_ids` at or after `start`
    (empty if they do not)."""
    n = len(words)
    for at in range(start, len(input_ids) - n + 1):
        if input_ids[at:at + n] == words:
            return list(range(at, at + n))
    return []


ATTRIBUTE_WORDS = (*SHAPES, *COLOUR_NAMES, *SIZES)


def named_words(phrase: str) -> list[int]:
    """Indices in ATTRIBUTE_WORDS of the words a phrase names ("the small red circle")."""
    return [ATTRIBUTE_WORDS.index(w) for w in phrase.split() if w in ATTRIBUTE_WORDS]


def named_loss(readout: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, targets: list[list[BoxTarget]],
               coord_ids: torch.Tensor) -> torch.Tensor | None:
    """Binary cross-entropy of a linear read-out of the hidden states (B, L, d) at each box's
    coordinate-writing positions against the attribute words that name its object: the selecting
    head's query can only match what its input holds (`python -m train.gates.probe` found the named
    colour there at chance). None where no box names words."""
    xs, ys = [], []
    for row, box, writes in _box_writes(labels, targets, coord_ids):
        if box.named:
            target = torch.zeros(len(ATTRIBUTE_WORDS), device=hidden.device)
            target[box.named] = 1.0
            xs.append(hidden[row, writes])
            ys.append(target.expand(len(writes), -1))
    if not xs:
        return None
    logits = readout(torch.cat(xs).float())
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.cat(ys), reduction="sum") / len(logits)


class Supervision:
    """The auxiliary losses of a gate run, with their weights: the selecting head onto each box's object
    (`attention_loss`), the first-hop head onto its name (`phrase_loss`), the named-words read-out at
    the selecting layer's input (`named_loss`; its linear layer trains with the run and is not kept),
    a head onto the objects a detection answer names next (`naming_loss`), and the same head onto
    what a short answer is read from (`look_loss`, weight `look_weight`; with the first-hop head on, that
    head onto the question's words that say what is asked, `ask_loss`, the same weight).
    A weight of 0 leaves that loss out."""

    def __init__(self, llm: nn.Module, attend: tuple[int, int, float], gather: tuple[int, int, float],
                 query_weight: float, name: tuple[int, int, float] = (3, 1, 0.0), look_weight: float = 0.0):
        layers = llm.model.layers
        self.attend_weight, self.gather_weight, self.query_weight = attend[2], gather[2], query_weight
        self.name_weight, self.look_weight = name[2], look_weight
        self.select = HeadAttention(layers[attend[0]].self_attn, attend[1]) if attend[2] > 0 or query_weight > 0 else None
        self.first_hop = HeadAttention(layers[gather[0]].self_attn, gather[1]) if gather[2] > 0 else None
        self.chooser = None
        if name[2] > 0 or look_weight > 0:     # the same head as `select` shares its hook
            same = self.select is not None and (name[0], name[1]) == (attend[0], attend[1])
            self.chooser = self.select if same else HeadAttention(layers[name[0]].self_attn, name[1])
        self.readout = None
        if query_weight > 0:
            weight = llm.get_input_embeddings().weight
            self.readout = nn.Linear(weight.shape[1], len(ATTRIBUTE_WORDS)).to(weight.device)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.readout is None else list(self.readout.parameters())

    def losses(self, batch: dict, coord_ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor | None]:
        """After the LLM's forward on `batch`: each auxiliary loss (None where off or where no row counts)."""
        out: dict[str, torch.Tensor | None] = {"attend": None, "gather": None, "named": None, "name": None,
                                               "look": None, "ask": None}
        if self.select is not None and self.attend_weight > 0:
            out["attend"] = attention_loss(self.select, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                           batch["targets"], coord_ids, image_token_id)
        if self.readout is not None:
            out["named"] = named_loss(self.readout, self.select.inputs[0], batch["labels"], batch["targets"], coord_ids)
        if self.first_hop is not None and self.look_weight > 0 and batch.get("asks"):
            out["ask"] = ask_loss(self.first_hop, batch["attention_mask"], batch["asks"])
        if self.first_hop is not None:
            out["gather"] = phrase_loss(self.first_hop, batch["labels"], batch["attention_mask"], batch["targets"],
                                        coord_ids)
        if self.chooser is not None and self.look_weight > 0 and batch.get("looks"):
            out["look"] = look_loss(self.chooser, batch["input_ids"], batch["attention_mask"], batch["looks"],
                                    image_token_id)
        if self.chooser is not None and self.name_weight > 0:
            out["name"] = naming_loss(self.chooser, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                      batch["targets"], image_token_id)
        return out

    def total(self, losses: dict[str, torch.Tensor | None]) -> torch.Tensor | float:
        weights = {"attend": self.attend_weight, "gather": self.gather_weight, "named": self.query_weight,
                   "name": self.name_weight, "look": self.look_weight, "ask": self.look_weight}
        return sum(weights[k] * v for k, v in losses.items() if v is not None)
