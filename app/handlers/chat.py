"""Chat: multi-turn conversations about images, streamed, stoppable, stored, rated.

The browser's conversation lives in a `ChatState` (one per page). A turn goes through
`submit` (cheap: checks the text and images, keeps the images, adds a pending turn) and then
`respond` (the model: streams the answer, stores the exchange when it ends, however it
ends). `stop` cancels the pending turn's request in the service; the decoding thread ends
and `respond` stores what was generated, flagged as stopped.

Undo and Regenerate change what the model sees next; the store keeps every exchange that
was answered (a regenerated answer records which one it replaced), so nothing stored is lost.
"""
from __future__ import annotations

import html
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sphinx_model.conversation import Conversation, Message, Part
from sphinx_model.serving.generation import GenerationSettings
from storage import Owner

from ..grounded import grounded
from ..records import (RecordError, SavedTurn, StoredImage, StoredTurn, TurnRecord, begin_exchange, discard_exchange,
                       finish_exchange, record_feedback, write_answer)
from ..regions import PixelRegion, regions_in_pixels
from ..render import draw_regions
from ..service import GenerationRequest, ServiceError
from ..validation import like_event, optional_text
from .common import AppContext, UserError, check_prompt, for_model, load_stored, owner_of, keep_upload

STOPPED_NOTE = "(stopped)"
INTERRUPTED_NOTE = "(interrupted: the app stopped before this answer was finished)"
PARTIAL_WRITE_S = 1.0     # while an answer streams, what is written so far is stored at once, then this often


@dataclass
class Turn:
    prompt: str
    images: list[StoredImage] = field(default_factory=list)   # images given with this prompt
    answer: str = ""
    message_id: int | None = None        # the stored assistant message
    stopped: bool = False
    pending: bool = True
    interrupted: bool = False            # stored ahead, and the app stopped before the answer was complete
    draft: SavedTurn | None = None       # the turn as written ahead when its prompt was submitted
    rating: str | None = None
    corrected: str | None = None
    regions: list[PixelRegion] = field(default_factory=list)
    regenerate_of: int | None = None


@dataclass
class ChatState:
    """One page's conversation. Deep-copied by Gradio per session; holds no model objects."""

    conversation_id: str | None = None
    turns: list[Turn] = field(default_factory=list)
    request_id: str | None = None
    feedback_turn: int | None = None     # which answer the comment / correction box is about

    @property
    def busy(self) -> bool:
        return bool(self.turns) and self.turns[-1].pending

    def images(self, upto: int | None = None) -> list[StoredImage]:
        turns = self.turns if upto is None else self.turns[: upto + 1]
        return [im for t in turns for im in t.images]


@dataclass
class ChatView:
    """One update of the Chat tab, as plain data (ui.py turns it into component values)."""

    state: ChatState
    status: str
    done: bool = True
    error: str | None = None
    restore: dict[str, Any] | None = None   # put back into the input box (after an error or undo)


# --- the conversation as the model and the Chatbot see it ------------------------------
def to_conversation(state: ChatState) -> Conversation:
    """Turns -> the shared schema; a corrected answer replaces the model's in later context."""
    messages: list[Message] = []
    for t in state.turns:
        parts = [Part.of_image(im.sha256) for im in t.images] + [Part.of_text(t.prompt)]
        messages.append(Message("user", tuple(parts)))
        if not t.pending:
            messages.append(Message.assistant(t.corrected or t.answer))
    return Conversation(messages, id=state.conversation_id)


def display_text(text: str) -> str:
    """Model or user text for the Chatbot: HTML is escaped, so nothing in it runs or renders."""
    return html.escape(text, quote=False)


def chat_messages(state: ChatState) -> list[dict[str, Any]]:
    """Chatbot messages: exactly two per turn (user, assistant), so an index maps to a turn."""
    out: list[dict[str, Any]] = []
    for t in state.turns:
        content: list[Any] = [{"path": str(im.shown)} for im in t.images if im.shown] + [display_text(t.prompt)]
        out.append({"role": "user", "content": content})
        answer = grounded(t.answer).markdown() if t.answer else ("…" if t.pending else "")  # escaped, boxes as tags
        if t.stopped:
            answer += f"\n\n*{STOPPED_NOTE}*"
        if t.interrupted:
            answer += f"\n\n*{INTERRUPTED_NOTE}*"
        if t.corrected:
            answer += f"\n\n*corrected:* {display_text(t.corrected)}"
        out.append({"role": "assistant", "content": answer})
    return out


FEEDBACK_SHOWN = {"like": "Like", "dislike": "Dislike"}   # stored rating -> the Chatbot's feedback option


def feedback_values(state: ChatState) -> list[str | None]:
    """The rating each answer shows (one entry per assistant message, in order), so a re-drawn
    chat keeps its thumbs where the user put them."""
    return [FEEDBACK_SHOWN.get(t.rating or "") for t in state.turns]


def turn_of_message(state: ChatState, index: Any) -> int:
    """The turn an assistant message index (from a like / edit event) belongs to."""
    if isinstance(index, (list, tuple)):
        index = index[0]
    if not isinstance(index, int) or index < 0 or index // 2 >= len(state.turns) or index % 2 != 1:
        raise UserError("only answers can be rated")
    return index // 2


def overlay(ctx: AppContext, state: ChatState) -> Image.Image | None:
    """The last answered turn's boxes and points, drawn on the latest image up to that turn."""
    for k in range(len(state.turns) - 1, -1, -1):
        t = state.turns[k]
        if t.pending:
            continue
        images = state.images(k)
        if not images:
            return None
        return draw_regions(load_stored(images[-1], ctx.service.max_pixels), t.regions)
    return None


# --- a turn ------------------------------------------------------------------------------
def submit(ctx: AppContext, state: ChatState, owner_key: str, text: Any, files: Any) -> ChatState:
    """Check and keep the new prompt and images; add a pending turn (no model work here)."""
    if state.busy:
        raise UserError("an answer is still being written: wait for it or press Stop")
    owner = owner_of(owner_key)
    prompt = check_prompt(text)
    paths = list(files or [])
    total = len(state.images()) + len(paths)
    limit = ctx.service.info.max_images
    if paths and total > limit:
        raise UserError(f"this model takes {limit} image{'s' * (limit != 1)} per conversation; "
                        "press Clear to start a new chat about another image")
    images = [keep_upload(ctx, owner, p) for p in paths]
    turn = Turn(prompt, images)
    candidate = ChatState(state.conversation_id, [*state.turns, turn])
    ctx.service.check(_request(ctx, candidate, GenerationSettings(max_new_tokens=1)))
    _write_ahead(ctx, state, owner, turn)          # the prompt is in the store before the model runs
    state.turns.append(turn)
    state.request_id = _new_request_id()
    return state


def _write_ahead(ctx: AppContext, state: ChatState, owner: Owner, turn: Turn) -> None:
    """Store the turn now (prompt and images; the answer empty and marked interrupted)."""
    settings = {"task": "chat", **({"regenerate_of": turn.regenerate_of} if turn.regenerate_of else {})}
    turn.draft = begin_exchange(ctx.store, owner, state.conversation_id, ctx.service.info, turn.prompt,
                                [im.sha256 for im in turn.images], settings)
    state.conversation_id = turn.draft.conversation_id


def _new_request_id() -> str:
    import uuid

    return uuid.uuid4().hex


def _request(ctx: AppContext, state: ChatState, settings: GenerationSettings,
             request_id: str | None = None, user: str | None = None) -> GenerationRequest:
    limit = ctx.service.max_pixels
    images = [for_model(im, limit) for im in state.images()]    # decoded only if the service has not seen it
    req = GenerationRequest(to_conversation(state), images, settings, user=user)
    if request_id:
        req.id = request_id
    return req


def respond(ctx: AppContext, state: ChatState, owner_key: str, settings: GenerationSettings) -> Iterator[ChatView]:
    """Stream the pending turn's answer; store it when it ends (finished, stopped or cut off)."""
    if not state.busy:
        yield ChatView(state, "Nothing to answer: type a question.")
        return
    turn = state.turns[-1]
    owner = owner_of(owner_key)
    request = _request(ctx, state, settings, state.request_id, user=owner_key)
    saved = False
    if turn.draft is None:          # a regenerated turn: written ahead here, before the model runs
        try:
            _write_ahead(ctx, state, owner, turn)
        except RecordError as e:
            state.turns.pop()
            state.request_id = None
            yield ChatView(state, f"⚠ {e}", error=str(e), restore=_restore(turn))
            return

    def finish() -> None:
        nonlocal saved
        turn.answer, turn.stopped, turn.pending = request.text, request.cancelled, False
        images = state.images()
        if images:
            turn.regions = regions_in_pixels(turn.answer, ctx.service.geometry(images[-1].width, images[-1].height))
        finish_exchange(ctx.store, owner, turn.draft.assistant_message_id, ctx.service.info, TurnRecord(
            prompt=turn.prompt, answer=turn.answer, images=[im.sha256 for im in turn.images],
            regions=[{**r.to_dict(), "image": images[-1].sha256} for r in turn.regions] if images else None,
            settings={**settings.to_dict(), "task": "chat",
                      **({"regenerate_of": turn.regenerate_of} if turn.regenerate_of else {})},
            latency_ms=request.latency_ms, stopped=turn.stopped))
        turn.message_id, state.request_id = turn.draft.assistant_message_id, None
        saved = True

    written, last_write = "", time.monotonic()
    try:
        with closing(ctx.service.stream(request)) as pieces:
            for piece in pieces:
                turn.answer = request.text
                if turn.answer != written and (not written or time.monotonic() - last_write >= PARTIAL_WRITE_S):
                    written, last_write = _write_partial(ctx, owner, turn), time.monotonic()
                yield ChatView(state, f"Writing… ({len(turn.answer)} characters)", done=False)
        finish()
    except (ServiceError, RecordError) as e:
        state.turns.pop()
        state.request_id = None
        _settle_failed(ctx, owner, turn)
        yield ChatView(state, f"⚠ {e}", error=str(e), restore=_restore(turn))
        return
    finally:
        if not saved and turn.pending and state.turns and state.turns[-1] is turn:
            request.cancelled = True          # the client went away mid-stream: keep what we have
            try:
                finish()
            except RecordError:
                pass
    yield ChatView(state, _status(turn, request))


def _restore(turn: Turn) -> dict[str, Any]:
    return {"text": turn.prompt, "files": [str(im.shown) for im in turn.images if im.shown]}


def _write_partial(ctx: AppContext, owner: Owner, turn: Turn) -> str:
    """Store the answer written so far (a store that refuses it now is told again at the end)."""
    try:
        write_answer(ctx.store, owner, turn.draft.assistant_message_id, turn.answer)
    except RecordError:
        pass
    return turn.answer


def _settle_failed(ctx: AppContext, owner: Owner, turn: Turn) -> None:
    """A request that failed (the model, the queue, the store): the turn written ahead leaves the
    store, and its prompt goes back to the input box to be sent again, so one question is never
    stored twice."""
    if turn.draft is None:
        return
    try:
        discard_exchange(ctx.store, owner, turn.draft)
    except RecordError:
        pass                 # left as written ahead: History shows it as interrupted


def _status(turn: Turn, request: GenerationRequest) -> str:
    secs = (request.latency_ms or 0.0) / 1000.0
    if turn.stopped:
        return f"Stopped after {secs:.1f} s; the partial answer is kept (and stored as stopped)."
    return f"Answered in {secs:.1f} s."


def stop(ctx: AppContext, state: ChatState) -> str:
    """Cancel the pending turn's request (if any); `respond` then stores the partial answer."""
    if state.request_id:
        ctx.service.cancel(state.request_id)
        return "Stopping…"
    return "Nothing is being generated."


def regenerate(ctx: AppContext, state: ChatState) -> ChatState:
    """Ask the last prompt again; the new answer replaces the old one in the conversation."""
    if state.busy:
        raise UserError("an answer is still being written: wait for it or press Stop")
    if not state.turns:
        raise UserError("nothing to regenerate yet")
    last = state.turns.pop()
    state.turns.append(Turn(last.prompt, last.images, regenerate_of=last.message_id))
    state.request_id = _new_request_id()
    return state


def undo(state: ChatState) -> ChatView:
    """Drop the last exchange from the conversation; its prompt goes back into the input box."""
    if state.busy:
        raise UserError("an answer is still being written: wait for it or press Stop")
    if not state.turns:
        raise UserError("nothing to undo")
    last = state.turns.pop()
    state.feedback_turn = None
    return ChatView(state, "Undone: the last exchange is out of the conversation (it stays in the store).",
                    restore={"text": last.prompt, "files": [str(im.shown) for im in last.images if im.shown]})


def clear() -> ChatState:
    return ChatState()


# --- feedback ---------------------------------------------------------------------------
def rate_event(ctx: AppContext, state: ChatState, owner_key: str, evt: Any) -> ChatView:
    """A like / dislike as the Chatbot's like event sends it (its data checked first)."""
    index, liked = like_event(evt)
    return rate(ctx, state, owner_key, index, liked)


def rate(ctx: AppContext, state: ChatState, owner_key: str, index: Any, liked: Any) -> ChatView:
    """A like / dislike on an answer (clicking the same verdict again clears it)."""
    k = turn_of_message(state, index)
    turn = state.turns[k]
    if turn.message_id is None:
        raise UserError("this answer is not stored yet: wait until it is finished")
    verdict = "like" if liked is True or str(liked).lower() == "like" else "dislike"
    if liked is None or liked == "":
        verdict = None
    record_feedback(ctx.store, owner_of(owner_key), turn.message_id, rating=verdict)
    turn.rating, state.feedback_turn = verdict, k
    return ChatView(state, f"Feedback stored: {verdict or 'rating cleared'} on answer {k + 1}.")


def annotate(ctx: AppContext, state: ChatState, owner_key: str, comment: str, corrected: str) -> ChatView:
    """A comment and/or corrected answer on the answer last rated (else the latest answer)."""
    answered = [k for k, t in enumerate(state.turns) if t.message_id is not None]
    if not answered:
        raise UserError("no stored answer to comment on yet")
    k = state.feedback_turn if state.feedback_turn in answered else answered[-1]
    comment, corrected = optional_text(comment, "comment"), optional_text(corrected, "corrected answer")
    if not comment and not corrected:
        raise UserError("write a comment or a corrected answer first")
    turn = state.turns[k]
    record_feedback(ctx.store, owner_of(owner_key), turn.message_id,
                    **({"comment": comment} if comment else {}),
                    **({"corrected": corrected} if corrected else {}))
    if corrected:
        turn.corrected = corrected
    return ChatView(state, f"Feedback stored on answer {k + 1}" + (" (corrected answer kept)." if corrected else "."))


# --- History -> Chat --------------------------------------------------------------------
def from_history(ctx: AppContext, conversation_id: str, turns: list[StoredTurn]) -> ChatState:
    """A stored conversation, ready to be continued (its images reopened from the store)."""
    state = ChatState(conversation_id=conversation_id)
    for st in turns:
        t = Turn(st.prompt, list(st.images), st.answer, st.assistant_message_id, st.stopped, pending=False,
                 rating=st.rating, corrected=st.corrected, interrupted=st.interrupted)
        state.turns.append(t)
        images = state.images()
        if images:
            t.regions = regions_in_pixels(t.answer, ctx.service.geometry(images[-1].width, images[-1].height))
    return state


def last_answer(state: ChatState) -> str:
    """The model's exact text of the last answered turn ("" when there is none)."""
    done = [t for t in state.turns if not t.pending]
    return done[-1].answer if done else ""


def last_regions(state: ChatState) -> list[PixelRegion]:
    done = [t for t in state.turns if not t.pending]
    return done[-1].regions if done else []
