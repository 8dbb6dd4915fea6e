"""The five tabs: each builds its components and wires their events to `app.handlers`."""
from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import gradio as gr

from .handlers import chat, grounding, history, ocr, som
from .grounded import grounded
from .handlers.common import AppContext, generation_settings
from .regions import TABLE_HEADERS, regions_table
from .wiring import CHEAP, PRIVATE, queued, soft


# --- Chat ------------------------------------------------------------------------------
def chat_view(st: chat.ChatState) -> Any:
    """The Chatbot's value with each answer's rating shown."""
    return gr.update(value=chat.chat_messages(st), feedback_value=chat.feedback_values(st))


def chat_outputs(ctx: AppContext, view: chat.ChatView) -> tuple[Any, ...]:
    if view.error:
        gr.Warning(html.escape(view.error, quote=False))
    regions = chat.last_regions(view.state)
    return (chat_view(view.state), view.state,
            chat.overlay(ctx, view.state) if view.done else gr.skip(),
            regions_table(regions) if view.done else gr.skip(), chat.display_text(view.status),
            view.restore if view.restore is not None else gr.skip())


def chat_tab(ctx: AppContext, owner: gr.State, examples: Any) -> dict[str, Any]:
    info = ctx.service.info
    state = gr.State(chat.ChatState())
    cap = ctx.settings.max_new_tokens
    with gr.Row():
        with gr.Column(scale=3):
            bot = gr.Chatbot(elem_id="chat-chatbot", label="Chat", height=460, sanitize_html=True,
                             render_markdown=True, allow_tags=False, feedback_options=("Like", "Dislike"),
                             buttons=["copy"])
            box = gr.MultimodalTextbox(elem_id="chat-input", file_count="multiple", file_types=["image"],
                                       sources=["upload"], placeholder="Ask about an image: attach it, type, Enter",
                                       show_label=False)
            with gr.Row():
                stop_btn = gr.Button("Stop", elem_id="chat-stop", variant="secondary", interactive=False)
                regen_btn = gr.Button("Regenerate", elem_id="chat-regenerate")
                undo_btn = gr.Button("Undo", elem_id="chat-undo")
                clear_btn = gr.Button("Clear", elem_id="chat-clear")
            status = gr.Markdown("", elem_id="chat-status")
            gr.Markdown(f"This model takes {info.max_images} image{'s' * (info.max_images != 1)} per "
                        "conversation" + (": for another image, press Clear and start a new chat."
                                          if info.max_images == 1 else "; a new image may come at any turn."),
                        elem_id="chat-image-note")
        with gr.Column(scale=2):
            overlay = gr.Image(label="Boxes and points in the last answer", elem_id="chat-overlay",
                               interactive=False, type="pil", format="png")
            grounded_view, raw = grounded_output("chat", "Grounded phrases in the last answer")
            regions = gr.Dataframe(headers=TABLE_HEADERS, label="Regions (pixels)", elem_id="chat-regions",
                                   interactive=False, wrap=True)
            with gr.Accordion("Settings", open=False):
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)",
                                        elem_id="chat-temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", elem_id="chat-top-p")
                max_new = gr.Slider(1, cap, value=min(256, cap), step=1, label="max new tokens",
                                    elem_id="chat-max-new-tokens")
            with gr.Accordion("Feedback on an answer (the one last rated, else the latest)", open=True):
                comment = gr.Textbox(label="Comment (optional)", elem_id="chat-comment", lines=2)
                corrected = gr.Textbox(label="Corrected answer (optional)", elem_id="chat-corrected", lines=3)
                fb_btn = gr.Button("Send feedback", elem_id="chat-feedback-send")

    outputs = [bot, state, overlay, regions, status, box]

    @soft(4, 3)
    def do_submit(st: chat.ChatState, key: str, value: dict | None):
        value = value or {}
        st = chat.submit(ctx, st, key, value.get("text", ""), value.get("files", []))
        return st, chat_view(st), gr.update(value=None), "Waiting for the model…"

    @soft(6, 4)
    def do_respond(st: chat.ChatState, key: str, t: float, p: float, n: int):
        if not st.busy:      # the step before failed (its message is in the status line)
            yield (gr.skip(),) * len(outputs)
            return
        settings = generation_settings(t, p, n, cap)
        for view in chat.respond(ctx, st, key, settings):
            yield chat_outputs(ctx, view)

    @soft(3, 2)
    def do_regenerate(st: chat.ChatState):
        st = chat.regenerate(ctx, st)
        return st, chat_view(st), "Waiting for the model…"

    @soft(6, 4)
    def do_undo(st: chat.ChatState):
        return chat_outputs(ctx, chat.undo(st))

    @soft(6, 4)
    def do_clear():
        return [], chat.clear(), None, [], "", None

    @soft(3, 1)
    def do_like(st: chat.ChatState, key: str, data: gr.EventData = None):  # checked by the handler, not Gradio
        view = chat.rate_event(ctx, st, key, data)
        k = view.state.feedback_turn
        answer = view.state.turns[k].corrected or view.state.turns[k].answer
        return view.state, view.status, gr.update(value=answer)

    @soft(5, 2)
    def do_annotate(st: chat.ChatState, key: str, note: str, fixed: str):
        view = chat.annotate(ctx, st, key, note, fixed)
        return view.state, chat_view(view.state), view.status, "", ""

    sub = box.submit(do_submit, [state, owner, box], [state, bot, box, status], **CHEAP)
    respond_args = dict(fn=do_respond, inputs=[state, owner, temperature, top_p, max_new], outputs=outputs,
                        **queued(ctx))
    # Stop looks pressable only while an answer is being written
    writing = {"fn": lambda: gr.update(interactive=True, variant="stop"), "inputs": None, "outputs": [stop_btn],
               **CHEAP}
    written = {**writing, "fn": lambda: gr.update(interactive=False, variant="secondary")}
    answered = [sub.success(**respond_args)]
    sub.success(**writing)
    stop_btn.click(soft(1, 0)(lambda st: chat.stop(ctx, st)), [state], [status], **CHEAP)
    regen = regen_btn.click(do_regenerate, [state], [state, bot, status], **CHEAP)
    answered.append(regen.success(**respond_args))
    regen.success(**writing)
    show = {"fn": lambda st: grounded_values(chat.last_answer(st)), "inputs": [state],
            "outputs": [grounded_view, raw], **CHEAP}
    undo_btn.click(do_undo, [state], outputs, **CHEAP).then(**show)
    clear_btn.click(do_clear, None, outputs, **CHEAP).then(**show)
    bot.like(do_like, [state, owner], [state, status, corrected], **CHEAP)
    fb_btn.click(do_annotate, [state, owner, comment, corrected], [state, bot, status, comment, corrected], **CHEAP)
    if examples.chat:
        ex = gr.Examples([[e] for e in examples.chat], inputs=[box], elem_id="chat-examples",
                         label="Examples (click one to ask it)", preload=False, **PRIVATE)
        loaded = ex.load_input_event.then(do_submit, [state, owner, box], [state, bot, box, status], **CHEAP)
        answered.append(loaded.success(**respond_args))
        loaded.success(**writing)
    for event in answered:
        event.then(**show)
        event.then(**written)
    return {"state": state, "chatbot": bot, "overlay": overlay, "regions": regions, "status": status,
            "input": box, "answered": answered, "show_grounded": show}


def grounded_output(prefix: str, label: str) -> tuple[gr.HighlightedText, gr.Textbox]:
    """An answer's grounded phrases, highlighted in their boxes' colours, and the model's exact
    text one click away (elem_ids PREFIX-grounded, PREFIX-raw)."""
    view = gr.HighlightedText(label=label, elem_id=f"{prefix}-grounded", combine_adjacent=False,
                              show_legend=False, show_inline_category=True, interactive=False)
    with gr.Accordion("The model's exact text", open=False, elem_id=f"{prefix}-raw-accordion"):
        raw = gr.Textbox(show_label=False, elem_id=f"{prefix}-raw", buttons=["copy"], interactive=False)
    return view, raw


def grounded_values(text: str, phrase: str | None = None) -> tuple[Any, str]:
    g = grounded(text or "", phrase)
    return gr.update(value=g.segments or None, color_map=g.colors), text or ""


# --- Grounding -------------------------------------------------------------------------
def grounding_tab(ctx: AppContext, owner: gr.State, examples: Any) -> None:
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="ground-image")
            phrase = gr.Textbox(label="Phrase", placeholder="e.g. the red circle", elem_id="ground-phrase")
            with gr.Row():
                find = gr.Button("Find the phrase", variant="primary", elem_id="ground-find")
                detect = gr.Button("Detect everything", elem_id="ground-detect")
            status = gr.Markdown("", elem_id="ground-status")
        with gr.Column():
            output = gr.Image(label="Boxes on the original image", interactive=False, type="pil", format="png",
                              elem_id="ground-output")
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Regions (pixels)", interactive=False,
                                 elem_id="ground-table")
            download = gr.File(label="JSON (pixels and the model's text format)", elem_id="ground-json")
            view = gr.HighlightedText(label="The answer's regions, in their boxes' colours", elem_id="ground-grounded",
                                      combine_adjacent=False, show_legend=False, show_inline_category=True,
                                      interactive=False)
            answer = gr.Textbox(label="The model's exact text", elem_id="ground-answer", buttons=["copy"])

    def run(detect_all: bool) -> Callable:
        @soft(6, 4)
        def go(key: str, img: Any, text: str):
            res = grounding.ground(ctx, key, img, text, detect_all)
            shown, _ = grounded_values(res.shot.text, None if detect_all else str(text).strip().rstrip("."))
            return res.annotated, res.rows, str(res.json_path), res.shot.text, res.summary, shown
        return go

    outs = [output, table, download, answer, status, view]
    find.click(run(False), [owner, image, phrase], outs, **queued(ctx))
    phrase.submit(run(False), [owner, image, phrase], outs, **queued(ctx))
    detect.click(run(True), [owner, image, phrase], outs, **queued(ctx))
    if examples.grounding:
        ex = gr.Examples(examples.grounding, inputs=[image, phrase], elem_id="ground-examples",
                         label="Examples (click one to find the phrase)", preload=False, **PRIVATE)
        ex.load_input_event.then(run(False), [owner, image, phrase], outs, **queued(ctx))


# --- Set-of-Mark -------------------------------------------------------------------------
def som_tab(ctx: AppContext, owner: gr.State, examples: Any) -> None:
    state = gr.State(som.MarksState())
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="som-image")
            with gr.Row():
                source = gr.Radio(list(som.SOURCES), value="opencv", label="Automatic marks from",
                                  elem_id="som-source")
                auto = gr.Button("Place marks", elem_id="som-auto")
            with gr.Row():
                mode = gr.Radio(["point", "box"], value="point", label="A click on the marked image adds",
                                elem_id="som-click-mode")
                clear = gr.Button("Clear marks", elem_id="som-clear")
            question = gr.Textbox(label="Question about the marks", placeholder='e.g. "What is 3?"',
                                  elem_id="som-question")
            ask = gr.Button("Ask", variant="primary", elem_id="som-ask")
            status = gr.Markdown("", elem_id="som-status")
        with gr.Column():
            canvas = gr.Image(label="Marks (click to add; named marks turn yellow)", interactive=False,
                              type="pil", format="png", elem_id="som-canvas")
            view = gr.HighlightedText(label="The answer: the marks it names, in the yellow they turn",
                                      elem_id="som-grounded", combine_adjacent=False, show_legend=False,
                                      show_inline_category=True, interactive=False)
            answer = gr.Textbox(label="The model's exact text", elem_id="som-answer", buttons=["copy"])

    def _status(st: som.MarksState) -> str:
        if st.corner is not None:
            return "First corner set: click the opposite corner."
        return f"{len(st.marks)} mark{'s' * (len(st.marks) != 1)}."

    @soft(3, 2)
    def do_load(key: str, img: Any):
        st = som.load(ctx, key, img)
        return st, som.picture(ctx, st), _status(st) if st.image else ""

    @soft(3, 2)
    def do_auto(key: str, st: som.MarksState, src: str):
        st = som.auto_marks(ctx, key, st, src)
        return st, som.picture(ctx, st), _status(st)

    @soft(3, 2)
    def do_click(st: som.MarksState, how: str, evt: gr.EventData = None):  # checked by the handler, not Gradio
        st = som.click_event(ctx, st, evt, how)
        return st, som.picture(ctx, st), _status(st)

    @soft(3, 2)
    def do_clear(st: som.MarksState):
        st = som.clear(st)
        return st, som.picture(ctx, st), _status(st)

    @soft(5, 3)
    def do_ask(key: str, st: som.MarksState, q: str):
        res = som.ask(ctx, key, st, q)
        named = ", ".join(map(str, res.named)) or "none"
        shown = som.answer_view(res.shot.text, st.marks, res.shot.regions)
        return (st, res.marked, res.shot.text, f"Marks named in the answer: {named}.",
                gr.update(value=shown.segments or None, color_map=shown.colors))

    image.change(do_load, [owner, image], [state, canvas, status], **CHEAP)
    auto.click(do_auto, [owner, state, source], [state, canvas, status], **queued(ctx))
    canvas.select(do_click, [state, mode], [state, canvas, status], **CHEAP)
    clear.click(do_clear, [state], [state, canvas, status], **CHEAP)
    ask.click(do_ask, [owner, state, question], [state, canvas, answer, status, view], **queued(ctx))
    question.submit(do_ask, [owner, state, question], [state, canvas, answer, status, view], **queued(ctx))
    if examples.som:
        ex = gr.Examples(examples.som, inputs=[image, question], elem_id="som-examples",
                         label="Examples (click one: marks are placed, then the question is asked)",
                         preload=False, **PRIVATE)
        ex.load_input_event.then(do_load, [owner, image], [state, canvas, status], **CHEAP).then(
            do_auto, [owner, state, source], [state, canvas, status], **queued(ctx)).then(
            do_ask, [owner, state, question], [state, canvas, answer, status, view], **queued(ctx))


# --- Document OCR ------------------------------------------------------------------------
def ocr_tab(ctx: AppContext, owner: gr.State, examples: Any) -> None:
    doc = gr.State(ocr.Document())
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Image or PDF", file_types=["image", ".pdf"], type="filepath",
                             elem_id="ocr-file")
            note = gr.Markdown("", elem_id="ocr-note")
            with gr.Row():
                page = gr.Number(value=1, minimum=1, precision=0, label="Page", elem_id="ocr-page")
                mode = gr.Radio(list(ocr.MODES), value="both", label="Read the text, spot words, or both",
                                elem_id="ocr-mode")
            run = gr.Button("Read", variant="primary", elem_id="ocr-run")
            status = gr.Markdown("", elem_id="ocr-status")
            page_image = gr.Image(label="Page with spotted words", interactive=False, type="pil", format="png",
                                  elem_id="ocr-page-image")
        with gr.Column():
            text = gr.Textbox(label="The model's reading", lines=6, elem_id="ocr-text", buttons=["copy"])
            download = gr.File(label="Download the reading (.txt)", elem_id="ocr-download")
            words = gr.Dataframe(headers=ocr.SPOTTED_HEADERS, label="Spotted words (pixels)", interactive=False,
                                 elem_id="ocr-words")
            embedded = gr.Textbox(label="The PDF's own text layer", lines=6, elem_id="ocr-embedded",
                                  buttons=["copy"])
            score = gr.Markdown("", elem_id="ocr-score")

    @soft(3, 1)
    def do_open(value: Any):
        d, msg = ocr.open_upload(ctx, value)
        return d, msg, gr.update(value=1, maximum=max(d.pages, 1))

    @soft(7, 6)
    def do_read(key: str, d: ocr.Document, p: Any, m: str):
        res = ocr.read(ctx, key, d, p, m)
        sim = f"**Similarity to the text layer:** {res.score:.1%}" if res.score is not None else \
            "No text layer to compare with."
        return res.page, res.reading, str(res.text_path), res.spotted, res.embedded or "", sim, res.summary

    upload.change(do_open, [upload], [doc, note, page], **CHEAP)
    outs = [page_image, text, download, words, embedded, score, status]
    run.click(do_read, [owner, doc, page, mode], outs, **queued(ctx))
    if examples.ocr:
        ex = gr.Examples(examples.ocr, inputs=[upload], elem_id="ocr-examples",
                         label="Examples (click one to read it)", preload=False, **PRIVATE)
        ex.load_input_event.then(do_open, [upload], [doc, note, page], **CHEAP).then(
            do_read, [owner, doc, page, mode], outs, **queued(ctx))


# --- History -----------------------------------------------------------------------------
def history_tab(ctx: AppContext, owner: gr.State, tabs: gr.Tabs, c: dict[str, Any]) -> dict[str, Any]:
    gr.Markdown("Your own earlier conversations (kept for this browser, or for your Hugging Face login).")
    listing = gr.Dropdown(choices=[], label="Conversations", elem_id="history-list", interactive=True)
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="history-refresh")
        open_btn = gr.Button("Open in Chat", variant="primary", elem_id="history-open")
        delete = gr.Button("Delete", variant="stop", elem_id="history-delete")
    status = gr.Markdown("", elem_id="history-status")

    @soft(2, 1)
    def do_refresh(key: str):
        items = history.listing(ctx, key)
        return gr.update(choices=history.choices(items), value=None), f"{len(items)} conversation(s)."

    @soft(7, 6)
    def do_open(key: str, conv_id: str):
        st = history.reopen(ctx, key, conv_id)
        view = chat.ChatView(st, f"Reopened a conversation of {len(st.turns)} turn(s): continue it below.")
        return (*chat_outputs(ctx, view)[:5], gr.Tabs(selected="tab-chat"), "")

    @soft(2, 1)
    def do_delete(key: str, conv_id: str):
        items = history.delete(ctx, key, conv_id)
        return gr.update(choices=history.choices(items), value=None), "Deleted."

    refresh.click(do_refresh, [owner], [listing, status], **CHEAP)
    open_btn.click(do_open, [owner, listing],
                   [c["chatbot"], c["state"], c["overlay"], c["regions"], c["status"], tabs, status],
                   **CHEAP).then(**c["show_grounded"])
    delete.click(do_delete, [owner, listing], [listing, status], **CHEAP)
    return {"list": listing}
