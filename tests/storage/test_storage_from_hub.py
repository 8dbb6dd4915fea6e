"""`python -m storage export --from-hub`: a dataset repo the app's Hub sync pushed (here served from a
Hugging Face cache the test fills, offline) becomes the same OUT/data.jsonl + OUT/images/ as a local
export of the store it came from."""
from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub.constants
import pytest
from sqlalchemy.orm import Session

from storage.__main__ import main as cli_main
from storage.db import Store, read_only
from storage.export import export_training_data
from storage.feedback_folder import refresh_folder
from storage.repository import Owner, create_conversation, save_turn, set_feedback
from storagetest_support import make_image

ANN = Owner("session", "ann")
REPO = "host/sphinx-feedback"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-cache"


def _snapshot(cache: Path, folder: Path) -> Path:
    """Put a synced folder where snapshot_download finds it offline."""
    commit = hashlib.sha1(b"x").hexdigest()
    repo = cache / f"datasets--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_export_from_hub_equals_the_local_export(store: Store, tmp_path: Path, hub_cache: Path, capsys) -> None:
    with Session(store.engine) as s, s.begin():
        img = store.images.put(s, make_image(), owner=ANN)
        for prompt, rating, corrected in (("a?", "like", None), ("b?", "dislike", "B."), ("c?", None, None)):
            cid = create_conversation(s, ANN, model_id="m").id
            _, bot = save_turn(s, ANN, cid, prompt=prompt, answer="x", images=[img])
            if rating:
                set_feedback(s, ANN, bot.id, rating=rating, corrected=corrected)
    with Session(read_only(store.engine)) as s, s.begin():
        refresh_folder(s, store.images, tmp_path / "synced", {})
        export_training_data(s, store.images, tmp_path / "local")
    _snapshot(hub_cache, tmp_path / "synced")
    assert cli_main(["export", "--from-hub", f"hf://datasets/{REPO}", "--out", str(tmp_path / "out")]) == 0
    assert "exported 3 samples, 1 images" in capsys.readouterr().out
    got = sorted((tmp_path / "out" / "data.jsonl").read_bytes().splitlines())
    assert got == sorted((tmp_path / "local" / "data.jsonl").read_bytes().splitlines())
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "images").iterdir())


@pytest.mark.parametrize("args, says", [
    (["--from-hub", "hf://datasets/bad"], "expected hf://datasets/owner/name"),
    (["--from-hub", "hf://datasets/a b/c"], "does not name a dataset repo"),
    (["--from-hub", "datasets/a/b"], "hf://datasets/owner/name"),
    (["--from-hub", "hf://datasets/host/absent"], "hf download host/absent --repo-type dataset"),
    (["--from-hub", "hf://datasets/host/absent", "--only", "liked"], "--from-hub copies the repo's export"),
])
def test_from_hub_errors_are_one_line(tmp_path: Path, hub_cache: Path, capsys, args, says) -> None:
    assert cli_main(["export", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and says in err, err
