"""The demo's CNN expert: one token per stride-32 cell, each carrying the 2 x 2 stride-16 detail inside it."""
import pytest
import torch

from sphinx_model.config import ExpertConfig
from sphinx_model.experts import build_expert


def _expert(**options):
    return build_expert(ExpertConfig("timm_cnn", "tf_efficientnet_lite0", 64, "cnn", options=options))


def test_tokens_are_the_pooled_token_then_the_grid_with_the_finer_map_folded_in():
    expert = _expert()
    pixels = torch.randn(2, 3, 64, 64)
    out = expert(pixels)
    assert out.shape == (2, 1 + 2 * 2, 320 + 4 * 112) and expert.num_tokens == 5
    assert torch.allclose(out[:, 0], out[:, 1:].mean(dim=1), atol=1e-5)
    with torch.no_grad():
        s16, s32 = expert.trunk(pixels * expert.renorm_scale + expert.renorm_shift)
    assert torch.allclose(out[:, 1, :320], s32[:, :, 0, 0], atol=1e-5)       # cell (0, 0): its stride-32 feature
    fine = out[:, 2, 320:].view(2, 112, 2, 2)                                 # cell (0, 1): its 2 x 2 stride-16 block
    assert torch.allclose(fine, s16[:, :, 0:2, 2:4], atol=1e-5)
    assert _expert(fine=False)(pixels).shape == (2, 5, 320)


def test_the_expert_is_frozen_and_its_options_are_checked():
    expert = _expert()
    assert not any(p.requires_grad for p in expert.parameters())
    with pytest.raises(ValueError, match="takes the option fine"):
        _expert(depth=2)
    with pytest.raises(ValueError, match="true or false"):
        _expert(fine="yes")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_expert(ExpertConfig("timm_cnn", "tf_efficientnet_lite0", 48, "cnn"))
