"""What every tab's handlers share: the context, owners, user errors, uploads, settings, and
the one-shot question about one image that Grounding, Set-of-Mark and OCR are built on."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sphinx_model.conversation import Conversation, Message
from sphinx_model.image_processing import ImageError, KeyedImage, load_image
from sphinx_model.serving.generation import GenerationSettings
from sphinx_model.tiling import Canvas
from storage import Owner, Store

from ..records import RecordError, StoredImage, TurnRecord, put_image, save_exchange
from ..regions import PixelRegion, regions_in_pixels
from ..service import GenerationRequest, ModelService, ServiceError
from ..settings import AppSettings
from ..validation import MAX_PROMPT_CHARS, InputError, number, prompt_text  # noqa: F401  (MAX_PROMPT_CHARS: re-exported)


UserError = InputError
"""Something the user can fix; shown as one line, nothing stored is touched (the validators' error)."""


# Every error a handler lets through to the UI as a message (never as a traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ServiceError, RecordError, ImageError)


@dataclass
class AppContext:
    """What handlers work with: the one model service, the store, the settings."""

    service: ModelService
    store: Store
    settings: AppSettings
    hub_sync: Any = None  # app.hub_sync: the running FeedbackSync, a disabled SyncStatus, or None


# --- owners ---------------------------------------------------------------------------
def owner_key(browser_id: str | None, hf_user: str | None = None) -> str:
    """The owner of a page: the Hugging Face login when there is one, else the owner id of the
    browser's signed token (`owners.browser_owner_id`)."""
    if hf_user:
        return f"user:{hf_user}"
    if not browser_id or not isinstance(browser_id, str) or not 8 <= len(browser_id) <= 64 \
            or not browser_id.isalnum():
        raise UserError("this browser has no id yet; reload the page")
    return f"session:{browser_id}"


def api_owner_key(session_hash: str | None) -> str:
    """API clients own what they create within one gradio_client session."""
    if not session_hash:
        raise UserError("no session: call the API through gradio_client")
    return f"session:api:{session_hash}"


def owner_of(key: str | None) -> Owner:
    if not key or ":" not in key:
        raise UserError("this page has no owner yet; reload the page")
    kind, _, ident = key.partition(":")
    try:
        return Owner(kind, ident)  # type: ignore[arg-type]
    except ValueError as e:
        raise UserError(f"bad owner: {e}") from e


# --- inputs ---------------------------------------------------------------------------
def check_prompt(text: Any, what: str = "question") -> str:
    """`validation.prompt_text`: non-empty, capped, and storable (checked before the model runs)."""
    return prompt_text(text, what)


def generation_settings(temperature: Any, top_p: Any, max_new_tokens: Any, cap: int) -> GenerationSettings:
    t = number(temperature, "temperature", 0.0, 2.0)
    p = number(top_p, "top-p", 0.0, 1.0)
    if p <= 0.0:
        raise InputError("top-p must be in (0, 1]")
    n = number(max_new_tokens, "max new tokens", 1, cap, integer=True)
    return GenerationSettings(max_new_tokens=int(n), temperature=float(t), top_p=float(p))


def upload_path(value: Any) -> Path:
    """A path from what Gradio hands over for an upload (a path string or a file dict)."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    if not value:
        raise UserError("no file: upload one first")
    path = Path(str(value))
    if not path.is_file():
        raise UserError("the uploaded file is gone; upload it again")
    return path


def keep_upload(ctx: AppContext, owner: Owner, value: Any) -> StoredImage:
    """Check an upload (clear message if it is not a usable image) and keep it in the store.

    The stored copy (EXIF orientation applied, metadata dropped) is what the model reads, what
    boxes are drawn on, and what History reopens, so all three always agree.
    """
    path = upload_path(value)
    data = path.read_bytes()
    if ctx.store.images.seen(data) is None:      # the same bytes kept before passed this check
        try:
            load_image(path, max_pixels=_upload_limit(ctx))
        except ImageError as e:
            raise UserError(str(e).replace(str(path), path.name)) from e
    return put_image(ctx.store, owner, data)


def store_upload(ctx: AppContext, owner: Owner, value: Any) -> tuple[StoredImage, Image.Image]:
    """`keep_upload`, and the stored copy decoded as the model will see it."""
    stored = keep_upload(ctx, owner, value)
    return stored, load_stored(stored, _upload_limit(ctx))


def _upload_limit(ctx: AppContext) -> int:
    return min(ctx.settings.max_pixels, ctx.service.max_pixels)


def load_stored(stored: StoredImage, max_pixels: int) -> Image.Image:
    try:
        return load_image(stored.path, max_pixels=max_pixels)
    except ImageError as e:
        raise UserError("a stored image can no longer be read; start a new chat") from e


def for_model(stored: StoredImage, max_pixels: int, decoded: Image.Image | None = None) -> KeyedImage:
    """A stored picture as the model service takes it: known by its file's sha256, so every turn
    and tab asking about it shares one canvas and one set of visual tokens, and read and decoded
    only when the service has neither (`decoded`: the copy a handler already holds)."""
    return KeyedImage(stored.sha256, (lambda: decoded) if decoded is not None else
                      (lambda: load_stored(stored, max_pixels)))


def store_image(ctx: AppContext, owner: Owner, image: Image.Image) -> StoredImage:
    """Keep a picture the app made (a rendered PDF page) losslessly."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return put_image(ctx.store, owner, buf.getvalue())


# --- one question about one image -------------------------------------------------------
@dataclass
class OneShot:
    """The model's answer about one image, with the regions it names in that image's pixels."""

    prompt: str
    text: str
    image: Image.Image
    canvas: Canvas
    regions: list[PixelRegion] = field(default_factory=list)
    latency_ms: float | None = None
    conversation_id: str | None = None
    message_id: int | None = None


def ask_image(ctx: AppContext, owner: Owner, image: Image.Image, stored: StoredImage, prompt: str,
              task: str, extra: dict[str, Any] | None = None) -> OneShot:
    """Ask `prompt` about `image` (greedy), store the exchange, map the answer's regions."""
    conv = Conversation([Message.user(prompt, image=stored.sha256)])
    settings = GenerationSettings(max_new_tokens=ctx.settings.task_max_new_tokens)
    request = GenerationRequest(conv, [for_model(stored, ctx.service.max_pixels, image)], settings,
                                user=f"{owner.kind}:{owner.id}")
    text = ctx.service.generate(request)
    canvas = ctx.service.geometry(*image.size)
    regions = regions_in_pixels(text, canvas)
    saved = save_exchange(ctx.store, owner, None, ctx.service.info, TurnRecord(
        prompt=prompt, answer=text, images=[stored.sha256],
        regions=[{**r.to_dict(), "image": stored.sha256} for r in regions],
        settings={**settings.to_dict(), "task": task, **(extra or {})},
        latency_ms=request.latency_ms, stopped=request.cancelled))
    return OneShot(prompt, text, image, canvas, regions, request.latency_ms, saved.conversation_id,
                   saved.assistant_message_id)
