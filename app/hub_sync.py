"""Feedback leaves the Space by itself: the store, exported one conversation per file
(`storage.feedback_folder`), pushed to a Hub **dataset** repo by huggingface_hub's
`CommitScheduler` every N minutes.

    SPHINX_FEEDBACK_REPO=owner/name  (--feedback-repo)   the dataset repo (created private if absent)
    SPHINX_FEEDBACK_EVERY=10         (--feedback-every)  minutes between pushes
    HF_TOKEN                                              a write token (a Space secret)

The library's scheduler does the work: its thread ticks every N minutes, its lock guards the
folder, its incremental upload sends only files whose modification time changed since the last
successful commit. `FeedbackSync` overrides only `push_to_hub` (the documented extension point)
to refresh the folder from the store first, inside that lock and on the scheduler's thread (so
no request ever waits for it), and to delete from the repo the files of deleted conversations.
What was uploaded is saved beside the folder, so a restart sends nothing it already sent. A push
that fails leaves that record untouched: the same files go again at the next tick, and the log
and the host's panel say so.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationDelete, CommitScheduler, HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from sqlalchemy.orm import Session

from storage import Store, read_only
from storage.feedback_folder import load_manifest, pending, refresh_folder, save_manifest

log = logging.getLogger("app.hub_sync")
SYNC_DIR = "hub_sync"          # under the data dir: export/ (pushed), manifest.json, uploaded.json
DEFAULT_EVERY_MIN = 10.0


class SyncConfigError(ValueError):
    """A dataset repo id or interval that cannot be used (one line)."""


def check_repo_id(value: str) -> str:
    """`owner/name`, as the Hub spells dataset ids; SyncConfigError otherwise."""
    value = (value or "").strip()
    if value.startswith("hf://datasets/"):
        value = value[len("hf://datasets/"):]
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise SyncConfigError(f"SPHINX_FEEDBACK_REPO {value[:100]!r} is not a dataset repo id: "
                              f"{str(e).splitlines()[0]}") from None
    if not re.fullmatch(r"[^/]+/[^/]+", value):
        raise SyncConfigError(f"SPHINX_FEEDBACK_REPO {value[:100]!r} must be owner/name")
    return value


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


@dataclass
class SyncStatus:
    """What the host's panel shows about the sync (times are UNIX seconds, None: not yet)."""

    repo_id: str
    every_min: float
    enabled: bool = True
    last_tick: float | None = None
    last_push: float | None = None
    last_error: str | None = None
    pushes: int = 0
    failures: int = 0
    files_pushed: int = 0
    files_deleted: int = 0

    @property
    def next_push(self) -> float | None:
        return None if not self.enabled or self.last_tick is None else self.last_tick + self.every_min * 60


class FeedbackSync(CommitScheduler):
    """A `CommitScheduler` whose folder is the store's per-conversation export."""

    def __init__(self, *, store: Store, root: str | Path, repo_id: str, every: float = DEFAULT_EVERY_MIN,
                 token: str | None = None, hf_api: HfApi | None = None) -> None:
        # Everything push_to_hub reads is set before the base class starts its thread.
        self.store = store
        self.root = Path(root)
        self.status = SyncStatus(repo_id=repo_id, every_min=float(every))
        self.manifest = load_manifest(self.root / "manifest.json")
        self._restored = False
        super().__init__(repo_id=repo_id, folder_path=self.root / "export", every=every, repo_type="dataset",
                         private=True, token=token, hf_api=hf_api)

    # --- what was uploaded, across restarts -------------------------------------------------
    def _restore_uploaded(self) -> None:
        """Load the record of uploaded files (relative path -> mtime) into the base class's."""
        if self._restored:
            return
        self._restored = True
        try:
            saved = json.loads((self.root / "uploaded.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(saved, dict):
            for rel, mtime in saved.items():
                if isinstance(rel, str) and isinstance(mtime, (int, float)) and ".." not in Path(rel).parts:
                    self.last_uploaded[self.folder_path / rel] = float(mtime)

    def _save_uploaded(self) -> None:
        data = {p.relative_to(self.folder_path).as_posix(): m for p, m in self.last_uploaded.items()}
        tmp = self.root / f".uploaded.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.root / "uploaded.json")

    # --- one tick ----------------------------------------------------------------------------
    def push_to_hub(self) -> Any:
        """Refresh the folder from the store, delete what was deleted, then the library's
        incremental upload of what changed. Runs on the scheduler's thread, never a request's."""
        self.status.last_tick = time.time()
        try:
            self._restore_uploaded()
            with self.lock:
                with Session(read_only(self.store.engine)) as session, session.begin():
                    refresh_folder(session, self.store.images, self.folder_path, self.manifest)
                save_manifest(self.root / "manifest.json", self.manifest)
                gone = sorted(p for p in self.last_uploaded if not p.exists())
            if gone:
                self.api.create_commit(
                    repo_id=self.repo_id, repo_type=self.repo_type, revision=self.revision,
                    operations=[CommitOperationDelete(path_in_repo=p.relative_to(self.folder_path).as_posix())
                                for p in gone],
                    commit_message=f"Remove {len(gone)} deleted file(s)")
                for p in gone:
                    self.last_uploaded.pop(p, None)
                self.status.files_deleted += len(gone)
                self._save_uploaded()
            before = dict(self.last_uploaded)
            info = super().push_to_hub()
            sent = sum(1 for p, m in self.last_uploaded.items() if before.get(p) != m)
            if sent:
                self._save_uploaded()
            if sent or gone:
                self.status.last_push = time.time()
                self.status.pushes += 1
                self.status.files_pushed += sent
            self.status.last_error = None
            return info
        except Exception as e:
            self.status.failures += 1
            self.status.last_error = one_line(e)
            log.warning("hub sync: push to %s failed (%s); it is retried at the next tick, in %g min",
                        self.repo_id, self.status.last_error, self.every)
            raise

    def pending(self) -> int:
        """Conversations not yet in the repo: changed in the store since the last refresh, or
        refreshed but not uploaded (a push failed)."""
        with Session(read_only(self.store.engine)) as session, session.begin():
            n = pending(session, self.manifest)
        with self.lock:
            files = [p for p in (self.folder_path / "conversations").glob("*.jsonl")
                     if self.last_uploaded.get(p) != p.stat().st_mtime]
        return n + len(files) + sum(1 for p in self.last_uploaded if not p.exists())


def start_hub_sync(store: Store, data_dir: str | Path, repo_id: str | None, every: float = DEFAULT_EVERY_MIN,
                   *, hf_api: HfApi | None = None) -> FeedbackSync | SyncStatus | None:
    """The running sync, or (when the repo cannot be created or reached) a disabled status with
    its one-line error for the panel; None without a repo. Never raises: the app serves either way."""
    if not repo_id:
        return None
    try:
        repo_id = check_repo_id(repo_id)
        return FeedbackSync(store=store, root=Path(data_dir) / SYNC_DIR, repo_id=repo_id, every=every,
                            hf_api=hf_api)
    except Exception as e:  # noqa: BLE001 - a bad id, a token without rights, no network: one line
        status = SyncStatus(repo_id=str(repo_id)[:100], every_min=every, enabled=False, last_error=one_line(e))
        log.warning("hub sync off: cannot use dataset repo %s (%s)", status.repo_id, status.last_error)
        return status
