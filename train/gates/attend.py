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

from dataclasses import dataclass

import torch
from torch import nn

from ..world.scene import WorldObject
from ..world.vocab import COLOUR_NAMES, SHAPES, SIZES
from .oracle import COLOUR, OBJ, SHAPE, SIZE


@dataclass
class BoxTarget:
    """The visual slots (indices among one image's visual positions, layout order) of the object
    that one box of the answer is about; boxes in answer order."""
    slots: list[int]


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
        q = _rotate(q, cos[row, queries].float(), sin[row, queries].float())
        k = _rotate(k, cos[row].float(), sin[row].float())
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


def attention_loss(probe: HeadAttention, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor, targets: list[list[BoxTarget]], coord_ids: torch.Tensor,
                   image_token_id: int) -> torch.Tensor | None:
    """Mean over the coordinate-writing positions of -log(attention mass on that box's object).

    The answer's coordinates come in fours, one box each, in the order of `targets[row]`. A row whose
    count of coordinates does not match its targets (or that has no targets) is left out. None where
    no row counts."""
    losses = []
    for row, boxes in enumerate(targets):
        writes = _coordinate_writes(labels[row], coord_ids)
        if not boxes or len(writes) != 4 * len(boxes):
            continue
        image_at = (input_ids[row] == image_token_id).nonzero()[:, 0]
        queries, wanted = [], []
        for b, box in enumerate(boxes):
            if box.slots:
                queries += writes[4 * b:4 * b + 4].tolist()
                wanted += [image_at[box.slots]] * 4
        if queries:
            losses += _mass_losses(probe, row, queries, wanted, attention_mask[row].bool())
    return torch.stack(losses).mean() if losses else None


def phrase_loss(probe: HeadAttention, labels: torch.Tensor, attention_mask: torch.Tensor,
                phrases: list[list[int]], coord_ids: torch.Tensor) -> torch.Tensor | None:
    """Mean over the coordinate-writing positions of -log(attention mass on the question's naming
    words): the first hop, which brings what the question names to where the box is written. Rows
    without a phrase (detection) are left out; None where no row counts."""
    losses = []
    for row, phrase in enumerate(phrases):
        writes = _coordinate_writes(labels[row], coord_ids).tolist()
        if phrase and writes:
            cols = torch.tensor(phrase, device=labels.device)
            losses += _mass_losses(probe, row, writes, [cols] * len(writes), attention_mask[row].bool())
    return torch.stack(losses).mean() if losses else None


def phrase_positions(input_ids: list[int], words: list[int]) -> list[int]:
    """Where the token ids `words` (a phrase's naming words) last occur, contiguously, in `input_ids`
    (empty if they do not)."""
    n = len(words)
    for start in range(len(input_ids) - n, -1, -1):
        if input_ids[start:start + n] == words:
            return list(range(start, start + n))
    return []


ATTRIBUTE_WORDS = (*SHAPES, *COLOUR_NAMES, *SIZES)


def named_words(phrase: str) -> list[int]:
    """Indices in ATTRIBUTE_WORDS of the words a grounding phrase names ("the small red circle")."""
    return [ATTRIBUTE_WORDS.index(w) for w in phrase.split() if w in ATTRIBUTE_WORDS]


def named_loss(readout: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, named: list[list[int]],
               coord_ids: torch.Tensor) -> torch.Tensor | None:
    """Binary cross-entropy of a linear read-out of the hidden states (B, L, d) at the coordinate-writing
    positions against the attribute words the question names: the selecting head's query can only
    match what its input holds (`python -m train.gates.probe` found it held the named colour at
    chance). Rows without named words (detection) are left out; None where no row counts."""
    xs, ys = [], []
    for row, words in enumerate(named):
        writes = _coordinate_writes(labels[row], coord_ids)
        if not words or not len(writes):
            continue
        target = torch.zeros(len(ATTRIBUTE_WORDS), device=hidden.device)
        target[words] = 1.0
        xs.append(hidden[row, writes])
        ys.append(target.expand(len(writes), -1))
    if not xs:
        return None
    logits = readout(torch.cat(xs).float())
    return nn.functional.binary_cross_entropy_with_logits(logits, torch.cat(ys), reduction="sum") / len(logits)
