"""The app in a real browser (Debian's Chromium, Playwright), on the app's default model.

One visitor's day: attach an image and chat (the reply streams), like and correct an answer,
stop a reply, see the boxes overlay; then Grounding, Set-of-Mark and Document OCR (the
sample PDF); reload the page and reopen the conversation from History; finally the store is
read through `storage/` to check that the turns, the stop and the feedback were kept.
A screenshot of each tab goes to `tests/browser/screenshots/`.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from playwright.sync_api import Page, expect
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.handlers.chat import STOPPED_NOTE
from app.settings import REPO_ROOT
from storage.models import ConversationRow
from storage.repository import Owner, feedback_history, get_conversation

EXAMPLES = REPO_ROOT / "assets" / "examples"
SCENE = EXAMPLES / "scene-objects.png"
MARKS = EXAMPLES / "scene-marks.png"
PDF = EXAMPLES / "sample.pdf"
FIRST = "Describe the image briefly."
FOLLOW_UP = "Tell me more about the shapes."
CORRECTED = "A grey picture with a blue square, a brown triangle and three yellow triangles."
STREAM_PACE_S = 0.02      # per LLM forward: a 64-token reply takes > 1 s, in many pieces
STOP_PACE_S = 0.25        # the reply to be stopped is still being written when Stop lands
BOT = "#chat-chatbot [data-testid=bot]"


# --- helpers ----------------------------------------------------------------------------
def no_error_toast(page: Page) -> None:
    errors = page.locator(".toast-body.error, .toast-body.warning")
    assert errors.count() == 0, f"the app showed: {errors.all_inner_texts()}"


def status(page: Page, elem: str) -> str:
    return page.locator(f"#{elem}").inner_text().strip()


def wait_status(page: Page, elem: str, pattern: str, timeout_s: float = 30.0) -> str:
    """Wait until the Markdown status `elem` matches `pattern`; fail early on an error toast."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = status(page, elem)
        if re.search(pattern, text):
            return text
        no_error_toast(page)
        assert time.monotonic() < deadline, f"#{elem} says {text!r}, waited for /{pattern}/"
        page.wait_for_timeout(50)


def send(page: Page, text: str, files: tuple[Path, ...] = ()) -> None:
    box = page.locator("#chat-input")
    if files:
        box.locator("input[type=file]").set_input_files([str(f) for f in files])
        expect(box.locator("img")).to_have_count(len(files))    # uploaded: thumbnails shown
    box.locator("textarea").fill(text)
    box.locator("textarea").press("Enter")


def watch_reply(page: Page, n: int, stop_after_first: bool = False) -> list[str]:
    """The texts the n-th reply showed while it was written (distinct, in order); with
    `stop_after_first`, press Stop as soon as the first piece is on screen."""
    expect(page.locator(BOT)).to_have_count(n)     # the turn is in; its reply is on its way
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while not re.search(r"^(Answered|Stopped) ", status(page, "chat-status")):
        texts = page.locator(BOT).all_inner_texts()
        text = texts[n - 1].strip() if len(texts) >= n else ""
        if text and text != "…" and (not seen or seen[-1] != text):
            seen.append(text)
            if stop_after_first and len(seen) == 1:
                page.locator("#chat-stop").click()
        no_error_toast(page)
        assert time.monotonic() < deadline, "the reply never finished"
        page.wait_for_timeout(25)
    return seen


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")


def upload(page: Page, elem: str, path: Path) -> None:
    page.locator(f"#{elem} input[type=file]").set_input_files(str(path))


def shoot(page: Page, folder: Path, name: str) -> None:
    page.wait_for_timeout(300)    # let images finish drawing
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


# --- the test -----------------------------------------------------------------------------
def test_a_visitor_chats_uses_every_tab_and_finds_it_all_in_history_and_the_store(served, page, screenshots):
    page.goto(served.url)
    expect(page.locator("#model-info")).to_contain_text(served.context.service.info.name, timeout=30_000)

    # Chat: an image and a question; the reply streams in pieces
    expect(page.locator("#chat-stop")).to_be_disabled()           # nothing is being written yet
    served.pace.seconds = STREAM_PACE_S
    send(page, FIRST, (SCENE,))
    partials = watch_reply(page, 1)
    assert len(set(partials)) >= 2, f"the reply did not stream: {partials}"
    assert wait_status(page, "chat-status", r"^Answered in")
    expect(page.locator("#chat-stop")).to_be_disabled()           # written: Stop is idle again
    expect(page.locator("#chat-overlay img")).to_be_visible()      # the boxes' picture, drawn on the image

    # like it, then correct it
    page.locator("#chat-chatbot button[aria-label='Like']").first.click()
    wait_status(page, "chat-status", r"^Feedback stored: like on answer 1")
    liked = page.locator("#chat-chatbot button[aria-label='Liked']")
    expect(liked).to_have_count(1)                                 # and it shows at a glance
    assert liked.evaluate("e => getComputedStyle(e).boxShadow") != "none"
    page.locator("#chat-corrected textarea").fill(CORRECTED)
    page.locator("#chat-feedback-send").click()
    wait_status(page, "chat-status", r"^Feedback stored on answer 1 \(corrected answer kept\)")
    expect(page.locator(BOT).first).to_contain_text("corrected:")

    # a text-only follow-up about the same image, stopped while it is written
    served.pace.seconds = STOP_PACE_S
    send(page, FOLLOW_UP)
    stopped = watch_reply(page, 2, stop_after_first=True)
    served.pace.seconds = 0.0
    assert stopped, "the reply to stop never showed a first piece"
    wait_status(page, "chat-status", r"^Stopped after .* stored as stopped")
    expect(page.locator(BOT).nth(1)).to_contain_text(STOPPED_NOTE)
    expect(page.locator("#chat-overlay img")).to_be_visible()
    shoot(page, screenshots, "chat")

    # Grounding: an image and a phrase
    open_tab(page, "Grounding")
    upload(page, "ground-image", SCENE)
    expect(page.locator("#ground-image img")).to_be_visible()
    page.locator("#ground-phrase textarea").fill("the blue square")
    page.locator("#ground-find").click()
    wait_status(page, "ground-status", r"region|names no box")
    expect(page.locator("#ground-output img")).to_be_visible()
    shoot(page, screenshots, "grounding")

    # Set-of-Mark: marks placed automatically, one more by a click, a question about a mark
    open_tab(page, "Set-of-Mark")
    upload(page, "som-image", MARKS)
    expect(page.locator("#som-canvas img")).to_be_visible()
    page.locator("#som-auto").click()
    auto = int(wait_status(page, "som-status", r"^[1-9]\d* marks?\.").split()[0])
    page.locator("#som-canvas img").click()      # the middle of the picture: a point mark
    wait_status(page, "som-status", rf"^{auto + 1} marks\.")
    picture = page.locator("#som-canvas img").bounding_box()
    frame = page.locator("#som-canvas").bounding_box()
    margin_x = (frame["x"] + picture["x"]) / 2 if picture["x"] - frame["x"] > 8 else picture["x"] + 2
    page.mouse.click(margin_x, picture["y"] + picture["height"] / 2)    # beside the picture
    page.wait_for_timeout(800)
    assert status(page, "som-status").startswith(f"{auto + 1} marks."), status(page, "som-status")
    page.locator("#som-question textarea").fill("What is 1?")
    page.locator("#som-ask").click()
    wait_status(page, "som-status", r"^Marks named in the answer")
    shoot(page, screenshots, "set_of_mark")

    # Document OCR: the sample PDF (it has a text layer, so a similarity score is shown)
    open_tab(page, "Document OCR")
    upload(page, "ocr-file", PDF)
    expect(page.locator("#ocr-note")).not_to_be_empty()
    page.locator("#ocr-run").click()
    wait_status(page, "ocr-score", r"Similarity to the text layer: \d")
    expect(page.locator("#ocr-page-image img")).to_be_visible()
    expect(page.locator("#ocr-embedded textarea")).to_have_value(re.compile("piano"))
    shoot(page, screenshots, "document_ocr")

    # reload: the browser keeps its id, History lists the chat; reopen it in Chat
    page.reload()
    open_tab(page, "History")
    page.locator("#history-list input").click()
    option = page.get_by_role("option", name=re.compile(re.escape(FIRST) + r".*\(2 turns\)"))
    expect(option).to_have_count(1)
    shoot(page, screenshots, "history")
    option.click()
    page.locator("#history-open").click()
    expect(page.get_by_role("tab", name="Chat", exact=True)).to_have_attribute("aria-selected", "true")
    expect(page.locator(BOT)).to_have_count(2)
    expect(page.locator(BOT).first).to_contain_text("corrected:")
    expect(page.locator(BOT).nth(1)).to_contain_text(STOPPED_NOTE)
    expect(page.locator("#chat-chatbot [data-testid=user] img")).to_have_count(1)   # its image, from the store
    wait_status(page, "chat-status", r"^Reopened a conversation of 2 turn")
    no_error_toast(page)

    # the store: one owner (this browser); turns, the stop and the feedback are there
    check_store(served.context)

    # a grounded answer (stored for this browser, as a trained model would write it) reopened from
    # History: its phrases are highlighted in the colours of their boxes in the overlay
    check_grounded_phrases(served, page, screenshots)


GROUNDED = ("<p>blue square</p> [0.30,0.35,0.52,0.62], <p>brown triangle</p> [0.60,0.30,0.85,0.62] "
            "and <p>yellow triangles</p> [0.05,0.70,0.20,0.90];[0.25,0.72,0.40,0.92]")
GROUNDED_PROMPT = "Where are the blue square and the triangles?"


def _rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(float(v)) for v in re.findall(r"[\d.]+", css)[:3])
    return r, g, b


def check_grounded_phrases(served, page: Page, screenshots: Path) -> None:
    import io

    from PIL import Image

    from storage.repository import create_conversation, save_turn

    ctx = served.context
    with Session(ctx.store.engine) as s, s.begin():
        (owner,) = {(r.owner_kind, r.owner_id) for r in s.scalars(select(ConversationRow))}
        owner = Owner(*owner)
        img = ctx.store.images.put(s, SCENE.read_bytes(), owner=owner)
        cid = create_conversation(s, owner, model_id=ctx.service.info.model_id,
                                  model_version=ctx.service.info.version).id
        save_turn(s, owner, cid, prompt=GROUNDED_PROMPT, answer=GROUNDED, images=[img])
    open_tab(page, "History")
    page.locator("#history-refresh").click()
    wait_status(page, "history-status", r"conversation\(s\)")
    page.locator("#history-list input").click()
    page.get_by_role("option", name=re.compile(re.escape(GROUNDED_PROMPT))).click()
    page.locator("#history-open").click()
    wait_status(page, "chat-status", r"^Reopened a conversation of 1 turn")
    view = page.locator("#chat-grounded")
    for phrase in ("blue square", "brown triangle", "yellow triangles"):
        expect(view).to_contain_text(phrase)
    expect(page.locator(BOT).first).to_contain_text("blue square ‹box 1›")       # a tag, not <p>..</p> [..]
    expect(page.locator(BOT).first).not_to_contain_text("</p>")
    # the colour each tag is drawn in on the page ...
    shown = page.evaluate("""() => [...document.querySelectorAll('#chat-grounded *')]
        .filter(e => e.children.length === 0 && /^(box|point) \\d+$/.test(e.textContent.trim()))
        .map(e => { let n = e; let bg = getComputedStyle(n).backgroundColor;
                    while (n && (bg === 'rgba(0, 0, 0, 0)' || bg === 'transparent')) {
                        n = n.parentElement; bg = n ? getComputedStyle(n).backgroundColor : bg; }
                    return [e.textContent.trim(), bg]; })""")
    tags = dict(shown)
    assert set(tags) == {"box 1", "box 2", "box 3", "box 4"}, shown
    # ... is the colour of that box's outline in the overlay picture the page shows
    src = page.locator("#chat-overlay img").get_attribute("src")
    overlay = Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")
    pixels = {}
    for rgb in overlay.getdata():
        pixels[rgb] = pixels.get(rgb, 0) + 1
    for tag, css in tags.items():
        assert pixels.get(_rgb(css), 0) > 50, (tag, css, "not drawn in the overlay")
    assert len({_rgb(c) for c in tags.values()}) == 4                        # four boxes, four colours
    shoot(page, screenshots, "chat_grounded")
    no_error_toast(page)


def check_store(ctx) -> None:
    with Session(ctx.store.engine) as s:
        rows = s.scalars(select(ConversationRow)).all()
        owners = {(r.owner_kind, r.owner_id) for r in rows}
        assert len(owners) == 1 and next(iter(owners))[0] == "session", owners
        owner = Owner(*next(iter(owners)))
        tasks = {}
        for r in rows:
            conv = get_conversation(s, owner, r.id)
            task = {m.settings.get("task") for m in conv.messages if m.role == "assistant"}
            assert len(task) == 1, task
            tasks.setdefault(task.pop(), []).append(conv)
        assert {"chat", "grounding", "som", "ocr", "spotting"} <= set(tasks), set(tasks)
        (chat,) = tasks["chat"]
        assert chat.model_id == ctx.service.info.model_id and chat.model_version == ctx.service.info.version
        m = chat.messages
        assert [x.role for x in m] == ["user", "assistant", "user", "assistant"]
        assert (m[0].text, len(m[0].images), m[2].text, len(m[2].images)) == (FIRST, 1, FOLLOW_UP, 0)
        assert not m[1].stopped and m[1].text and m[1].latency_ms > 0
        assert m[3].stopped and m[3].text, "the stopped reply is stored with its partial text"
        budget_s = m[3].settings["max_new_tokens"] * STOP_PACE_S
        assert m[3].latency_ms / 1000 < budget_s / 2, "decoding ended at Stop, not at the token budget"
        assert m[1].feedback is not None and m[3].feedback is None
        assert (m[1].feedback.rating, m[1].feedback.corrected) == ("like", CORRECTED)
        events = feedback_history(s, owner, m[1].id)
        assert [e.rating for e in events][:1] == ["like"] and events[-1].corrected == CORRECTED


HOST_TOKEN = "browser-host-token"


def test_the_host_sees_the_panel_and_a_visitor_does_not(served, page, screenshots):
    from app.handlers import host
    from storage.repository import create_conversation, save_turn, set_feedback

    ctx = served.context
    ctx.settings = ctx.settings.with_(admin_token=HOST_TOKEN)
    guest = Owner("session", "c" * 32)
    with Session(ctx.store.engine) as s, s.begin():
        cid = create_conversation(s, guest, model_id="m", model_version="host-test").id
        _, bot = save_turn(s, guest, cid, prompt="How many squares?", answer="Two.")
        set_feedback(s, guest, bot.id, rating="dislike", corrected="Three squares.")
    totals = host.overview(ctx, True).totals()

    for url in (served.url, served.url + "?host=not-the-token"):        # a visitor, a wrong token
        page.goto(url)
        expect(page.locator("#model-info")).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)                                   # the load events have run
        expect(page.get_by_role("tab", name="Host", exact=True)).to_have_count(0)
        assert "Latest corrections" not in page.content() or not page.locator("#host-summary").is_visible()

    page.goto(served.url + f"?host={HOST_TOKEN}")
    open_tab(page, "Host")
    summary = page.locator("#host-summary")
    expect(summary).to_contain_text(f"{totals['conversations']} conversations")
    expect(summary).to_contain_text(f"{totals['corrections']} corrections")
    expect(page.locator("#host-table")).to_contain_text("host-test")
    expect(page.locator("#host-corrections")).to_contain_text("Three squares.")
    expect(page.locator("#host-corrections")).to_contain_text("Two.")
    expect(page.locator("#host-plot canvas, #host-plot svg").first).to_be_visible()   # the plot is drawn
    expect(page.locator("#host-sync")).to_contain_text("Hub sync")
    page.locator("#host-export").click()
    wait_status(page, "host-status", r"^Export written: sphinx-feedback-.*\.zip")
    expect(page.locator("#host-export-file")).to_contain_text(".zip")
    shoot(page, screenshots, "host")
    no_error_toast(page)
