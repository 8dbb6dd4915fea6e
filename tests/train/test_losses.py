"""The per-answer loss: every assistant turn weighs the same, however many tokens it has."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import answer_mean_loss


def _ce(logit_row: list[float], target: int) -> torch.Tensor:
    return F.cross_entropy(torch.tensor([logit_row]), torch.tensor([target]))


def test_each_turn_of_a_dialogue_weighs_once_whatever_its_length():
    logits = torch.zeros(1, 9, 4)
    logits[0, :, 1] = 5.0                                            # the model always says 1
    # one row, two answers: a one-token answer (right) and a four-token answer (wrong), a user turn between
    labels = torch.tensor([[-100, 1, -100, -100, 3, 3, 3, 3, -100]])
    right, wrong = _ce([0.0, 5.0, 0.0, 0.0], 1), _ce([0.0, 5.0, 0.0, 0.0], 3)
    assert torch.allclose(answer_mean_loss(logits, labels), (right + wrong) / 2)
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    assert torch.allclose(per_token, (right + 4 * wrong) / 5)      # the long answer would weigh 4x


def test_answers_of_other_rows_count_apart_and_nothing_to_learn_is_zero_with_a_gradient():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[-100, 2, 2, -100, -100], [-100, -100, -100, 4, 5]])
    loss = answer_mean_loss(logits, labels)
    first = F.cross_entropy(logits[0, 0:2], labels[0, 1:3])
    second = F.cross_entropy(logits[1, 2:4], labels[1, 3:5])
    assert torch.allclose(loss, (first + second) / 2)
    empty = answer_mean_loss(logits, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None
