"""The store fed hostile and careless input, through `python -m storage` and the repository.

The CLI answers every case with one `error:` line and exit 2; the repository answers with
the same ValueError / NotFound on SQLite and PostgreSQL; and in every case what the store
holds (rows and image files) is exactly what it held before.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from storage.__main__ import main as cli_main
from storage.db import Store, StorageSettings, open_store
from storage.export import export_training_data
from storage.models import Base
from storage.repository import (NotFound, Owner, create_conversation, get_conversation, get_image, save_conversation,
                                save_turn, set_feedback)
from storagetest_support import make_image

from sphinx_model.conversation import Conversation, Message

ANN, BEN = Owner("session", "ann"), Owner("user", "ben")


def snapshot(store: Store) -> str:
    """Every row of every table, and every image file: what "unchanged" means."""
    h = hashlib.sha256()
    with Session(store.engine) as s:
        for table in Base.metadata.sorted_tables:
            rows = s.execute(select(table).order_by(*table.primary_key.columns)).all()
            h.update(json.dumps([[str(v) for v in r] for r in rows]).encode())
    root = store.settings.image_root
    for p in sorted(root.rglob("*")) if root.exists() else []:
        h.update(str(p.relative_to(root)).encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


@pytest.fixture
def filled(store: Store) -> dict[str, Any]:
    with Session(store.engine) as s, s.begin():
        img = store.images.put(s, make_image(color=(5, 6, 7)), owner=ANN)
        conv = create_conversation(s, ANN, model_id="m")
        _, bot = save_turn(s, ANN, conv.id, prompt="What?", answer="A square.", images=[img])
        set_feedback(s, ANN, bot.id, rating="like")
        return {"conv": conv.id, "bot": bot.id, "sha": img.sha256}


# --- the repository: the same refusal on every backend ----------------------------------------
def turn(**kw: Any) -> Callable[[Session, dict[str, Any]], Any]:
    def call(s: Session, f: dict[str, Any]) -> Any:
        args = {"prompt": "q", "answer": "a", **kw}
        return save_turn(s, ANN, f["conv"], **args)
    return call


REFUSED: dict[str, tuple[Callable[[Session, dict[str, Any]], Any], type[Exception], str]] = {
    "NUL in a prompt": (turn(prompt="a\x00b"), ValueError, "NUL"),
    "NUL in an answer": (turn(answer="\x00"), ValueError, "NUL"),
    "lone surrogate in a prompt": (turn(prompt="\ud800 x"), ValueError, "surrogate"),
    "NaN latency": (turn(latency_ms=math.nan), ValueError, "finite"),
    "infinite latency": (turn(latency_ms=math.inf), ValueError, "finite"),
    "NaN in settings": (turn(settings={"temperature": math.nan}), ValueError, "JSON"),
    "NUL inside boxes": (turn(boxes=[{"label": "a\x00"}]), ValueError, "NUL"),
    "object in settings": (turn(settings={"f": object()}), ValueError, "JSON"),
    "settings of 2 MB": (turn(settings={"x": "y" * (2 << 20)}), ValueError, "larger"),
    "NUL in a comment": (lambda s, f: set_feedback(s, ANN, f["bot"], comment="x\x00"), ValueError, "NUL"),
    "surrogate in a correction": (lambda s, f: set_feedback(s, ANN, f["bot"], corrected="\udfff"), ValueError,
                                  "surrogate"),
    "NUL in a tag": (lambda s, f: set_feedback(s, ANN, f["bot"], tags=["a\x00"]), ValueError, "NUL"),
    "model id over 200 chars": (lambda s, f: create_conversation(s, ANN, model_id="m" * 201), ValueError, "longer"),
    "NUL in a model id": (lambda s, f: create_conversation(s, ANN, model_id="m\x00"), ValueError, "NUL"),
    "NUL in an owner id": (lambda s, f: Owner("user", "a\x00"), ValueError, "NUL"),
    "message id beyond 32 bits": (lambda s, f: set_feedback(s, ANN, 2**40, rating="like"), NotFound, "message"),
    "message id not a number": (lambda s, f: set_feedback(s, ANN, "1", rating="like"), NotFound, "message"),
    "conversation id with NUL": (lambda s, f: get_conversation(s, ANN, "ab\x00"), NotFound, "conversation"),
    "conversation id an object": (lambda s, f: get_conversation(s, ANN, {"$ne": 1}), NotFound, "conversation"),
    "conversation id too long": (lambda s, f: turn()(s, {"conv": "c" * 10_000}), NotFound, "conversation"),
    "another owner's conversation": (lambda s, f: save_turn(s, BEN, f["conv"], prompt="q", answer="a"), NotFound,
                                     "conversation"),
    "another owner's image by hash": (lambda s, f: save_turn(s, BEN, create_conversation(s, BEN, model_id="m").id,
                                                             prompt="q", answer="a", images=[f["sha"]]),
                                      NotFound, "image"),
    "an image nobody uploaded": (turn(images=["0" * 64]), NotFound, "image"),
    "an image reference not a hash": (turn(images=[{"sha": 1}]), NotFound, "image"),
    "another owner's image in a saved conversation": (
        lambda s, f: save_conversation(s, BEN, Conversation([Message.user("q", image=f["sha"]),
                                                             Message.assistant("a")]), model_id="m"),
        NotFound, "image"),
    "reading another owner's image": (lambda s, f: get_image(s, BEN, f["sha"]), NotFound, "image"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_values_are_refused_alike_on_every_backend(store: Store, filled: dict[str, Any], name: str) -> None:
    call, error, message = REFUSED[name]
    before = snapshot(store)
    with pytest.raises(error, match=message):
        with Session(store.engine) as s, s.begin():
            call(s, filled)
    assert snapshot(store) == before


def test_an_owner_attaches_an_image_once_they_uploaded_it_themselves(store: Store, filled: dict[str, Any]) -> None:
    """Content addressing stays (one file), but ownership is per uploader; a refused hash and a
    hash nobody uploaded give the same answer, so nobody learns what was ever uploaded."""
    with Session(store.engine) as s, s.begin():
        conv = create_conversation(s, BEN, model_id="m").id
    refusals = []
    for sha in (filled["sha"], "f" * 64):
        with pytest.raises(NotFound) as e:
            with Session(store.engine) as s, s.begin():
                save_turn(s, BEN, conv, prompt="q", answer="a", images=[sha])
        refusals.append(str(e.value))
    assert refusals[0] == refusals[1]
    with Session(store.engine) as s, s.begin():
        mine = store.images.put(s, make_image(color=(5, 6, 7)), owner=BEN)  # the same picture, uploaded by Ben
        assert mine.sha256 == filled["sha"]
        save_turn(s, BEN, conv, prompt="q", answer="a", images=[mine.sha256])
        assert get_image(s, BEN, mine.sha256).sha256 == filled["sha"]
    assert len(list(store.settings.image_root.rglob("*.png"))) == 1  # still one file


# --- export never writes through a link --------------------------------------------------------
def test_export_replaces_planted_links_and_never_writes_their_targets(store: Store, filled: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / f"{filled['sha']}.png").symlink_to(victim)
    (out / "data.jsonl").symlink_to(victim)
    with Session(store.engine) as s, s.begin():
        report = export_training_data(s, store.images, out)
    assert report.samples == 1 and victim.read_text() == "precious"
    for name in (f"images/{filled['sha']}.png", "data.jsonl"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert (out / f"images/{filled['sha']}.png").read_bytes() == store.images.read(get_image_row(store, filled))


def get_image_row(store: Store, filled: dict[str, Any]) -> Any:
    with Session(store.engine) as s:
        return get_image(s, ANN, filled["sha"])


# --- python -m storage ---------------------------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    try:
        code = cli_main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err.strip().splitlines()


def _images_dir_is_a_link(root: Path) -> list[str]:
    (root / "elsewhere").mkdir()
    (root / "o").mkdir()
    (root / "o" / "images").symlink_to(root / "elsewhere")
    return ["export", "--out", str(root / "o")]


CLI: dict[str, Callable[[Path], list[str]]] = {
    "migrate to an unknown revision": lambda r: ["migrate", "--revision", "nope"],
    "migrate to an empty revision": lambda r: ["migrate", "--revision", ""],
    "migrate 'up' to an older revision": lambda r: ["migrate", "--revision", "0001"],
    "export --out is a file": lambda r: ["export", "--out", str(Path(__file__))],
    "export --out/images is a link": _images_dir_is_a_link,
    "export --out under a file": lambda r: ["export", "--out", str(Path(__file__) / "x")],
    "export --since not a date": lambda r: ["export", "--out", str(r / "o"), "--since", "yesterday"],
    "export --only unknown": lambda r: ["export", "--out", str(r / "o"), "--only", "best"],
    "stats --top zero": lambda r: ["stats", "--top", "0"],
    "stats --top huge": lambda r: ["stats", "--top", "9" * 40],
    "unknown command": lambda r: ["frobnicate"],
}


@pytest.mark.parametrize("name", sorted(CLI))
def test_cli_hostile_input_is_one_line_exit_2_and_changes_nothing(filled: dict[str, Any], store: Store,
                                                                 settings: StorageSettings, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("SPHINX_DB_URL", settings.database_url.render_as_string(hide_password=False))
    monkeypatch.setenv("SPHINX_DATA_DIR", str(settings.data_dir))
    argv = CLI[name](tmp_path)
    before = snapshot(store)
    code, err = run_cli(capsys, *argv)
    assert code == 2, (name, err)
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert snapshot(store) == before
    assert not list((tmp_path / "elsewhere").glob("*")) if (tmp_path / "elsewhere").exists() else True


@pytest.mark.parametrize("case", ["garbage database file", "data dir is a file", "unreadable URL"])
def test_cli_broken_setups_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.delenv("SPHINX_DB_URL", raising=False)
    if case == "garbage database file":
        (tmp_path / "sphinx.db").write_bytes(b"this is not sqlite" * 100)
        argv = ["--data-dir", str(tmp_path), "stats"]
    elif case == "data dir is a file":
        (tmp_path / "f").write_text("x")
        argv = ["--data-dir", str(tmp_path / "f"), "migrate"]
    else:
        argv = ["--db-url", "::not a url::", "migrate"]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err


def test_cli_unforeseen_error_is_one_line_and_debug_shows_the_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    import storage.__main__ as cli

    def boom(args: Any) -> int:
        raise RuntimeError("nobody planned this\nline two")

    monkeypatch.setattr(cli, "_run", boom)
    code, err = run_cli(capsys, "stats")
    assert code == 1 and err == ["error: unexpected RuntimeError: nobody planned this (run with --debug for the "
                                 "traceback)"]
    code, err = run_cli(capsys, "--debug", "stats")
    assert code == 1 and any("Traceback" in line for line in err)


def test_migrate_refuses_an_unknown_revision_before_creating_a_database(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SPHINX_DB_URL", raising=False)
    code, err = run_cli(capsys, "--data-dir", str(tmp_path / "d"), "migrate", "--revision", "9999")
    assert code == 2 and err[0].startswith("error: unknown revision '9999'")
    assert not (tmp_path / "d" / "sphinx.db").exists()
    store = open_store(StorageSettings(data_dir=tmp_path / "d"))  # and a normal start still works
    assert "image_owner" in inspect(store.engine).get_table_names()
    with store.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM image_owner")).scalar() == 0
    store.dispose()
