"""The layout: documented element ids exist, text is sanitised, only the four API endpoints are public."""
from __future__ import annotations

import re

import pytest

from app import ui


def test_layout_ids_sanitising_and_endpoints(ctx):
    demo = ui.build_demo(ctx.settings, ctx)
    config = demo.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    documented = set(re.findall(r"(?<![\w-])[a-z]+(?:-[a-z0-9]+)+(?![\w-])", ui.__doc__.split("Events:")[0]))
    if ctx.service.info.card_path is None:
        documented.discard("model-card")           # only when the model has a card
    assert len(documented) > 60 and documented - ids == set()
    (bot,) = [c for c in config["components"] if c["props"].get("elem_id") == "chat-chatbot"]
    assert bot["props"]["sanitize_html"] is True and bot["props"]["allow_tags"] is False
    assert demo.config["components"] and demo.sphinx_context is ctx
    public = {d["api_name"] for d in config["dependencies"] if d.get("api_visibility") == "public"}
    assert public == {"chat", "ground", "som", "ocr"}
    model_events = [fn for fn in demo.fns.values() if fn.concurrency_id == ui.MODEL]
    batch = ctx.service.limits.max_batch                # as many model events at once as the service batches
    assert len(model_events) >= 10 and all(fn.concurrency_limit == batch and fn.queue for fn in model_events)
    names = {fn.name for fn in model_events}
    assert {"do_respond", "go", "do_auto", "do_ask", "do_read", "api_chat", "api_ground"} <= names
    cheap = [fn for fn in demo.fns.values() if fn.name in ("do_submit", "do_like", "do_click", "<lambda>")]
    assert cheap and not any(fn.queue for fn in cheap)
    assert demo._queue.max_size == ctx.settings.queue_size


@pytest.mark.filterwarnings("ignore::UserWarning")   # gr.Warning outside an event is a Python warning
def test_ui_events_report_errors_in_their_status_line_and_keep_serving():
    from app.handlers.common import UserError

    @ui.soft(3, 1)
    def fails(kind):
        raise UserError("the <b>file</b> is not an image") if kind == "user" else RuntimeError("boom\nstack")

    out = fails("user")
    assert out[1] == "⚠ the &lt;b&gt;file&lt;/b&gt; is not an image"
    assert out[0] == out[2] and out[0] is not None and type(out[0]).__name__ != "str"   # gr.skip(): unchanged
    assert fails("bug")[1] == "⚠ unexpected error: boom"

    @ui.soft(2, 0)
    def stream():
        yield ("part", 1)
        raise UserError("stopped working")
    assert [o[0] for o in stream()][-1] == "⚠ stopped working"


def test_a_chat_error_reaches_the_tab_as_a_warning_and_the_chat_is_kept(ctx):
    import warnings

    from app import tabs
    from app.handlers import chat

    state = chat.ChatState()
    view = chat.ChatView(state, "⚠ <the model is busy>", error="<the model is busy>", restore={"text": "Hi", "files": []})
    with warnings.catch_warnings(record=True):     # gr.Warning outside a request only warns
        warnings.simplefilter("always")
        out = tabs.chat_outputs(ctx, view)
    assert out[1] is state and out[-1] == {"text": "Hi", "files": []}
    assert out[4] == chat.display_text(view.status)
