"""The flat API endpoints (`/chat`, `/ground`, `/som`, `/ocr`): files and text in, text and
JSON out, so a gradio_client user never has to send a Chatbot history back.

They run the same handlers as the tabs. The owner is the caller's gradio_client session
(`api_owner_key`): a client continues the conversations it started and sees nobody else's;
no endpoint takes an owner or a browser id as a parameter.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..records import load_turns
from ..validation import conversation_id as checked_conversation_id
from . import chat, grounding, ocr, som
from .common import AppContext, UserError, check_prompt, generation_settings, keep_upload, owner_of


def _files(images: Any) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def chat_stream(ctx: AppContext, owner_key: str, message: str, images: Any, conversation_id: str,
                temperature: float, top_p: float, max_new_tokens: int) -> Iterator[tuple[str, str, list[dict]]]:
    """Yields (answer so far, conversation id, regions of the answer) as the answer streams."""
    settings = generation_settings(temperature, top_p, max_new_tokens, ctx.settings.max_new_tokens)
    conversation_id = checked_conversation_id(conversation_id)
    if conversation_id:
        state = chat.from_history(ctx, conversation_id, load_turns(ctx.store, owner_of(owner_key), conversation_id))
    else:
        state = chat.ChatState()
    state = chat.submit(ctx, state, owner_key, message, _files(images))
    for view in chat.respond(ctx, state, owner_key, settings):
        if view.error:
            raise UserError(view.error)
        turn = state.turns[-1]
        regions = [r.to_dict() for r in turn.regions] if view.done else []
        yield turn.answer, state.conversation_id or "", regions


def ground(ctx: AppContext, owner_key: str, image: Any, phrase: str) -> dict[str, Any]:
    """Boxes for `phrase` (empty: every object), in pixels and in the model's text format."""
    result = grounding.ground(ctx, owner_key, image, phrase, detect_all=not (phrase or "").strip())
    return result.payload


def set_of_mark(ctx: AppContext, owner_key: str, image: Any, question: str, marks: str) -> dict[str, Any]:
    """Ask about marks: `marks` is 'model', 'opencv', 'both' (automatic) or a JSON list of
    [x, y] points / [x0, y0, x1, y1] boxes in pixels."""
    question = check_prompt(question)
    spec = (marks or "opencv").strip() if isinstance(marks, str) else marks
    if spec not in som.SOURCES:     # checked before the upload is kept
        som.marks_from_spec(spec, 1, 1)
    stored = keep_upload(ctx, owner_of(owner_key), image)
    state = som.MarksState(image=stored)
    if spec in som.SOURCES:
        state = som.auto_marks(ctx, owner_key, state, spec)
    else:
        state.marks = som.marks_from_spec(spec, stored.width, stored.height)
    answer = som.ask(ctx, owner_key, state, question)
    return {"answer": answer.shot.text, "named_marks": answer.named,
            "marks": [{"number": m.number, "pixels": [round(v, 1) for v in m.pixels], "source": m.source}
                      for m in state.marks],
            "regions": [r.to_dict() for r in answer.shot.regions], "latency_ms": answer.shot.latency_ms}


def read_document(ctx: AppContext, owner_key: str, file: Any, page: int, mode: str) -> dict[str, Any]:
    """Read one page of an image or PDF; `mode` is 'read', 'spot' or 'both'."""
    doc, note = ocr.open_upload(ctx, file)
    result = ocr.read(ctx, owner_key, doc, page, mode or "both")
    return {"text": result.reading, "words": [{"word": w, "box": b} for w, *b in result.spotted],
            "embedded_text": result.embedded, "similarity": result.score, "pages": doc.pages, "note": note}
