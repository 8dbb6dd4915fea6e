"""Stored conversations + feedback -> the training-data schema of `train/` (JSONL + images).

Output: `OUT/data.jsonl`, one `Conversation.to_dict()` per line with `task="feedback"`,
image parts referencing `images/<sha256>.<ext>` relative to OUT, and those images copied
into `OUT/images/`.

Rules, per user/assistant turn:
- a corrected answer replaces the model's answer (whatever the rating);
- a disliked answer without a correction is dropped, and with it the rest of that
  dialogue, since later turns were conditioned on the bad answer;
- one image per sample (the model's rule): a user message bringing a new image starts a
  new sample; a message with several images cannot be represented and is skipped;
- `only="liked"` / `"corrected"` keeps each sample up to its last liked / corrected turn
  (earlier turns stay as context), and drops samples that have none;
- identical samples (same messages after these rules) are written once.

Nothing is ever written through a symbolic link planted in OUT: files are written to fresh
temporary names and renamed over whatever stands at the destination, and `OUT/images` must
be a real folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from sphinx_model.conversation import Conversation, Message, Part, SchemaError, write_jsonl

from .db import StorageError
from .images import ImageStore
from .models import ConversationRow, ImageRow, MessageRow, start_of_day_utc
from .repository import message_to_schema

Only = Literal["liked", "corrected", "all"]
ONLY_CHOICES: tuple[str, ...] = ("liked", "corrected", "all")
TASK = "feedback"
DATA_FILE = "data.jsonl"
IMAGES_DIR = "images"


@dataclass
class ExportReport:
    conversations: int = 0  # stored conversations read
    samples: int = 0  # lines written
    corrected_turns: int = 0
    dropped_turns: int = 0  # disliked without correction, and the turns after them
    duplicates: int = 0
    skipped: int = 0  # samples not representable (several images in a message, invalid)
    images: int = 0  # distinct images referenced by the written samples
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.samples} samples from {self.conversations} conversations, "
                f"{self.images} images; {self.corrected_turns} corrected turns, "
                f"{self.dropped_turns} dropped turns, {self.duplicates} duplicates, "
                f"{self.skipped} skipped")


@dataclass
class _Turn:
    user: MessageRow
    answer: str  # the corrected answer when there is one
    rating: str | None
    corrected: bool

    @property
    def dropped(self) -> bool:  # disliked and nobody said what was right
        return self.rating == "dislike" and not self.corrected


def _image_ref(img: ImageRow) -> str:
    return f"{IMAGES_DIR}/{img.filename}"


def _turns(conv: ConversationRow) -> tuple[MessageRow | None, list[_Turn]]:
    """The leading system message and the answered (user, assistant) pairs, in order.
    A user message without an answer (generation failed), or with an answer the app never
    finished (`interrupted`, uncorrected), is skipped."""
    msgs = list(conv.messages)
    system = msgs.pop(0) if msgs and msgs[0].role == "system" else None
    turns: list[_Turn] = []
    for prev, cur in zip(msgs, msgs[1:]):
        if prev.role != "user" or cur.role != "assistant":
            continue
        fb = cur.feedback
        corrected = fb.corrected if fb is not None and fb.corrected else None
        if cur.interrupted and corrected is None:   # the app died mid-answer: not an answer to learn
            continue
        turns.append(_Turn(prev, corrected or cur.text, fb.rating if fb is not None else None,
                           corrected is not None))
    return system, turns


def _segments(turns: list[_Turn]) -> Iterator[tuple[list[_Turn], int]]:
    """Split where a user brings a new image; cut each piece at its first dropped turn.
    Yields (kept turns, number of dropped turns) per piece."""
    pieces: list[list[_Turn]] = []
    has_image = False
    for t in turns:
        if not pieces or (t.user.images and has_image):
            pieces.append([])
            has_image = False
        has_image = has_image or bool(t.user.images)
        pieces[-1].append(t)
    for piece in pieces:
        cut = next((i for i, t in enumerate(piece) if t.dropped), len(piece))
        yield piece[:cut], len(piece) - cut


def build_samples(conv: ConversationRow, only: Only, report: ExportReport) -> list[Conversation]:
    """Training samples from one stored conversation (see the module docstring)."""
    system, turns = _turns(conv)
    samples: list[Conversation] = []
    for kept, dropped in _segments(turns):
        report.dropped_turns += dropped
        if only != "all":
            wanted = [i for i, t in enumerate(kept)
                      if (t.corrected if only == "corrected" else t.rating == "like")]
            kept = kept[: wanted[-1] + 1] if wanted else []
        if not kept:
            continue
        if any(len(t.user.images) > 1 for t in kept):
            report.skipped += 1
            continue
        messages: list[Message] = [message_to_schema(system)] if system is not None else []
        for t in kept:
            messages.append(message_to_schema(t.user, _image_ref))
            messages.append(Message("assistant", (Part.of_text(t.answer),)))
        sample = Conversation(
            messages=messages, id=f"{TASK}-{conv.id}-{len(samples)}", task=TASK,
            meta={"conversation_id": conv.id, "model_id": conv.model_id,
                  "model_version": conv.model_version,
                  "turns": [{"rating": t.rating, "corrected": t.corrected} for t in kept]})
        try:
            sample.validate(for_training=True)
        except SchemaError:
            report.skipped += 1
            continue
        samples.append(sample)
    return samples


def _dedup_key(sample: Conversation) -> bytes:
    body = json.dumps([m.to_dict() for m in sample.messages], sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).digest()


def export_training_data(session: Session, images: ImageStore, out_dir: str | Path, *,
                         since: date | None = None, only: Only = "all",
                         batch_size: int = 200) -> ExportReport:
    """Write OUT/data.jsonl and OUT/images/ from conversations updated since `since` (UTC).

    Use a read-only session (`Session(read_only(engine))`) so a long export does not
    hold SQLite's write lock. The JSONL is written to a temporary file and renamed, so a
    reader never sees half an export.
    """
    if only not in ONLY_CHOICES:
        raise ValueError(f"only must be one of {ONLY_CHOICES}")
    out = Path(out_dir)
    _real_folder(out / IMAGES_DIR)
    report = ExportReport()
    seen: set[bytes] = set()
    copied: set[str] = set()

    stmt = (select(ConversationRow)
            .order_by(ConversationRow.created_at, ConversationRow.id)
            .options(selectinload(ConversationRow.messages).selectinload(MessageRow.images),
                     selectinload(ConversationRow.messages).selectinload(MessageRow.feedback))
            .execution_options(yield_per=batch_size))
    if since is not None:
        stmt = stmt.where(ConversationRow.updated_at >= start_of_day_utc(since))

    def samples() -> Iterator[Conversation]:
        for conv in session.scalars(stmt):
            report.conversations += 1
            for sample in build_samples(conv, only, report):
                key = _dedup_key(sample)
                if key in seen:
                    report.duplicates += 1
                    continue
                if not _copy_images(conv, sample, images, out, copied, report):
                    report.skipped += 1
                    continue
                seen.add(key)
                report.corrected_turns += sum(t["corrected"] for t in sample.meta["turns"])
                yield sample

    tmp = _fresh_file(out, DATA_FILE)
    try:
        report.samples = write_jsonl(tmp, samples())
        os.replace(tmp, out / DATA_FILE)  # replaces a link planted under that name, never follows it
    finally:
        tmp.unlink(missing_ok=True)
    report.images = len(copied)
    return report


def _copy_images(conv: ConversationRow, sample: Conversation, images: ImageStore, out: Path,
                 copied: set[str], report: ExportReport) -> bool:
    """Copy the sample's images into OUT/images; False if a stored file is missing."""
    wanted = {ref for ref in sample.image_refs if ref}
    if not wanted:
        return True
    rows = {_image_ref(mi.image): mi.image for m in conv.messages for mi in m.images}
    for ref in wanted - copied:
        row = rows[ref]
        src = images.path(row)
        if not src.is_file():
            if len(report.notes) < 20:
                report.notes.append(f"missing image file {row.filename}")
            return False
        dst = out / ref
        if dst.is_symlink() or not (dst.is_file() and dst.stat().st_size == row.size_bytes):
            tmp = _fresh_file(dst.parent, dst.name)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)  # a link at `dst` is replaced, its target never written
            finally:
                tmp.unlink(missing_ok=True)
        copied.add(ref)
    return True


def _real_folder(path: Path) -> None:
    """Create `path` (and parents); refuse when it is a symbolic link, which would send the
    images wherever it points."""
    if path.is_symlink():
        raise StorageError(f"{path} is a symbolic link; the export writes only into real folders")
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise StorageError(f"{path} is not a folder")


def _fresh_file(folder: Path, name: str) -> Path:
    """A new, empty file beside `name` that nobody else can have planted (O_EXCL)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # as a plain copy would be, not mkstemp's 0600
    return Path(tmp)
