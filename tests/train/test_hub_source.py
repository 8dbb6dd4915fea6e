"""Training reads back what the app's Hub sync pushed: a mixture dataset `hf://datasets/owner/name`
is fetched through huggingface_hub's snapshot_download (here from a cache the test fills, offline)
and trains exactly like the local export it was made from."""
from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
from synthetic import fill_hub_cache, write_mixture, write_run

from sphinx_model import feedback_data
from train.__main__ import main
from train.config import load_run_config
from train.mixture import load_mixture
from train.trainer import METRICS, Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")
REPO = "host/sphinx-feedback"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SPHINX_CACHE", str(tmp_path / "sphinx-cache"))
    return cache


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _config(tmp_path, name, dataset_path):
    mixture = write_mixture(tmp_path / f"{name}.yaml", [("feedback", dataset_path, 1.0)], samples_per_epoch=8)
    return write_run(tmp_path / name, mixture, train={"max_steps": 3})


def _run(tmp_path, name, dataset_path):
    _reset_accelerate()
    return Trainer(load_run_config(_config(tmp_path, name, dataset_path), {})).run()


def _cli_losses(tmp_path, name, dataset_path) -> dict[int, float]:
    """`python -m train --config RUN` (its main, in this process); the losses it logged."""
    _reset_accelerate()
    assert main(["--config", str(_config(tmp_path, name, dataset_path))]) == 0
    rows = [json.loads(line) for line in (tmp_path / name / "out" / METRICS).read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_hub_dataset_trains_exactly_like_the_local_export(tmp_path, data_dir, hub_cache):
    fill_hub_cache(hub_cache, REPO, data_dir / "export")
    spec = load_mixture(write_mixture(tmp_path / "m.yaml", [("feedback", f"hf://datasets/{REPO}", 1.0)])).datasets[0]
    # the duplicate line is dropped; every image reference resolves against the snapshot
    assert spec.path.read_bytes() == (data_dir / "export" / "data.jsonl").read_bytes()
    assert spec.image_root.parent.name == "snapshots"
    from_hub = _cli_losses(tmp_path, "hub", f"hf://datasets/{REPO}")
    local = _cli_losses(tmp_path, "local", str(data_dir / "export"))
    assert sorted(from_hub) == [1, 2, 3] and (tmp_path / "hub" / "out" / "final").is_dir()
    assert from_hub == pytest.approx(local, abs=1e-6)


def test_hostile_records_from_the_hub_are_skipped_and_counted(tmp_path, data_dir, hub_cache):
    fill_hub_cache(hub_cache, REPO, data_dir / "export", extra_lines=[
        b"{this is not json\n", b'{"messages": [{"role": "user", "content": [{"type": "image", '
                                b'"image": "images/nope.png"}, {"type": "text", "text": "hi"}]}, '
                                b'{"role": "assistant", "content": "x"}]}\n', b"[[[[[[[[[[]]]]]]]]]]\n"])
    result = _run(tmp_path, "hostile", f"hf://datasets/{REPO}")
    assert result.steps == 3
    assert result.skipped.get("schema", 0) >= 2 and result.skipped.get("missing_image", 0) >= 1


def test_offline_without_the_dataset_says_what_to_download(tmp_path, hub_cache, capsys):
    mixture = write_mixture(tmp_path / "m.yaml", [("feedback", "hf://datasets/host/never-downloaded", 1.0)])
    assert main(["--config", str(write_run(tmp_path, mixture))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "hf download host/never-downloaded --repo-type dataset" in err


@pytest.mark.parametrize("source", ["hf://datasets/no-owner", "hf://models/a/b", "hf://datasets/a/b c",
                                    "hf://datasets/a/b@../../x"])
def test_a_malformed_hub_id_is_one_line(tmp_path, hub_cache, capsys, source):
    mixture = write_mixture(tmp_path / "m.yaml", [("feedback", source, 1.0)])
    assert main(["--config", str(write_run(tmp_path, mixture))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "hf://" in err


def test_merged_lines_keep_unparsable_records_for_the_reader_to_count(tmp_path):
    snap = tmp_path / "snap"
    (snap / "conversations").mkdir(parents=True)
    rec = json.dumps({"id": "a", "messages": [{"role": "user", "content": "q"}]}).encode()
    (snap / "conversations" / "a.jsonl").write_bytes(rec + b"\n" + b"not json\n")
    (snap / "conversations" / "b.jsonl").write_bytes(rec.replace(b'"a"', b'"b"') + b"\n\n")
    assert list(feedback_data.merged_lines(snap)) == [rec + b"\n", b"not json\n"]
