"""`released:NAME` through the hub path, with the download replaced at the network boundary
(`huggingface_hub.snapshot_download`) by a local folder in the released layout: the first call
downloads only that folder and converts it, later calls load the cache without asking the hub,
offline too; offline without a cache is one clear error that says what to download and where."""
import io
import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
import sentencepiece as spm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

from sphinx_model import from_pretrained  # the package's API, as the README shows it
from sphinx_model.__main__ import main
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import CheckpointError
from sphinx_model.released import convert as ca
from sphinx_model.released import hub as released

sys.path.insert(0, str(Path(__file__).parent))
from released_reference import MEMBERS, tiny_config, write_released  # noqa: E402

REVISION = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """snapshot_download over a local 'remote': copies the files that `allow_patterns` select into a
    hub-style cache (snapshots/<commit>/...), and honours offline mode as the real one does."""

    def __init__(self, remote: Path, cache: Path):
        self.remote, self.cache, self.calls, self.offline = remote, cache, [], False

    def __call__(self, repo_id, allow_patterns=None, **kwargs):
        self.calls.append((repo_id, list(allow_patterns or [])))
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / REVISION
        if not snapshot.exists():
            if self.offline:
                raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
            for path in self.remote.rglob("*"):
                rel = path.relative_to(self.remote).as_posix()
                if path.is_file() and any(Path(rel).match(p) for p in allow_patterns):
                    (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, snapshot / rel)
        return str(snapshot)


@pytest.fixture
def hub(tmp_path, monkeypatch, tmp_path_factory):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["### Human: What is it? ### Assistant: A cat."] * 30),
                                   model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    remote = tmp_path / "remote"
    write_released(MEMBERS["llama_ens_light"], remote / "finetune/mm/SPHINX/SPHINX-Tiny", tmp_path / "tokenizer.model")
    (remote / "finetune/mm/SPHINX/SPHINX-MoE").mkdir(parents=True)
    (remote / "finetune/mm/SPHINX/SPHINX-MoE/consolidated.00-of-08.model.pth").write_bytes(b"not to be fetched")
    fake = FakeHub(remote, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("SPHINX_CACHE", str(tmp_path / "sphinx-cache"))
    # the tiny folder's experts are toy-width ones, not SPHINX-Tiny's full-size ones
    real = ca.get_preset
    monkeypatch.setitem(ca.RELEASED_TYPES, "llama_ens_light", ca.ReleasedType("tiny-llama_ens_light"))
    monkeypatch.setattr(ca, "get_preset", lambda name: tiny_config(MEMBERS["llama_ens_light"])
                        if name == "tiny-llama_ens_light" else real(name))
    return fake


def _logits(model, processor):
    batch = processor(Conversation([Message.user("What is it?", image=True)]), Image.new("RGB", (40, 30), (200, 40, 90)))
    with torch.no_grad():
        return model(**batch).logits


def test_first_call_downloads_and_converts_later_calls_load_the_cache_offline_too(hub, tmp_path, monkeypatch):
    model, processor = from_pretrained("released:SPHINX-Tiny")
    assert hub.calls == [("Alpha-VLLM/LLaMA2-Accessory", ["finetune/mm/SPHINX/SPHINX-Tiny/*"])]
    hf_files = [p.name for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    assert "consolidated.00-of-01.model.pth" in hf_files and not any("08" in n for n in hf_files)  # only that folder
    folder = tmp_path / "sphinx-cache/released/SPHINX-Tiny"
    stamp = json.loads((folder / released.STAMP).read_text())
    assert stamp["revision"] == REVISION and stamp["folder"] == "finetune/mm/SPHINX/SPHINX-Tiny"
    assert "0 unmapped, 0 missing" in stamp["report"][0] and not list(folder.parent.glob(".SPHINX-Tiny.*"))
    first = _logits(model, processor)

    again, processor2 = from_pretrained("released:SPHINX-Tiny")           # from the cache: the hub is not asked
    hub.offline = True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    offline, processor3 = from_pretrained("released:SPHINX-Tiny")
    assert len(hub.calls) == 1
    assert torch.equal(_logits(again, processor2), first) and torch.equal(_logits(offline, processor3), first)
    assert main(["chat", "--model", "released:SPHINX-Tiny", "--prompt", "What is it?", "--max-new-tokens", "2"]) == 0


def test_offline_without_a_cache_says_what_to_download_and_where(hub, tmp_path, monkeypatch, capsys):
    hub.offline = True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as err:
        from_pretrained("released:SPHINX-Tiny")
    message = str(err.value)
    for part in ("released:SPHINX-Tiny is not converted yet", "HF_HUB_OFFLINE is set", "Alpha-VLLM/LLaMA2-Accessory",
                 "finetune/mm/SPHINX/SPHINX-Tiny/*", str(tmp_path / "sphinx-cache/released/SPHINX-Tiny"),
                 "hf download"):
        assert part in message, part
    assert main(["chat", "--model", "released:SPHINX-Tiny", "--prompt", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: released:SPHINX-Tiny is not converted yet")
    assert not (tmp_path / "sphinx-cache/released/SPHINX-Tiny").exists()


def test_a_failed_conversion_leaves_no_half_checkpoint(hub, tmp_path):
    shard = next((hub.remote / "finetune/mm/SPHINX/SPHINX-Tiny").glob("consolidated.*"))
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        from_pretrained("released:SPHINX-Tiny")
    cache = tmp_path / "sphinx-cache/released"
    assert not (cache / "SPHINX-Tiny").exists() and list(cache.iterdir()) == []


def test_unknown_names_and_the_cli_converter(hub, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="unknown released checkpoint 'released:SPHINX-Huge'; known: "
                                              "released:SPHINX-Tiny, released:SPHINX-Tiny-1k"):
        from_pretrained("released:SPHINX-Huge")
    assert main(["convert-accessory", "released:SPHINX-Tiny", str(tmp_path / "out")]) == 0
    assert "0 unmapped, 0 missing" in capsys.readouterr().out
    assert (tmp_path / "out/README.md").read_text().count("SPHINX-Tiny") >= 1
    from_pretrained(tmp_path / "out")


def test_push_uploads_our_format(hub, tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, commit_message=""):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), ignore_patterns))
            return "https://huggingface.co/you/sphinx-tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = released.resolve_released("released:SPHINX-Tiny")
    assert main(["push", str(folder), "you/sphinx-tiny", "--private"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/you/sphinx-tiny/commit/abc"
    upload = calls[-1]
    assert calls[1] == ("create", "you/sphinx-tiny", True, True)
    assert {"sphinx_config.json", "model.safetensors", "tokenizer.model"} <= set(upload[2])
    assert upload[3] == [released.STAMP]
    assert main(["push", str(tmp_path), "you/x"]) == 2
    assert "not a SPHINX checkpoint" in capsys.readouterr().err
