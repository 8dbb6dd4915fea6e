"""Losses the trainers choose between (`train.loss_per` in a run's YAML; `--loss-per-answer` in Gate A)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each answer's tokens, then over the answers of the batch: a 10-token
    grounding answer weighs as much as a 70-token detection list (per token, long answers dominate the
    loss and the short ones - counts, colours, boxes - learn late). An answer is a run of consecutive
    labelled positions, so each assistant turn of a multi-turn dialogue counts once.

    logits (B, L, V), labels (B, L) with IGNORE where nothing is learnt; shifted as causal LMs are."""
    target = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE,
                                reduction="none")                             # (B, L-1)
    counted = target != IGNORE
    before = torch.zeros_like(counted)
    before[:, 1:] = counted[:, :-1]
    starts = (counted & ~before).flatten()                                    # first token of each answer
    if not starts.any():
        return per_token.sum() * 0.0
    answer = (torch.cumsum(starts.long(), 0) - 1)[counted.flatten()]         # answer index of each counted token
    n = int(starts.sum())
    sums = per_token.new_zeros(n).index_add_(0, answer, per_token.flatten()[counted.flatten()])
    sizes = per_token.new_zeros(n).index_add_(0, answer, torch.ones_like(sums[answer]))
    return (sums / sizes).mean()
