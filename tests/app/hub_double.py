"""An `HfApi` double at the network boundary: what would be committed to a Hub repo lands in a
local folder instead. Everything above it (the CommitScheduler, its lock, its thread, its
incremental upload, CommitOperationAdd reading the files) is the real library."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoUrl


class LocalHub(HfApi):
    def __init__(self, root: Path) -> None:
        super().__init__(token="hf_test_token_never_sent")
        self.root = root
        self.commits: list[dict[str, Any]] = []
        self.created: list[tuple[str, str | None, bool | None]] = []
        self.fail_next = 0               # that many commits fail as if the Hub were unreachable
        self.refuse_create: BaseException | None = None
        self._lock = threading.Lock()

    def create_repo(self, repo_id: str, *, private: bool | None = None, repo_type: str | None = None,
                    exist_ok: bool = False, **_: Any) -> RepoUrl:
        if self.refuse_create is not None:
            raise self.refuse_create
        self.created.append((repo_id, repo_type, private))
        return RepoUrl(f"https://huggingface.co/{repo_type + 's/' if repo_type else ''}{repo_id}")

    def create_commit(self, repo_id: str, operations: list[Any], *, commit_message: str,
                      repo_type: str | None = None, revision: str | None = None, **_: Any) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionError("the Hub cannot be reached")
            repo = self.root / (repo_type or "model") / repo_id
            added, deleted = [], []
            for op in operations:
                dst = repo / op.path_in_repo
                if isinstance(op, CommitOperationDelete):
                    dst.unlink()
                    deleted.append(op.path_in_repo)
                elif isinstance(op, CommitOperationAdd):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with op.as_file() as f:
                        dst.write_bytes(f.read())
                    added.append(op.path_in_repo)
            self.commits.append({"repo": repo_id, "type": repo_type, "message": commit_message,
                                 "added": added, "deleted": deleted})

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Path:
        return self.root / repo_type / repo_id

    def files(self, repo_id: str) -> set[str]:
        root = self.repo(repo_id)
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()
