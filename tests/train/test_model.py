"""train/model.py: `model.experts_from` puts one checkpoint's experts under another's LLM."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sphinx_model.config import get_preset
from sphinx_model.loading import build_from_config, save_pretrained
from train.config import ConfigError, ModelSection
from train.model import build_model, check_init, model_config


def _checkpoint(folder: Path, seed: int, preset: str = "sphinx-test-tiny") -> Path:
    torch.manual_seed(seed)
    model, processor = build_from_config(get_preset(preset))
    return save_pretrained(model.eval(), processor, folder)


def test_experts_come_from_the_other_checkpoint_and_the_rest_stays(tmp_path):
    llm_side = _checkpoint(tmp_path / "a", seed=0)
    expert_side = _checkpoint(tmp_path / "b", seed=1)
    section = ModelSection(init=str(llm_side), experts_from=str(expert_side))
    model = build_model(model_config(section), section)
    a = build_model(model_config(ModelSection(init=str(llm_side))), ModelSection(init=str(llm_side)))
    b = build_model(model_config(ModelSection(init=str(expert_side))), ModelSection(init=str(expert_side)))
    prefixes = tuple(f"{k}." for k in model.expert_keys)
    mine, sa, sb = model.state_dict(), a.state_dict(), b.state_dict()
    experts = [k for k in mine if k.startswith(prefixes)]
    others = [k for k in mine if not k.startswith(prefixes)]
    assert experts and others
    assert all(torch.equal(mine[k], sb[k]) for k in experts)
    assert all(torch.equal(mine[k], sa[k]) for k in others)
    assert any(not torch.equal(sa[k], sb[k]) for k in experts)  # the swap is visible
    assert not any(p.requires_grad for k in model.expert_keys for p in getattr(model, k).parameters())


def test_experts_of_another_architecture_are_refused(tmp_path):
    llm_side = _checkpoint(tmp_path / "a", seed=0)
    preset = get_preset("sphinx-test-tiny")
    wider = [e if e.kind != "dinov2" else replace(e, options={**e.options, "embed_dim": 48, "num_heads": 2})
             for e in preset.experts]
    torch.manual_seed(0)
    model, processor = build_from_config(preset.replace(experts=wider))
    other = save_pretrained(model.eval(), processor, tmp_path / "wider")
    section = ModelSection(init=str(llm_side), experts_from=str(other))
    with pytest.raises(ConfigError, match="experts_from"):
        build_model(model_config(section), section)


def test_a_missing_experts_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="experts_from"):
        check_init(ModelSection(init="sphinx-test-tiny", experts_from=str(tmp_path / "nowhere")))
