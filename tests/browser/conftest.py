"""Fixtures of the browser test: the app served on a free 127.0.0.1 port (the app's default
model, a temporary SQLite store and data dir) and Debian's Chromium driven by Playwright.

Chromium is the system one (`apt-get install -y chromium`, done by the README's test command, `.ci/install.sh`), launched
through `executable_path`: `playwright install` downloads a browser and cannot work offline.
Screenshots go to `tests/browser/screenshots/` (or `$SPHINX_SCREENSHOTS_DIR`).
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "app") not in sys.path:  # the app tests' support module (tiny_text_model)
    sys.path.insert(0, str(HERE.parent / "app"))
SCREENSHOTS = HERE / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 64        # the Chat sliders' cap (and so their default): short, streamed replies
TASK_MAX_NEW_TOKENS = 32   # Grounding / Set-of-Mark / OCR answers


def chromium_path() -> str | None:
    """Debian's Chromium (or `$SPHINX_CHROMIUM`), None when it is not installed."""
    for candidate in (os.environ.get("SPHINX_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass
class Served:
    url: str
    context: object        # app.handlers.common.AppContext: the store the app writes to
    pace: object           # apptest_support.Pace: the pause before each forward pass
    running: object


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import torch

    from app.launch import build_context, serve_in_background
    from app.settings import AppSettings

    tmp = tmp_path_factory.mktemp("browser-app")
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))   # uploads land here, not in /tmp/gradio
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        from apptest_support import Pace, tiny_text_model

        # replies that stream until stopped: the demo model answers in a few tokens
        model = tiny_text_model(tmp / "tiny-text")
        # the engine in this process: the pace is a hook on the model, which the engine process
        # would keep out of reach (that process is tested in tests/sphinx_model/serving/test_engine_process.py)
        settings = AppSettings(model=str(model), data_dir=tmp / "data", browser_secret="browser-test-secret",
                               max_new_tokens=MAX_NEW_TOKENS, task_max_new_tokens=TASK_MAX_NEW_TOKENS,
                               engine="thread")
        ctx = build_context(settings)
        pace = Pace()
        hook = ctx.service.generator.model.llm.register_forward_pre_hook(pace)
        running = serve_in_background(settings, ctx)
        try:
            yield Served(running.url, ctx, pace, running)
        finally:
            running.close()
            hook.remove()
            ctx.store.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    path = chromium_path()
    if path is None:
        pytest.skip("Debian's Chromium is not installed (apt-get install -y chromium; .ci/install.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    folder = Path(os.environ.get("SPHINX_SCREENSHOTS_DIR") or SCREENSHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
