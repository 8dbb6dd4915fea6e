"""A feedback dataset on the Hub as a local export: `hf://datasets/owner/name[@revision]`.

The app's Hub sync (`app/hub_sync.py`) pushes the store as `conversations/<id>.jsonl` (each
line exactly what `python -m storage export` writes) and `images/`. Training and
`python -m storage export --from-hub` read it back the same way: the repo is downloaded
through `huggingface_hub.snapshot_download` (its cache, resumable downloads, offline mode),
and its conversation files are joined into one `data.jsonl` whose image references resolve
against the snapshot, as a local export's resolve against its folder.

Lines are copied, not trusted: a hostile record goes on to `train.records`, which skips and
counts it. Identical samples (the same messages, from two conversations) are written once,
as the local export does. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

PREFIX = "hf://datasets/"
DATA_FILE = "data.jsonl"
PATTERNS = ["conversations/*.jsonl", "images/*", DATA_FILE]
MAX_LINE_BYTES = 64 << 20


class HubDataError(ValueError):
    """A Hub dataset source that cannot be used; the message is one line saying what to do."""


def is_hub_source(value: object) -> bool:
    return isinstance(value, str) and value.startswith("hf://")


def parse_source(value: str) -> tuple[str, str | None]:
    """`hf://datasets/owner/name[@revision]` -> (repo id, revision)."""
    if not value.startswith(PREFIX):
        raise HubDataError(f"{value[:120]!r}: a Hub dataset is written {PREFIX}owner/name[@revision]")
    repo_id, _, revision = value[len(PREFIX):].partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubDataError(f"{value[:120]!r} does not name a dataset repo: {str(e).splitlines()[0]}") from None
    if not re.fullmatch(r"[^/]+/[^/]+", repo_id) or (revision and (not re.fullmatch(r"[\w.\-/]{1,100}", revision)
                                                             or ".." in revision or revision.startswith("/"))):
        raise HubDataError(f"{value[:120]!r}: expected {PREFIX}owner/name[@revision]")
    return repo_id, revision or None


def download(value: str, cache_dir: str | Path | None = None) -> Path:
    """The repo's snapshot folder (downloaded, or from the cache offline); HubDataError in one line."""
    repo_id, revision = parse_source(value)
    fetch = f"hf download {repo_id} --repo-type dataset" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                      allow_patterns=PATTERNS))
    except LocalEntryNotFoundError:
        raise HubDataError(f"dataset {repo_id} is not in the local Hugging Face cache and the Hub cannot be "
                           f"reached (or HF_HUB_OFFLINE is set): download it first with `{fetch}`") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise HubDataError(f"no dataset repo {repo_id} on the Hub, or this token may not read it "
                           "(a private repo needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubDataError(f"dataset {repo_id} has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubDataError(f"cannot download dataset {repo_id}: {first[:300]}") from None


def _files(snapshot: Path) -> list[Path]:
    files = sorted((snapshot / "conversations").glob("*.jsonl")) if (snapshot / "conversations").is_dir() else []
    if (snapshot / DATA_FILE).is_file():
        files.append(snapshot / DATA_FILE)
    return files


def merged_lines(snapshot: Path) -> Iterator[bytes]:
    """Every record line of the snapshot, identical samples once (lines that are not JSON objects
    are passed on for the reader to skip and count)."""
    seen: set[bytes] = set()
    for path in _files(snapshot):
        with open(path, "rb") as f:
            for line in f:
                line = line.rstrip(b"\r\n")
                if not line.strip() or len(line) > MAX_LINE_BYTES:
                    continue
                key = _dedup_key(line)
                if key is not None:
                    if key in seen:
                        continue
                    seen.add(key)
                yield line + b"\n"


def _dedup_key(line: bytes) -> bytes | None:
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
        return None
    body = json.dumps(raw["messages"], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).digest()


def write_data_file(snapshot: Path, out: Path) -> int:
    """Write the merged records to `out` (atomically); returns how many lines."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for line in merged_lines(snapshot):
                f.write(line)
                n += 1
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if n == 0:
        raise HubDataError(f"{snapshot} holds no conversations (conversations/*.jsonl or {DATA_FILE})")
    return n


def cache_root() -> Path:
    return Path(os.environ.get("SPHINX_CACHE") or Path.home() / ".cache" / "sphinx_model") / "hub_data"


def resolve(value: str, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """A Hub dataset source -> (its merged data.jsonl, the image root its references resolve
    against): what a local export folder gives a training mixture. The merged file is kept per
    snapshot (a commit), so a later run of the same revision reuses it."""
    snapshot = download(value, cache_dir)
    repo_id, _ = parse_source(value)
    out = cache_root() / repo_id.replace("/", "--") / snapshot.name / DATA_FILE
    if not out.is_file():
        write_data_file(snapshot, out)
    return out, snapshot
