"""Feedback a hostile client sends: a comment or corrected answer is capped like a prompt, and
what no backend stores is refused in one line before anything is written."""
from __future__ import annotations

import pytest
from apptest_support import ALICE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.handlers import chat
from app.handlers.common import UserError, generation_settings
from app.validation import MAX_FEEDBACK_CHARS
from storage.models import FeedbackEventRow

# case -> (comment, corrected, the line)
CASES = {
    "a comment of 2,000,000 characters": ("x" * 2_000_000, "", "the comment is 2,000,000 characters; the limit is 8,000"),
    "a correction of 2,000,000 characters": ("", "y" * 2_000_000, "the corrected answer is 2,000,000 characters"),
    "one over the cap": ("z" * (MAX_FEEDBACK_CHARS + 1), "", "the limit is 8,000"),
    "a NUL in the comment": ("bad\x00", "", "the comment contains a NUL character"),
    "a lone surrogate in the correction": ("", "\udc80", "the corrected answer is not valid Unicode"),
    "a comment that is not text": ({"a": 1}, "", "the comment must be text"),
    "nothing at all": ("   ", None, "write a comment or a corrected answer first"),
}


@pytest.fixture
def answered(ctx):
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Say something.", [])
    return list(chat.respond(ctx, state, ALICE, generation_settings(0.0, 1.0, 4, 512)))[-1].state


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_feedback_is_one_line_and_stores_nothing(ctx, answered, case):
    comment, corrected, line = CASES[case]
    with pytest.raises(UserError) as e:
        chat.annotate(ctx, answered, ALICE, comment, corrected)
    assert line in str(e.value) and "\n" not in str(e.value)
    with Session(ctx.store.engine) as s:
        assert s.scalar(select(func.count()).select_from(FeedbackEventRow)) == 0
    assert answered.turns[-1].corrected is None


def test_feedback_at_the_cap_is_stored(ctx, answered):
    chat.annotate(ctx, answered, ALICE, "c" * MAX_FEEDBACK_CHARS, "d" * MAX_FEEDBACK_CHARS)
    assert answered.turns[-1].corrected == "d" * MAX_FEEDBACK_CHARS
