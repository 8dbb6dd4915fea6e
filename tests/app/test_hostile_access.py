"""Who may read what, tried against the running app as a hostile client would: stored pictures
answer only through their owners' opaque copies (never the content-addressed store), and a
browser's owner id is something only the server can sign."""
from __future__ import annotations

import hashlib
import hmac

import httpx
import pytest
import rawcall
from apptest_support import png_bytes, running_app, scene

from app.handlers.common import owner_of
from app.owners import KEY_FILE, browser_owner_id, new_browser_token, picture_name, server_key
from app.records import TurnRecord, put_image, save_exchange
from app.served import served_root
from storage.images import sanitize_image

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


@pytest.fixture(scope="module")
def server(service, model_dir, tmp_path_factory):
    yield from running_app(service, model_dir, tmp_path_factory.mktemp("access"),
                           task_max_new_tokens=8, browser_secret="visible-browserstate-secret")


def _get(server, path) -> int:
    return httpx.get(f"{server.url}gradio_api/file={path}", timeout=30).status_code


def _key(server) -> bytes:
    return server_key(server.context.settings.data_dir)


def test_the_content_addressed_store_is_never_served(server):
    """Whoever can compute sanitize_image(bytes).sha256 of a guessed picture learns nothing."""
    ctx = server.context
    data = png_bytes(scene(64, 40))
    alice = owner_of("session:" + "a" * 32)
    stored = put_image(ctx.store, alice, data)
    sha = sanitize_image(data).sha256
    assert stored.sha256 == sha and stored.path.is_file()
    root = ctx.store.images.root
    guesses = [stored.path, root / f"{sha}.png", root / sha[:2] / f"{sha}.png", served_root(ctx.store) / f"{sha}.png",
               served_root(ctx.store) / sha[:2] / f"{sha}.png"]
    for guess in guesses:
        assert _get(server, guess) == 403, guess
    assert _get(server, ctx.settings.data_dir / KEY_FILE) == 403          # the signing key, blocked too


def test_each_owner_is_handed_an_opaque_copy_of_their_own(server):
    ctx = server.context
    data = png_bytes(scene(50, 30))
    alice, bob = owner_of("session:" + "a" * 32), owner_of("session:" + "b" * 32)
    mine, theirs = put_image(ctx.store, alice, data), put_image(ctx.store, bob, data)
    assert mine.sha256 == theirs.sha256 and mine.shown != theirs.shown
    for copy in (mine.shown, theirs.shown):
        assert copy.read_bytes() == mine.path.read_bytes() and mine.sha256 not in copy.name
        assert served_root(ctx.store) in copy.parents and ctx.store.images.root not in copy.parents
    assert _get(server, mine.shown) == 200                                  # the owner's page can show it
    forged = picture_name(b"not the server key", "session:" + "b" * 32, mine.sha256)   # without the key
    assert _get(server, served_root(ctx.store) / forged[:2] / f"{forged}.png") == 403


def test_the_page_config_holds_no_server_key_and_the_visible_secret_signs_nothing(server):
    config = httpx.get(f"{server.url}config", timeout=30).text
    key = _key(server).decode()
    assert "visible-browserstate-secret" in config     # Gradio hands the BrowserState secret to the page ...
    assert key not in config                            # ... but never the key that signs owner ids
    ident = "c" * 32                                    # a token signed with what the page reveals
    forged = f"{ident}.{hmac.new(b'visible-browserstate-secret', ident.encode(), hashlib.sha256).hexdigest()[:32]}"
    assert browser_owner_id(forged, _key(server)) is None


@pytest.mark.parametrize("case", ["empty", "forged signature", "unsigned legacy id", "altered id", "not text"])
def test_a_browser_token_the_server_did_not_sign_gets_a_fresh_one(server, case):
    good = new_browser_token(_key(server))
    ident, sig = good.split(".")
    token = {"empty": "", "forged signature": f"{ident}.{'0' * 32}", "unsigned legacy id": "d" * 32,
             "altered id": f"{'e' * 32}.{sig}", "not text": {"id": ident}}[case]
    load = rawcall.fn_index(server.demo, "on_load")
    msg = rawcall.event(server.url, load, [token])
    assert msg["success"], msg
    issued = msg["output"]["data"][0]
    assert issued != token and browser_owner_id(issued, _key(server)) is not None


def test_history_opens_only_for_the_token_the_server_signed(server):
    ctx = server.context
    token = new_browser_token(_key(server))
    owner = owner_of("session:" + browser_owner_id(token, _key(server)))
    save_exchange(ctx.store, owner, None, ctx.service.info, TurnRecord(prompt="my secret question", answer="a"))
    load, refresh = rawcall.fn_index(server.demo, "on_load"), rawcall.fn_index(server.demo, "do_refresh")

    def titles(sent) -> str:
        """The History listing a page sees after loading with `sent` in its localStorage."""
        session = "s" + hashlib.md5(str(sent).encode()).hexdigest()[:10]
        assert rawcall.event(server.url, load, [sent], session_hash=session)["success"]
        return str(rawcall.event(server.url, refresh, [None], session_hash=session)["output"]["data"][0])

    assert "my secret question" in titles(token)
    assert "my secret question" not in titles(f"{token.split('.')[0]}.{'f' * 32}")   # its id, a forged signature
    assert "my secret question" not in titles(owner.id)                                 # the stored owner id itself
