"""Export to the training schema (corrections, drops, filters, dedup), stats, and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from sphinx_model.conversation import read_jsonl
from storage.__main__ import main as cli_main
from storage.db import Store, read_only
from storage.export import export_training_data
from storage.models import ConversationRow
from storage.repository import Owner, add_message, create_conversation, save_turn, set_feedback
from storage.stats import collect_stats, format_stats
from storagetest_support import make_image

REPO = Path(__file__).resolve().parents[2]
ANN = Owner("session", "ann")
BEN = Owner("user", "ben")


def _conv(s: Session, owner: Owner, turns: list[tuple], system: str | None = None) -> str:
    """turns: (prompt, answer, images, rating, corrected)"""
    cid = create_conversation(s, owner, model_id="sphinx-tiny", model_version="1").id
    if system:
        add_message(s, owner, cid, "system", system)
    for prompt, answer, images, rating, corrected in turns:
        _, bot = save_turn(s, owner, cid, prompt=prompt, answer=answer, images=images)
        if rating or corrected:
            set_feedback(s, owner, bot.id, rating=rating, corrected=corrected)
    return cid


def _populate(store: Store) -> dict[str, str]:
    with Session(store.engine) as s, s.begin():
        x = store.images.put(s, make_image(color=(10, 20, 30)), owner=ANN)
        y = store.images.put(s, make_image(color=(90, 20, 30), fmt="JPEG"), owner=BEN)
        for owner, data in ((BEN, make_image(color=(10, 20, 30))), (ANN, make_image(color=(90, 20, 30), fmt="JPEG"))):
            store.images.put(s, data, owner=owner)  # both uploaded both pictures
        a_turns = [("What is it?", "A dog.", [x], "like", None),
                   ("Where?", "Left.", [], "dislike", "On the right."),
                   ("Colour?", "Brown.", [], None, None)]
        ids = {
            "A": _conv(s, ANN, a_turns),
            "B": _conv(s, ANN, [("hi", "hello", [], None, None),
                                ("2+2?", "5", [], "dislike", None),
                                ("sure?", "yes", [], "like", None)]),
            "C": _conv(s, BEN, a_turns),  # same content as A: a duplicate
            "D": _conv(s, BEN, [("first image?", "Red.", [x], "like", None),
                                ("second image?", "Dark.", [y], None, None)],
                       system="Be brief."),
            "E": _conv(s, BEN, [("bad", "worse", [], "dislike", None)]),
            "OLD": _conv(s, ANN, [("old question", "old answer", [], "like", None)]),
        }
        unanswered = create_conversation(s, ANN, model_id="m").id
        add_message(s, ANN, unanswered, "user", "no answer came")
        s.execute(update(ConversationRow).where(ConversationRow.id == ids["OLD"])
                  .values(updated_at=datetime(2020, 5, 1, tzinfo=timezone.utc)))
    return ids


def _export(store: Store, out: Path, **kw):
    with Session(read_only(store.engine)) as s, s.begin():
        return export_training_data(s, store.images, out, **kw)


def _by_conv(out: Path) -> dict[str, list]:
    samples: dict[str, list] = {}
    for conv in read_jsonl(out / "data.jsonl"):
        conv.validate(for_training=True)  # what train/ requires of a sample
        assert conv.task == "feedback"
        for ref in conv.image_refs:
            assert ref.startswith("images/") and (out / ref).is_file()
        samples.setdefault(conv.meta["conversation_id"], []).append(conv)
    return samples


def test_export_all_applies_corrections_drops_and_dedup(store: Store, tmp_path: Path) -> None:
    ids = _populate(store)
    report = _export(store, tmp_path / "out")
    got = _by_conv(tmp_path / "out")
    assert set(got) == {ids["A"], ids["B"], ids["D"], ids["OLD"]}  # C dup, E empty
    (a,) = got[ids["A"]]
    assert [m.text for m in a.messages] == ["What is it?", "A dog.", "Where?", "On the right.",
                                            "Colour?", "Brown."]
    assert a.messages[0].image_refs[0].endswith(".png")
    assert a.meta["turns"][1] == {"rating": "dislike", "corrected": True}
    (b,) = got[ids["B"]]  # cut at the disliked, uncorrected answer
    assert [m.text for m in b.messages] == ["hi", "hello"]
    d1, d2 = got[ids["D"]]  # a new image starts a new sample; the system prompt stays
    assert [m.role for m in d1.messages] == ["system", "user", "assistant"]
    assert d1.messages[0].text == d2.messages[0].text == "Be brief."
    assert d2.messages[1].image_refs[0].endswith(".jpg") and len(d2.image_refs) == 1
    assert (report.samples, report.duplicates, report.corrected_turns) == (5, 1, 1)
    assert report.dropped_turns == 2 + 1  # B: the disliked turn and the one after; E: 1
    assert report.images == 2 and len(list((tmp_path / "out" / "images").iterdir())) == 2


def test_export_filters_and_since(store: Store, tmp_path: Path) -> None:
    ids = _populate(store)
    _export(store, tmp_path / "liked", only="liked", since=date(2021, 1, 1))
    liked = _by_conv(tmp_path / "liked")
    assert set(liked) == {ids["A"], ids["D"]}
    assert [m.text for m in liked[ids["A"]][0].messages] == ["What is it?", "A dog."]
    _export(store, tmp_path / "corrected", only="corrected")
    corrected = _by_conv(tmp_path / "corrected")
    assert set(corrected) == {ids["A"]}
    assert corrected[ids["A"]][0].messages[-1].text == "On the right."
    with pytest.raises(ValueError):
        _export(store, tmp_path / "x", only="everything")


def test_stats_per_day_like_ratio_and_worst_prompts(store: Store) -> None:
    _populate(store)
    with Session(read_only(store.engine)) as s, s.begin():
        st = collect_stats(s, top=3)
    assert st.conversations == 7 and st.messages == 2 * 13 + 2  # + system + unanswered
    today = datetime.now(timezone.utc).date()
    assert [d.day for d in st.days] == [today] and st.days[0].messages == st.messages
    assert (st.likes, st.dislikes) == (5, 4)
    assert st.like_ratio == pytest.approx(5 / 9)
    assert st.most_disliked[0] == ("Where?", 2)
    assert {p for p, _ in st.most_disliked[1:]} <= {"2+2?", "bad"}
    text = format_stats(st)
    assert "like ratio: 55.6%" in text and "| Where? | 2 |" in text
    with Session(read_only(store.engine)) as s, s.begin():
        assert collect_stats(s, since=date(2999, 1, 1)).messages == 0


def _cli(*args: str, env_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SPHINX_DB_URL", None)
    if env_url:
        env["SPHINX_DB_URL"] = env_url
    return subprocess.run([sys.executable, "-m", "storage", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_export_and_stats(store: Store, tmp_path: Path) -> None:
    _populate(store)
    data_dir = str(store.settings.data_dir)
    url = store.engine.url.render_as_string(hide_password=False)
    r = _cli("--data-dir", data_dir, "export", "--out", str(tmp_path / "o"), "--only", "all",
             "--since", "2021-01-01", env_url=url)
    assert r.returncode == 0, r.stderr
    assert "4 samples" in r.stdout
    assert len(list(read_jsonl(tmp_path / "o" / "data.jsonl"))) == 4
    r = _cli("--data-dir", data_dir, "stats", "--json", env_url=url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dislikes"] == 4


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in-process (a subprocess per case would cost seconds)."""
    try:
        code = cli_main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["export", "--out", "o", "--since", "2024-02-30"], "YYYY-MM-DD"),
    (["export", "--out", "o", "--since", "20240101"], "YYYY-MM-DD"),
    (["export", "--out", "o", "--only", "best"], "invalid choice"),
    (["export", "--out", "o"], "no database"),
    (["stats"], "no database"),
    (["stats", "--top", "0"], "positive integer"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch, args: list[str],
                                 message: str) -> None:
    monkeypatch.delenv("SPHINX_DB_URL", raising=False)
    code, err = _main(capsys, "--data-dir", str(tmp_path / "nothing-here"), *args)
    assert code == 2 and err.startswith("error: ")
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "nothing-here" / "sphinx.db").exists()


def test_cli_unreachable_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPHINX_DB_URL", "postgresql+psycopg2://u:hunter2@127.0.0.1:9/none")
    code, err = _main(capsys, "--data-dir", str(tmp_path), "stats")
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1 and "hunter2" not in err


def test_train_reads_the_export(store: Store, tmp_path: Path) -> None:
    """The training side's view of an export folder: train.mixture finds data.jsonl and the
    image root, and every image reference resolves under that root."""
    mixture = pytest.importorskip("train.mixture")
    resolve_source = getattr(mixture, "resolve_source", None)
    if resolve_source is None:
        pytest.skip("train.mixture.resolve_source is not there yet")
    _populate(store)
    out = tmp_path / "export"
    _export(store, out)
    data_file, image_root = resolve_source(out, None)
    assert data_file == out / "data.jsonl" and image_root == out
    samples = list(read_jsonl(data_file))
    assert samples and all(s.task == "feedback" for s in samples)
    refs = [r for s in samples for r in s.image_refs]
    assert refs and all((image_root / r).is_file() for r in refs)


def test_a_new_image_after_a_dropped_turn_starts_a_fresh_sample(store: Store,
                                                                 tmp_path: Path) -> None:
    with Session(store.engine) as s, s.begin():
        x = store.images.put(s, make_image(color=(1, 2, 3)), owner=ANN)
        y = store.images.put(s, make_image(color=(4, 5, 6)), owner=ANN)
        cid = _conv(s, ANN, [("look", "wrong", [x], "dislike", None),
                             ("and this one?", "A boat.", [y], None, None),
                             ("colour?", "Blue.", [], "like", None)])
    report = _export(store, tmp_path / "out")
    (sample,) = _by_conv(tmp_path / "out")[cid]
    assert [m.text for m in sample.messages] == ["and this one?", "A boat.", "colour?", "Blue."]
    assert report.dropped_turns == 1
