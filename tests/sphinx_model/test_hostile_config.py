"""The one config validator: every way in (from_dict, from_json, load, replace, direct construction)
refuses the same hostile configs with one ConfigError line naming the field."""
import json
import math
import os

import pytest

from sphinx_model.config import (ConfigError, ExpertConfig, LLMConfig, ProjectorConfig, SphinxConfig, get_preset,
                                 list_presets)

BASE = get_preset("sphinx-test-tiny").to_dict()


def with_(path: str, value):
    """BASE with one (dotted, list-indexed) field set; `...` deletes it."""
    d = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    target = d
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is ...:
        del target[int(last) if last.isdigit() else last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return d


CASES = [  # (config data, what the message must say)
    ([], "must be a JSON object, got list"),
    ("config", "must be a JSON object, got str"),
    (None, "must be a JSON object"),
    (with_("name", ...), r"missing field\(s\) \['name'\]"),
    (with_("name", ""), "name must not be empty"),
    (with_("name", 7), "name must be a string"),
    (with_("canvas_size", -128), "canvas_size must be in 1..16384"),
    (with_("canvas_size", 10**9), "canvas_size must be in 1..16384"),
    (with_("canvas_size", 127.5), "canvas_size must be an integer"),
    (with_("canvas_size", 129), "divisible by grid"),
    (with_("grid", True), "grid must be an integer, got bool"),
    (with_("grid", 0), "grid must be >= 1"),
    (with_("tokens_per_view", "5"), "tokens_per_view must be an integer"),
    (with_("max_images", 0), "max_images must be >= 1"),
    (with_("max_length", 1), "max_length must be >= 2"),
    (with_("max_pixels", -1), "max_pixels must be >= 1"),
    (with_("skip_tokens", "yes"), "skip_tokens must be true or false"),
    (with_("anchor", "bottom"), "anchor must be one of"),
    (with_("template", "chatml"), "template must be one of"),
    (with_("tokenizer", ["a"]), "tokenizer must be a string or null"),
    (with_("surprise", 1), r"unknown field\(s\) \['surprise'\]"),
    (with_("llm", [1]), "llm must be a JSON object"),
    (with_("llm.dtype", "float8"), "llm.dtype must be one of"),
    (with_("llm.flash", True), r"llm: unknown field\(s\) \['flash'\]"),
    (with_("llm.config", "llama"), "llm.config must be a JSON object or null"),
    (with_("llm.config", {"hidden_size": 8}), "model_type"),
    (with_("llm.router_aux_loss_coef", math.nan), "router_aux_loss_coef must be a finite number"),
    (with_("llm.router_aux_loss_coef", -0.1), "router_aux_loss_coef must be >= 0"),
    (with_("llm.trust_remote_code", "false"), "trust_remote_code must be true or false"),
    (with_("llm.device_map", 3), "device_map must be"),
    (with_("experts", []), "at least one visual expert"),
    (with_("experts", {"kind": "dinov2"}), "experts must be a list"),
    (with_("experts.0", "clip"), r"experts\[0\] must be a JSON object"),
    (with_("experts.1.image_size", 0), r"experts\[1\].image_size must be >= 1"),
    (with_("experts.1.colour", 0), r"experts\[1\]: unknown field"),
    (with_("experts.0.kind", ...), r"experts\[0\]: missing field"),
    (with_("experts.0.key", "llm"), r"experts\[0\].key: 'llm' must be a Python identifier"),
    (with_("experts.0.key", "a.b"), r"experts\[0\].key"),
    (with_("experts.1.key", "openclip_convnext_xxl"), "each expert needs its own key"),
    (with_("experts.0.options", [1]), r"experts\[0\].options must be a JSON object"),
    (with_("projector", None), "projector must be a JSON object"),
    (with_("projector.type", "mlp2x"), "projector.type must be one of"),
    (with_("projector.norm_eps", 0), "projector.norm_eps must be > 0"),
    (with_("projector.norm_eps", math.inf), "projector.norm_eps must be a finite number"),
    (with_("projector.depth", 2), r"projector: unknown field"),
]


@pytest.mark.parametrize("data,message", CASES, ids=[str(i) for i in range(len(CASES))])
def test_from_dict_refuses_with_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        SphinxConfig.from_dict(data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("data,message", CASES[:12], ids=[str(i) for i in range(12)])
def test_every_way_in_goes_through_the_validator(tmp_path, data, message):
    text = json.dumps(data)
    with pytest.raises(ConfigError, match=message):
        SphinxConfig.from_json(text)
    (tmp_path / "sphinx_config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        SphinxConfig.load(tmp_path)
    changes = {k: v for k, v in data.items() if BASE.get(k) != v} if isinstance(data, dict) else {}
    if changes and set(data) == set(BASE):
        with pytest.raises(ConfigError, match=message):
            get_preset("sphinx-test-tiny").replace(**changes)


def test_direct_construction_is_validated_too():
    llm = LLMConfig(config={"model_type": "llama"})
    expert = ExpertConfig("dinov2", "vit_small_patch14_dinov2", 28, "dino")
    with pytest.raises(ConfigError, match="canvas_size"):
        SphinxConfig("x", llm, [expert], canvas_size=-4)           # the API refuses what the CLI refuses
    with pytest.raises(ConfigError, match="llm.dtype"):
        LLMConfig(dtype="int4")
    with pytest.raises(ConfigError, match="experts must be"):
        SphinxConfig("x", llm, expert)                            # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="projector.norm_eps"):
        ProjectorConfig(norm_eps=-1.0)


@pytest.mark.parametrize("text,message", [("{oops", "not valid JSON"), ("[" * 100_000, "nests too deeply"),
                                          (json.dumps(with_("name", math.nan)), "name must be a string"),
                                          (json.dumps(with_("projector.norm_eps", math.nan)), "finite number"),
                                          ("", "not valid JSON")])
def test_malformed_json_text(text, message):
    with pytest.raises(ConfigError, match=message):
        SphinxConfig.from_json(text)


def test_config_files_that_are_not_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    for path, message in ((tmp_path / "fifo.json", "FIFO"), (tmp_path / "missing.json", "cannot read"),
                          ("/dev/zero", "character device")):
        with pytest.raises(ConfigError, match=message):
            SphinxConfig.load(path)
    (tmp_path / "binary.json").write_bytes(b"\xff\x00\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        SphinxConfig.load(tmp_path / "binary.json")


def test_presets_are_valid_and_names_never_become_paths():
    for name in list_presets():
        cfg = get_preset(name)
        assert SphinxConfig.from_dict(cfg.to_dict()) == cfg
    for name in ("../presets/sphinx-test-tiny", "/etc/passwd", "sphinx-test-tiny.json", ""):
        with pytest.raises(KeyError, match="unknown preset"):
            get_preset(name)
