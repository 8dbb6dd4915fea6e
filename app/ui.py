"""One gr.Blocks layout and its event wiring; the work is done in `app.handlers`.

Stable `elem_id`s (for browser tests; `#ID textarea`, `#ID input[type=file]`, ...):

    header        model-info, noise-banner (random weights only), model-card (when the model has
                  a card), login (on a Space), tabs, tab-chat, tab-grounding, tab-som, tab-ocr, tab-history
    Chat          chat-chatbot, chat-input (MultimodalTextbox), chat-stop, chat-regenerate, chat-undo,
                  chat-clear, chat-temperature, chat-top-p, chat-max-new-tokens, chat-status,
                  chat-overlay (boxes of the last answer), chat-grounded (its phrases in their boxes'
                  colours), chat-raw (its exact text), chat-regions (their table), chat-comment,
                  chat-corrected, chat-feedback-send, chat-examples, chat-image-note
    Grounding     ground-image, ground-phrase, ground-find, ground-detect, ground-output, ground-table,
                  ground-json, ground-grounded, ground-answer, ground-status, ground-examples
    Set-of-Mark   som-image, som-source, som-auto, som-click-mode, som-clear, som-canvas (click to
                  mark), som-question, som-ask, som-grounded, som-answer, som-status, som-examples
    Document OCR  ocr-file, ocr-note, ocr-page, ocr-mode, ocr-run, ocr-page-image, ocr-text,
                  ocr-download, ocr-words, ocr-embedded, ocr-score, ocr-status, ocr-examples
    History       history-list, history-refresh, history-open, history-delete, history-status
    Host          tab-host (only the host sees it; see host_panel.py), host-summary, host-table,
                  host-plot, host-corrections, host-sync, host-refresh, host-export, host-export-file

Events: UI events are private (not callable through gradio_client); the public API is
`/chat` (streaming), `/ground`, `/som`, `/ocr` on hidden components (see handlers/api.py), and
`/host_overview`, `/host_export` for a client sending the host's token (host_panel.py).
Model work shares one concurrency group (`model`, as wide as the service's batch); cheap events
skip the queue.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from . import host_panel
from . import tabs as layout
from .handlers import api, history
from .handlers.common import AppContext, api_owner_key, owner_key
from .examples import load_examples
from .gradio_errors import AppBlocks
from .owners import browser_owner_id, new_browser_token, server_key
from .settings import AppSettings
from .wiring import CHEAP, MODEL, guard, model_group, soft  # noqa: F401  (MODEL, soft: part of the layout's interface)

STORAGE_KEY = "sphinx-x-owner"  # BrowserState key: the per-browser token, signed by the server (owners.py)
CSS = ("#noise-banner {background: #fff3cd; border: 1px solid #e0b000; padding: 6px 12px; border-radius: 6px}\n"
       # a rated answer must read as rated at a glance (Gradio marks it only by a filled icon)
       "#chat-chatbot button[aria-label='Liked'] {background: #dcfce7 !important; "
       "box-shadow: 0 0 0 2px #16a34a; border-radius: 4px}\n"
       "#chat-chatbot button[aria-label='Disliked'] {background: #fee2e2 !important; "
       "box-shadow: 0 0 0 2px #dc2626; border-radius: 4px}")


def _header(ctx: AppContext) -> None:
    info = ctx.service.info
    url = info.card_url or (f"/gradio_api/file={info.card_path}" if info.card_path else None)
    name = f"[{info.name}]({url})" if url else f"`{info.name}`"
    images = f"{info.max_images} image{'s' * (info.max_images != 1)} per conversation"
    ident = f" · `{info.model_id}`" if info.model_id != info.name else ""   # a preset's id is its name
    gr.Markdown(f"## SPHINX-X\n**Model:** {name}{ident} · version `{info.version}` · "
                f"{images} · boxes on a {info.anchor} canvas", elem_id="model-info")
    if ctx.settings.on_space:   # the Hugging Face login owns History on a Space (needs hf_oauth: true)
        gr.LoginButton(elem_id="login")
    gr.Markdown(f"⚠ **`{info.name}` has random weights: its answers are noise.** Start the app with "
                "`--model` pointing at a trained checkpoint for real answers.",
                elem_id="noise-banner", visible=info.random_weights)
    if info.card_path is not None:
        with gr.Accordion("Model card", open=False, elem_id="model-card"):
            gr.Markdown(info.card_path.read_text(encoding="utf-8", errors="replace"))


def build_demo(settings: AppSettings, context: AppContext) -> gr.Blocks:
    """The whole app, queue configured, over `context` (the model service and the store:
    `launch.build_context`)."""
    ctx = context
    examples = load_examples()
    with AppBlocks(title="SPHINX-X") as demo:
        browser_id = gr.BrowserState("", storage_key=STORAGE_KEY, secret=settings.secret())
        owner = gr.State("")
        _header(ctx)
        with gr.Tabs(selected="tab-chat", elem_id="tabs") as tabs:
            with gr.Tab("Chat", id="tab-chat", elem_id="tab-chat"):
                c = layout.chat_tab(ctx, owner, examples)
            with gr.Tab("Grounding", id="tab-grounding", elem_id="tab-grounding"):
                layout.grounding_tab(ctx, owner, examples)
            with gr.Tab("Set-of-Mark", id="tab-som", elem_id="tab-som"):
                layout.som_tab(ctx, owner, examples)
            with gr.Tab("Document OCR", id="tab-ocr", elem_id="tab-ocr"):
                layout.ocr_tab(ctx, owner, examples)
            with gr.Tab("History", id="tab-history", elem_id="tab-history"):
                h = layout.history_tab(ctx, owner, tabs, c)
            with gr.Tab("Host", id="tab-host", elem_id="tab-host", visible=False) as host_tab:
                granted = gr.State(False)   # server-side: whether this page is the host's
                hp = host_panel.host_tab(ctx, granted)
        for event in c["answered"]:
            event.then(guard(lambda key: gr.update(choices=_history_choices(ctx, key))),
                       inputs=[owner], outputs=[h["list"]], **CHEAP)
        _api(ctx)
        host_panel.host_api(ctx)
        _on_load(demo, ctx, settings, browser_id, owner, h["list"])
        host_panel.grant_on_load(demo, ctx, host_tab, granted, hp)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=4)
    demo.sphinx_context = ctx  # type: ignore[attr-defined]  # for tests and the launcher
    return demo


def _history_choices(ctx: AppContext, key: str) -> list[tuple[str, str]]:
    return history.choices(history.listing(ctx, key)) if key else []


def _on_load(demo: gr.Blocks, ctx: AppContext, settings: AppSettings, browser_id: gr.BrowserState,
             owner: gr.State, history_list: gr.Dropdown) -> None:
    """Give the browser an id (kept across reloads), or take the Hugging Face login on a Space."""
    signing = server_key(settings.data_dir)

    def resolve(stored: str, hf_user: str | None) -> tuple[str, str, Any]:
        ident = browser_owner_id(stored, signing)       # None: forged, altered or never issued here
        if ident is None:
            stored = new_browser_token(signing)
            ident = browser_owner_id(stored, signing)
        key = owner_key(ident, hf_user)
        return stored, key, gr.update(choices=_history_choices(ctx, key), value=None)

    if settings.on_space:
        def on_load(stored: str, profile: gr.OAuthProfile | None) -> tuple[str, str, Any]:
            return resolve(stored, profile.username if profile is not None else None)
    else:
        def on_load(stored: str) -> tuple[str, str, Any]:
            return resolve(stored, None)
    demo.load(guard(on_load), inputs=[browser_id], outputs=[browser_id, owner, history_list], **CHEAP)


# --- the public API ------------------------------------------------------------------------
def _api(ctx: AppContext) -> None:
    """Hidden components carrying the flat endpoints; the owner is the caller's API session."""
    with gr.Column(visible=False):
        message = gr.Textbox(label="message")
        images = gr.File(label="images", file_count="multiple", file_types=["image"], type="filepath")
        conversation = gr.Textbox(label="conversation_id")
        temperature = gr.Number(0.0, label="temperature")
        top_p = gr.Number(1.0, label="top_p")
        max_new = gr.Number(128, label="max_new_tokens", precision=0)
        answer = gr.Textbox(label="answer")
        conversation_out = gr.Textbox(label="conversation_id")
        regions = gr.JSON(label="regions")
        image = gr.File(label="image", file_types=["image"], type="filepath")
        phrase = gr.Textbox(label="phrase")
        question = gr.Textbox(label="question")
        marks = gr.Textbox("opencv", label="marks")
        document = gr.File(label="file", file_types=["image", ".pdf"], type="filepath")
        page = gr.Number(1, label="page", precision=0)
        mode = gr.Textbox("both", label="mode")
        result = gr.JSON(label="result")
        buttons = [gr.Button(f"api-{n}") for n in ("chat", "ground", "som", "ocr")]

    @guard
    def api_chat(message: str, images: list[str] | None, conversation_id: str, temperature: float,
                 top_p: float, max_new_tokens: int, request: gr.Request):
        yield from api.chat_stream(ctx, api_owner_key(request.session_hash), message, images,
                                   conversation_id or "", temperature, top_p, max_new_tokens)

    @guard
    def api_ground(image: str, phrase: str, request: gr.Request) -> dict:
        return api.ground(ctx, api_owner_key(request.session_hash), image, phrase)

    @guard
    def api_som(image: str, question: str, marks: str, request: gr.Request) -> dict:
        return api.set_of_mark(ctx, api_owner_key(request.session_hash), image, question, marks)

    @guard
    def api_ocr(file: str, page: int, mode: str, request: gr.Request) -> dict:
        return api.read_document(ctx, api_owner_key(request.session_hash), file, page, mode)

    public = {**model_group(ctx), "show_progress": "hidden"}
    buttons[0].click(api_chat, [message, images, conversation, temperature, top_p, max_new],
                     [answer, conversation_out, regions], api_name="chat", **public)
    buttons[1].click(api_ground, [image, phrase], [result], api_name="ground", **public)
    buttons[2].click(api_som, [image, question, marks], [result], api_name="som", **public)
    buttons[3].click(api_ocr, [document, page, mode], [result], api_name="ocr", **public)
