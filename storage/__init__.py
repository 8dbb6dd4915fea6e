"""The conversation store: every exchange and every piece of feedback, kept for fine-tuning.

SQLite by default (one file plus an image folder in a data directory), any SQLAlchemy URL
otherwise (PostgreSQL is tested). Sessions belong to the caller; the functions in
`repository` take one. Torch-free: this package imports only the conversation schema from
`sphinx_model`.

    store = open_store(StorageSettings.from_env())      # upgrades the schema
    with Session(store.engine) as s, s.begin():
        img = store.images.put(s, upload_bytes, owner=owner)   # only its uploader may attach it
        conv = create_conversation(s, owner, model_id="sphinx-tiny")
        save_turn(s, owner, conv.id, prompt="What is this?", answer="A cat.", images=[img])
"""
from __future__ import annotations

from .db import (
    Store,
    StorageError,
    StorageSettings,
    create_engine_for,
    open_store,
    read_only,
    upgrade,
)
from .export import ExportReport, build_samples, export_training_data
from .images import ImageLimits, ImageRejected, ImageStore, sanitize_image
from .repository import (
    UNSET,
    NewMessage,
    NotFound,
    Owner,
    add_message,
    append_messages,
    begin_turn,
    create_conversation,
    delete_conversation,
    drop_unanswered,
    feedback_history,
    get_conversation,
    get_image,
    list_conversations,
    save_conversation,
    save_turn,
    set_feedback,
    to_conversation,
    update_answer,
)
from .stats import Stats, collect_stats, format_stats

__all__ = [
    "UNSET", "ExportReport", "ImageLimits", "ImageRejected", "ImageStore", "NewMessage",
    "NotFound", "Owner",
    "Stats", "StorageError", "StorageSettings", "Store", "add_message", "append_messages",
    "build_samples",
    "collect_stats", "create_conversation", "create_engine_for", "delete_conversation",
    "export_training_data", "feedback_history", "format_stats", "get_conversation", "get_image",
    "list_conversations", "open_store", "read_only", "sanitize_image", "save_conversation",
    "save_turn", "set_feedback", "to_conversation", "upgrade", "begin_turn", "update_answer", "drop_unanswered",
]
