"""The copies of stored pictures that a browser may be handed, one per owner.

The image store is content-addressed (`DATA_DIR/images/ab/<sha256>.png`): serving it would let
anyone who can compute a picture's hash ask whether somebody stored it, and fetch it. So Gradio
is never given a store path (the launcher puts the store in `blocked_paths`); a page is given
`DATA_DIR/served/<xy>/<name>.<ext>`, where the name is an HMAC of the owner and the hash under the
server key (`owners.picture_name`), a hard link to the stored file where the file system allows
one (else a copy). Gradio copies what it serves into its own cache, under a hash seeded with its
own secret, so neither path can be guessed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from storage import Owner, Store

from .owners import picture_name, server_key

SERVED_DIR = "served"


def served_root(store: Store) -> Path:
    return Path(store.settings.data_dir) / SERVED_DIR


def shown_copy(store: Store, owner: Owner, sha256: str, stored: Path) -> Path:
    """`owner`'s copy of the stored file `stored` (made on first use), the only path of it a page gets."""
    name = picture_name(server_key(store.settings.data_dir), f"{owner.kind}:{owner.id}", sha256)
    dst = served_root(store) / name[:2] / f"{name}{stored.suffix}"
    if dst.is_file() and not dst.is_symlink():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".serve-")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(stored, tmp)                 # same bytes, no second copy on disk
        except OSError:
            shutil.copyfile(stored, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst
