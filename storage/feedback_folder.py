"""The store as a folder of one JSONL file per conversation, kept up to date incrementally.

This is what the app's Hub sync pushes to a dataset repo (`app/hub_sync.py`), and what
`python -m storage export --from-hub` and `python -m train` read back:

    conversations/<conversation id>.jsonl   the conversation's samples: exactly the lines
                                            `python -m storage export` writes for it (only="all")
    images/<sha256>.<ext>                   the images those samples name (`images/...` refs)

Why one file per conversation, not an append-only shard per period: a conversation keeps
changing after it is first written (a later turn, a like, a correction) and can be deleted.
A file named by its id is rewritten when it changes and removed when it is deleted, so the
repo never holds two versions of one conversation, and a restart that writes the same bytes
again changes nothing (the file is left untouched, its modification time too).

What was written is remembered in a manifest (conversation id -> a signature of its rows and
the images its file names), kept by the caller outside the folder. Only conversations whose
signature changed are read again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from sphinx_model.feedback_data import DATA_FILE, download, write_data_file
from sphinx_model.conversation import write_jsonl

from .export import IMAGES_DIR, ExportReport, _copy_images, _fresh_file, _real_folder, build_samples
from .images import ImageStore
from .models import ConversationRow, FeedbackRow, MessageRow

CONVERSATIONS_DIR = "conversations"
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.[a-z]{2,5}")
BATCH = 100

Manifest = MutableMapping[str, dict[str, Any]]  # id -> {"sig": str, "images": [refs]}


@dataclass
class FolderReport:
    written: int = 0      # conversation files written or rewritten
    unchanged: int = 0    # read again, same bytes: left untouched
    removed: int = 0      # deleted conversations (and conversations left without samples)
    images_removed: int = 0
    export: ExportReport = field(default_factory=ExportReport)


def signatures(session: Session) -> dict[str, str]:
    """Every stored conversation's signature: its last update, message count and last feedback."""
    stmt = (select(ConversationRow.id, ConversationRow.updated_at, func.count(MessageRow.id),
                   func.max(FeedbackRow.updated_at))
            .select_from(ConversationRow)
            .outerjoin(MessageRow, MessageRow.conversation_id == ConversationRow.id)
            .outerjoin(FeedbackRow, FeedbackRow.message_id == MessageRow.id)
            .group_by(ConversationRow.id, ConversationRow.updated_at))
    return {cid: f"{updated}|{n}|{feedback}" for cid, updated, n, feedback in session.execute(stmt)}


def pending(session: Session, manifest: Manifest) -> int:
    """Conversations new, changed or deleted since the folder was last refreshed."""
    current = signatures(session)
    changed = sum(1 for cid, sig in current.items() if manifest.get(cid, {}).get("sig") != sig)
    return changed + sum(1 for cid in manifest if cid not in current)


def conversation_file(folder: Path, conversation_id: str) -> Path:
    return folder / CONVERSATIONS_DIR / f"{conversation_id}.jsonl"


def refresh_folder(session: Session, images: ImageStore, folder: str | Path, manifest: Manifest) -> FolderReport:
    """Bring FOLDER up to date with the store: write new and changed conversations, remove
    deleted ones and the images no file names any more. `manifest` is updated in place."""
    folder = Path(folder)
    _real_folder(folder / CONVERSATIONS_DIR)
    _real_folder(folder / IMAGES_DIR)
    report = FolderReport()
    current = {cid: sig for cid, sig in signatures(session).items() if _SAFE_ID.fullmatch(cid)}
    for cid in [c for c in manifest if c not in current]:
        conversation_file(folder, cid).unlink(missing_ok=True)
        del manifest[cid]
        report.removed += 1
    changed = [cid for cid, sig in current.items() if manifest.get(cid, {}).get("sig") != sig]
    for start in range(0, len(changed), BATCH):
        stmt = (select(ConversationRow).where(ConversationRow.id.in_(changed[start:start + BATCH]))
                .options(selectinload(ConversationRow.messages).selectinload(MessageRow.images),
                         selectinload(ConversationRow.messages).selectinload(MessageRow.feedback)))
        for conv in session.scalars(stmt):
            refs = _write_conversation(conv, images, folder, report)
            if refs is None:
                continue  # an image file is missing: tried again at the next refresh
            manifest[conv.id] = {"sig": current[conv.id], "images": sorted(refs)}
    report.images_removed = _remove_unnamed_images(folder, manifest.values())
    return report


def _write_conversation(conv: ConversationRow, images: ImageStore, folder: Path,
                        report: FolderReport) -> set[str] | None:
    """Write one conversation's file (only when its bytes change); the image refs it names, or
    None when one of its images is missing from the store's folder."""
    samples = build_samples(conv, "all", report.export)
    copied: set[str] = set()
    for sample in samples:
        if not _copy_images(conv, sample, images, folder, copied, report.export):
            return None
    target = conversation_file(folder, conv.id)
    if not samples:  # nothing trainable left (e.g. every answer disliked)
        if target.exists():
            target.unlink()
            report.removed += 1
        return set()
    tmp = _fresh_file(target.parent, target.name)
    try:
        write_jsonl(tmp, samples)
        if target.is_file() and not target.is_symlink() and target.read_bytes() == tmp.read_bytes():
            report.unchanged += 1
        else:
            os.replace(tmp, target)
            report.written += 1
    finally:
        tmp.unlink(missing_ok=True)
    return copied


def _remove_unnamed_images(folder: Path, entries: Iterable[dict[str, Any]]) -> int:
    named = {ref for e in entries for ref in e.get("images", [])}
    removed = 0
    for path in (folder / IMAGES_DIR).iterdir():
        if path.name.startswith("."):
            continue
        if f"{IMAGES_DIR}/{path.name}" not in named:
            path.unlink()
            removed += 1
    return removed


def load_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest saved by `save_manifest`; empty when missing or unreadable (then every
    conversation is read again, and files whose bytes did not change stay untouched)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}


def save_manifest(path: Path, manifest: Manifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_file(path.parent, path.name)
    try:
        tmp.write_text(json.dumps(dict(manifest), sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_from_hub(source: str, out: str | Path) -> tuple[int, int]:
    """`python -m storage export --from-hub`: a Hub dataset the app's sync pushed -> OUT/data.jsonl
    + OUT/images/, as `export_training_data` writes them. Returns (records, images)."""
    snapshot = download(source)
    out = Path(out)
    _real_folder(out / IMAGES_DIR)
    records = write_data_file(snapshot, out / DATA_FILE)
    copied = 0
    src_dir = snapshot / IMAGES_DIR
    for src in sorted(src_dir.iterdir()) if src_dir.is_dir() else []:
        if not _IMAGE_NAME.fullmatch(src.name) or not src.is_file():
            continue  # only the store's own names: <sha256>.<ext>
        tmp = _fresh_file(out / IMAGES_DIR, src.name)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, out / IMAGES_DIR / src.name)
        finally:
            tmp.unlink(missing_ok=True)
        copied += 1
    return records, copied
