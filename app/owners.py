"""Owner ids a client cannot forge, and picture paths nobody can guess, from one server-side key.

A browser keeps a token `ID.SIG` in its localStorage (gr.BrowserState). Gradio's BrowserState
encrypts it with a secret that is part of the page's `/config`, so that encryption hides
nothing from whoever loads the page; what protects an owner is this module: SIG is an HMAC of
ID under the server key (kept in the data dir, never sent), so a client cannot make up a token
that the server accepts, and the owner id the store keys rows by is a second HMAC of ID, so
reading the store (an export, a log) gives no token back. A token is a bearer credential: the
browser that holds it owns its History, as a session cookie would.

The same key names the per-owner copies of stored pictures that the browser is handed
(`served.py`): the content-addressed store itself is never served.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

KEY_FILE = "server_key"
KEY_ENV = "SPHINX_SERVER_KEY"
_TOKEN = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{32})")


def server_key(data_dir: Path) -> bytes:
    """The server's signing key: `$SPHINX_SERVER_KEY`, else `DATA_DIR/server_key` (made once, 0600)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode("utf-8")
    return _key_file(str(Path(data_dir).resolve()))


@functools.lru_cache(maxsize=8)
def _key_file(folder: str) -> bytes:
    path = Path(folder) / KEY_FILE
    if not path.is_file():
        Path(folder).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:      # another process made it first
            pass
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 32:
        raise OSError(f"{path} holds no usable key; delete it to make a new one")
    return key.encode("utf-8")


def _mac(key: bytes, purpose: str, text: str) -> str:
    return hmac.new(key, f"{purpose}:{text}".encode("utf-8"), hashlib.sha256).hexdigest()


def new_browser_token(key: bytes) -> str:
    """A fresh token for a browser: a random id and the server's signature of it."""
    ident = secrets.token_hex(16)
    return f"{ident}.{_mac(key, 'browser', ident)[:32]}"


def browser_owner_id(token: object, key: bytes) -> str | None:
    """The owner id of a token this server signed (None for anything else: forged, altered,
    malformed, or from before tokens were signed)."""
    if not isinstance(token, str):
        return None
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    ident, sig = match.groups()
    if not hmac.compare_digest(sig, _mac(key, "browser", ident)[:32]):
        return None
    return _mac(key, "owner", ident)[:32]


def picture_name(key: bytes, owner: str, sha256: str) -> str:
    """The opaque file name of `owner`'s copy of a stored picture: no one without the server key
    can compute it from the picture (or its hash) and an owner id."""
    return _mac(key, "picture", f"{owner}:{sha256}")[:40]
