"""The layout: documented element ids exist, text is sanitised, only the four API endpoints are public."""
from __future__ import annotations

import re

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
    assert len(model_events) >= 10 and all(fn.concurrency_limit == 1 and fn.queue for fn in model_events)
    names = {fn.name for fn in model_events}
    assert {"do_respond", "go", "do_auto", "do_ask", "do_read", "api_chat", "api_ground"} <= names
    cheap = [fn for fn in demo.fns.values() if fn.name in ("do_submit", "do_like", "do_click", "<lambda>")]
    assert cheap and not any(fn.queue for fn in cheap)
    assert demo._queue.max_size == ctx.settings.queue_size
