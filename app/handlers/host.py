"""The host's panel: who the host is, what was collected, the Hub sync, the export as a zip.

The host is, on a Space, the Space's owner logged in with Hugging Face (`SPACE_AUTHOR_NAME`);
elsewhere whoever gives `SPHINX_ADMIN_TOKEN` (the page as `?host=TOKEN`, an API client in the
`x-sphinx-host-token` header). Every function here takes the verdict of `is_host` and refuses
without it, so a visitor's session, a client without the token or with a wrong one get one line
and nothing else.
"""
from __future__ import annotations

import hmac
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.orm import Session

from storage import export_training_data, read_only
from storage.host_stats import Correction, DayVersion, latest_corrections, per_day_and_version

from ..hub_sync import FeedbackSync, SyncStatus
from .common import AppContext, UserError

HEADER = "x-sphinx-host-token"
QUERY = "host"
EXPORTS_DIR = "host_exports"   # under the data dir; the newest few zips are kept
KEEP_EXPORTS = 3
_export_lock = threading.Lock()


class NotHost(UserError):
    """Not the host: nothing of the panel is shown or returned."""


def is_host(ctx: AppContext, *, username: str | None = None, token: str | None = None) -> bool:
    """The Space's owner by their Hugging Face login, or the holder of SPHINX_ADMIN_TOKEN."""
    s = ctx.settings
    if s.space_author and username and hmac.compare_digest(username.encode(), s.space_author.encode()):
        return True
    if s.admin_token and isinstance(token, str) and token:
        return hmac.compare_digest(token.encode("utf-8", "replace"), s.admin_token.encode())
    return False


def require_host(granted: bool) -> None:
    if granted is not True:
        raise NotHost("this is for the app's host only")


@dataclass
class Overview:
    rows: list[DayVersion] = field(default_factory=list)
    corrections: list[Correction] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        keys = ("conversations", "turns", "likes", "dislikes", "corrections")
        return {k: sum(getattr(r, k) for r in self.rows) for k in keys}

    def to_dict(self) -> dict:
        return {"totals": self.totals(),
                "per_day_and_version": [{**r.__dict__, "day": r.day.isoformat()} for r in self.rows],
                "latest_corrections": [{**c.__dict__, "at": c.at.isoformat()} for c in self.corrections]}


def overview(ctx: AppContext, granted: bool, corrections: int = 20) -> Overview:
    require_host(granted)
    with Session(read_only(ctx.store.engine)) as s, s.begin():
        return Overview(per_day_and_version(s), latest_corrections(s, corrections))


def _when(t: float | None) -> str:
    if t is None:
        return "—"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def sync_state(ctx: AppContext, granted: bool) -> dict[str, str | int | None]:
    """Last push, next push, pending conversations, last error (one line each)."""
    require_host(granted)
    hub = ctx.hub_sync
    if hub is None:
        return {"repo": None, "state": "off: set SPHINX_FEEDBACK_REPO (and HF_TOKEN) to push feedback to a dataset"}
    status: SyncStatus = hub.status if isinstance(hub, FeedbackSync) else hub
    pending: int | str = "—"
    if isinstance(hub, FeedbackSync):
        try:
            pending = hub.pending()
        except Exception as e:  # noqa: BLE001 - the panel shows it; the app serves on
            pending = f"unknown ({type(e).__name__})"
    return {"repo": status.repo_id, "state": "on" if status.enabled else "off",
            "every_min": status.every_min, "last_push": _when(status.last_push),
            "next_push": _when(status.next_push), "pending": pending, "pushes": status.pushes,
            "failures": status.failures, "last_error": status.last_error}


def export_zip(ctx: AppContext, granted: bool) -> Path:
    """The store's training export (`python -m storage export`'s data.jsonl + images/) as a zip.
    One at a time: a request while one is being written gets a line, not a second export."""
    require_host(granted)
    if not _export_lock.acquire(blocking=False):
        raise UserError("an export is being written right now; try again in a moment")
    try:
        folder = Path(ctx.settings.data_dir) / EXPORTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            with Session(read_only(ctx.store.engine)) as s, s.begin():
                export_training_data(s, ctx.store.images, Path(tmp) / "export")
            made = shutil.make_archive(str(Path(tmp) / f"sphinx-feedback-{stamp}"), "zip", Path(tmp) / "export")
            target = folder / Path(made).name
            shutil.move(made, target)
        for old in sorted(folder.glob("sphinx-feedback-*.zip"))[:-KEEP_EXPORTS]:
            old.unlink(missing_ok=True)
        return target
    finally:
        _export_lock.release()
