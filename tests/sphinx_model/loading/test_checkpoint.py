import subprocess
import sys

import pytest
import torch

from sphinx_model.config import SphinxConfig, get_preset, list_presets
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import CheckpointError, from_pretrained, save_pretrained


def test_presets_round_trip_as_json_without_downloads():
    for name in ["sphinx-tiny", "sphinx-tiny-1k", "sphinx-intern2", "sphinx-plus", "sphinx-moe"]:
        assert name in list_presets()
        cfg = get_preset(name)
        assert SphinxConfig.from_json(cfg.to_json()) == cfg
    assert get_preset("sphinx-tiny-1k").anchor == "center" and get_preset("sphinx-moe").skip_tokens
    assert get_preset("sphinx-intern2").llm.trust_remote_code
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("sphinx-huge")


@pytest.mark.parametrize("shard", ["5GB", "200KB"])
def test_save_load_gives_identical_logits(tiny, make_image, tmp_path, shard):
    model, proc = tiny
    folder = save_pretrained(model, proc, tmp_path / "ckpt", max_shard_size=shard)
    if shard == "200KB":
        assert (folder / "model.safetensors.index.json").is_file()
    loaded, lproc = from_pretrained(folder)
    conv = Conversation([Message.user("What is it?", image=True), Message.assistant("A box."),
                         Message.user("Colour?")])
    img = make_image(100, 50)
    with torch.no_grad():
        a = model(**proc(conv, img)).logits
        b = loaded(**lproc(conv, img)).logits
    assert torch.equal(a, b)
    assert all(not p.requires_grad for e in loaded.experts for p in e.parameters())
    assert lproc.tokenizer.encode("héllo") == proc.tokenizer.encode("héllo")


def test_missing_checkpoint_offline_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a local folder"):
        from_pretrained("someone/not-cached-sphinx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="convert-accessory"):
        from_pretrained(tmp_path / "empty")


def test_mismatched_weights_are_reported(tiny, tmp_path):
    model, proc = tiny
    folder = save_pretrained(model, proc, tmp_path / "ckpt")
    cfg = SphinxConfig.load(folder).replace(skip_tokens=False)   # config without skip_img
    cfg.save(folder)
    with pytest.raises(CheckpointError, match="unexpected.*skip_img"):
        from_pretrained(folder)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sphinx_model", *args], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_cli_chat_one_answer_and_bad_inputs(tiny, make_image, tmp_path, capsys):
    from sphinx_model.__main__ import main

    model, proc = tiny
    folder = save_pretrained(model, proc, tmp_path / "ckpt")
    img = tmp_path / "x.png"
    make_image(120, 60).save(img)
    ok = run_cli("chat", "--model", str(folder), "--image", str(img), "--prompt", "What is it?",
                 "--max-new-tokens", "5", "--boxes")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    for args in (["--model", str(folder), "--image", str(bad)], ["--model", str(tmp_path / "nope")],
                 ["--model", str(folder), "--image", str(tmp_path / "missing.png")]):
        assert main(["chat", *args, "--prompt", "hi", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err, err


def test_cli_interactive_multi_turn(tiny, make_image, tmp_path, monkeypatch, capsys):
    from sphinx_model.__main__ import main
    model, proc = tiny
    folder = save_pretrained(model, proc, tmp_path / "ckpt")
    img = tmp_path / "x.png"
    make_image(60, 120).save(img)
    questions = iter(["What is it?", "", "And the colour?", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    assert main(["chat", "--model", str(folder), "--image", str(img), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert next(questions, None) is None   # every line was read, the empty one re-prompted


REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
'''
REMOTE_MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def test_backbone_with_hub_code_builds_saves_and_reloads(tmp_path, make_image):
    """InternLM2's path: modeling code shipped beside the weights, `trust_remote_code` from config."""
    import json

    from sphinx_model.loading import build_from_config
    code = tmp_path / "remote_llm"
    code.mkdir()
    (code / "configuration_tinyremote.py").write_text(REMOTE_CONFIG)
    (code / "modeling_tinyremote.py").write_text(REMOTE_MODELING)
    base = get_preset("sphinx-test-tiny")
    dims = {k: v for k, v in base.llm.config.items() if k != "model_type"}
    (code / "config.json").write_text(json.dumps({
        "model_type": "tinyremote", **dims,
        "auto_map": {"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                     "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"}}))
    cfg = base.replace(llm={**base.llm.__dict__, "config": None, "name_or_path": str(code),
                            "trust_remote_code": True})
    torch.manual_seed(0)
    model, proc = build_from_config(cfg)
    assert type(model.llm).__name__ == "TinyRemoteForCausalLM"
    folder = save_pretrained(model, proc, tmp_path / "ckpt")
    loaded, lproc = from_pretrained(folder)
    conv = Conversation([Message.user("What is it?", image=True)])
    with torch.no_grad():
        assert torch.equal(model(**proc(conv, make_image(64, 64))).logits,
                           loaded(**lproc(conv, make_image(64, 64))).logits)
