"""Visual experts: registry, token layout, frozen behaviour, DINOv2 hub semantics, released-key
mapping, offline weight errors. Tiny random encoders on CPU; the real architectures only on
the meta device (no memory, no download)."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from sphinx_model.config import ExpertConfig, get_preset
from sphinx_model.experts import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
                                  ClipConvNeXtExpert, DINOv2Expert, ExpertWeightsUnavailable,
                                  VisualExpert, build_expert, hub_interpolate_pos_embed,
                                  list_experts, register_expert)
from sphinx_model.experts import registry
from sphinx_model.experts.clip_convnext import build_trunk

RELEASED_TSV = Path(__file__).resolve().parents[3] / "shared/reference/released_keys_sphinx_tiny.tsv"


def tiny_experts() -> dict[str, ExpertConfig]:
    return {e.kind: e for e in get_preset("sphinx-test-tiny").experts}


def real_experts() -> dict[str, ExpertConfig]:
    return {e.kind: e for e in get_preset("sphinx-tiny").experts}


def tiny_swiglu_dinov2() -> ExpertConfig:
    """ViT-g's architecture (packed SwiGLU) at toy width: released naming uses mlp.w12 / w3."""
    opts = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    return ExpertConfig("dinov2", "vit_giant_patch14_dinov2", 28, "dinov2_vitg14", None, opts)


def pixels(cfg: ExpertConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)


def randomise(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Replace every weight so layer scales / norms are far from their (near-identity) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# --- registry ------------------------------------------------------------------------------
def test_builtins_registered_and_unknown_kind_errors():
    assert {"clip_convnext", "dinov2"} <= set(list_experts())
    assert registry.get_expert_class("dinov2") is DINOv2Expert
    bad = dataclasses.replace(tiny_experts()["dinov2"], kind="no_such_expert")
    with pytest.raises(KeyError, match="no_such_expert.*clip_convnext"):
        build_expert(bad)


def test_custom_third_expert_plugs_in(monkeypatch):
    monkeypatch.setattr(registry, "_EXPERTS", dict(registry._EXPERTS))

    @register_expert("toy_patches")
    class ToyExpert(VisualExpert):
        mean, std = CLIP_MEAN, CLIP_STD

        def __init__(self, image_size: int, width: int) -> None:
            super().__init__(image_size, out_dim=width, grid_size=image_size // 8)
            self.proj = nn.Conv2d(3, width, 8, stride=8)

        @classmethod
        def from_config(cls, cfg, load_weights=False):
            return cls(cfg.image_size, cfg.options["width"])

        def forward(self, x):
            grid = self.proj(x).flatten(2).transpose(1, 2)
            return torch.cat([grid.mean(1, keepdim=True), grid], 1)

    cfg = ExpertConfig("toy_patches", "toy", 16, "toy", None, {"width": 6})
    expert = build_expert(cfg)
    assert isinstance(expert, ToyExpert) and "toy_patches" in list_experts()
    assert expert(pixels(cfg)).shape == (2, expert.num_tokens, 6) == (2, 5, 6)
    assert not any(p.requires_grad for p in expert.parameters()) and not expert.training
    with pytest.raises(ValueError, match="already registered"):
        register_expert("toy_patches")(type("Other", (ToyExpert,), {}))


# --- CLIP-ConvNeXt -------------------------------------------------------------------------
def test_convnext_tokens_are_mean_plus_normed_map():
    cfg = tiny_experts()["clip_convnext"]
    expert = build_expert(cfg)
    x = pixels(cfg)
    tokens = expert(x)
    assert (expert.grid_size, expert.out_dim) == (2, 320)
    assert tokens.shape == (2, expert.num_tokens, expert.out_dim) == (2, 5, 320)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1))

    trunk = build_trunk(cfg.model_name, cfg.image_size)  # the open_clip tower's timm trunk
    assert list(trunk.state_dict()) == list(expert.state_dict())  # bare trunk keys, nothing else
    trunk.load_state_dict(expert.state_dict())
    with torch.no_grad():
        fmap = trunk.head.norm(trunk.forward_features(x))  # (N, C, g, g) after head.norm
    torch.testing.assert_close(tokens[:, 1:], fmap.flatten(2).transpose(1, 2))  # row-major


def test_convnext_released_keys_round_trip():
    cfg = tiny_experts()["clip_convnext"]
    source, target = build_expert(cfg), build_expert(cfg)
    released = {**source.state_dict(), "head.fc.weight": torch.zeros(1)}
    mapped, unmapped = ClipConvNeXtExpert.map_released_state_dict(released)
    assert unmapped == ["head.fc.weight"]
    target.load_state_dict(mapped, strict=True)
    x = pixels(cfg)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("layout", ["open_clip.safetensors", "bare_trunk.pth"])
def test_convnext_loads_checkpoint_file(layout, tmp_path):
    cfg = tiny_experts()["clip_convnext"]
    source = build_expert(cfg)
    path = tmp_path / layout
    if layout.endswith(".safetensors"):  # a full CLIP checkpoint: only visual.trunk.* is read
        ckpt = {f"visual.trunk.{k}": v.contiguous() for k, v in source.state_dict().items()}
        save_file({**ckpt, "text.token_embedding.weight": torch.zeros(2, 2)}, path)
    else:
        torch.save(source.state_dict(), path)
    loaded = build_expert(dataclasses.replace(cfg, pretrained=str(path)), load_weights=True)
    assert torch.equal(source(pixels(cfg)), loaded(pixels(cfg)))


# --- frozen ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip_convnext", "dinov2"])
def test_experts_frozen_and_stay_eval(kind):
    expert = build_expert(tiny_experts()[kind])
    parent = nn.ModuleDict({"expert": expert, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in expert.modules())
    assert not any(p.requires_grad for p in expert.parameters())


# --- DINOv2 ----------------------------------------------------------------------------------
def test_dinov2_renormalises_clip_input_to_imagenet():
    tiny = tiny_experts()["dinov2"]
    cfg = dataclasses.replace(tiny, options={**tiny.options, "img_size": tiny.image_size})  # no resize
    expert = build_expert(cfg)
    bare = timm.create_model(cfg.model_name, num_classes=0, **cfg.options).eval()
    bare.load_state_dict(expert.state_dict())
    x_clip = pixels(cfg)
    mean = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    x_imagenet = ((x_clip * mean(CLIP_STD) + mean(CLIP_MEAN)) - mean(IMAGENET_MEAN)) / mean(IMAGENET_STD)
    with torch.no_grad():
        want = bare.forward_features(x_imagenet)
    got = expert(x_clip)
    assert got.shape == (2, 5, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert expert.mean == IMAGENET_MEAN and ClipConvNeXtExpert.std == CLIP_STD


@pytest.mark.parametrize("side,grid", [(37, 16), (37, 2)])
def test_pos_embed_uses_hub_scale_factor_form(side, grid):
    table = torch.randn(1, 1 + side * side, 8, generator=torch.Generator().manual_seed(1))
    got = hub_interpolate_pos_embed(table, grid)
    patches = table[:, 1:].reshape(1, side, side, 8).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / side  # torch-hub: (w0 + 0.1) / sqrt(N)
    hub = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
    hub = torch.cat([table[:, :1], hub.permute(0, 2, 3, 1).reshape(1, grid * grid, 8)], 1)
    torch.testing.assert_close(got, hub)
    size_form = resample_abs_pos_embed(table, (grid, grid), antialias=False)  # transformers-like
    assert (got - size_form).abs().max() > 1e-3
    assert hub_interpolate_pos_embed(table, side) is table  # matching grid: table as is


def hub_dinov2_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """torch-hub DINOv2 written out from its definition (released names, ImageNet-normed input)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    n, c, g, _ = x.shape
    x = torch.cat([sd["cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    table = sd["pos_embed"]
    side = math.isqrt(table.shape[1] - 1)
    patch_pos = table[:, 1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((g + 0.1) / side,) * 2, mode="bicubic")
    x = x + torch.cat([table[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, g * g, c)], 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], 1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.reshape(n, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(n, -1, c)
        x = x + p["ls1.gamma"] * F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], 1e-6)
        x1, x2 = F.linear(h, p["mlp.w12.weight"], p["mlp.w12.bias"]).chunk(2, dim=-1)
        h = F.linear(F.silu(x1) * x2, p["mlp.w3.weight"], p["mlp.w3.bias"])
        x = x + p["ls2.gamma"] * h
    return F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], 1e-6)


def to_released(sd: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """Own (timm) names -> torch-hub names, plus the hub's unused mask_token."""
    out = {}
    for k, v in sd.items():
        if swiglu:
            k = k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v.clone()
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def test_dinov2_swiglu_released_weights_match_hub_math():
    cfg = tiny_swiglu_dinov2()
    source = build_expert(cfg)
    randomise(source)
    released = to_released(source.state_dict(), swiglu=True)
    assert "blocks.0.mlp.w12.weight" in released
    exported = DINOv2Expert.to_released_state_dict(source.state_dict())   # the export direction
    assert set(exported) == set(released) - {"mask_token"}
    plain = build_expert(tiny_experts()["dinov2"]).state_dict()
    assert DINOv2Expert.to_released_state_dict(plain).keys() == plain.keys()  # plain MLP keeps fc1/fc2
    mapped, unmapped = DINOv2Expert.map_released_state_dict(released)
    assert unmapped == ["mask_token"] == list(DINOv2Expert.unused_released_keys)
    target = build_expert(cfg)
    target.load_state_dict(mapped, strict=True)
    x = pixels(cfg)
    got = target(x)
    assert torch.equal(got, source(x))
    from sphinx_model.experts.dinov2 import clip_to_imagenet
    want = hub_dinov2_forward(released, clip_to_imagenet(x), heads=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dinov2_plain_mlp_released_keys_pass_through(tmp_path):
    cfg = tiny_experts()["dinov2"]
    source = build_expert(cfg)
    randomise(source, seed=3)
    mapped, unmapped = DINOv2Expert.map_released_state_dict({**to_released(source.state_dict(), False),
                                                             "blocks.0.extra.weight": torch.zeros(1)})
    assert unmapped == ["blocks.0.extra.weight", "mask_token"]
    assert set(mapped) == set(source.state_dict())
    # a timm-format file as `pretrained` loads through timm's own loader
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = build_expert(dataclasses.replace(cfg, pretrained=str(tmp_path / "model.safetensors")),
                          load_weights=True)
    assert torch.equal(loaded(pixels(cfg)), source(pixels(cfg)))


# --- real architectures: shapes and released keys (meta device, nothing allocated) ----------
@pytest.mark.parametrize("kind,dim,n_keys", [("clip_convnext", 3072, 378), ("dinov2", 1536, 566)])
def test_real_experts_match_released_layout(kind, dim, n_keys):
    cfg = real_experts()[kind]
    with torch.device("meta"):
        expert = build_expert(cfg)
    assert (expert.out_dim, expert.grid_size, expert.num_tokens) == (dim, 16, 257)
    own = {k: tuple(v.shape) for k, v in expert.state_dict().items()}
    assert len(own) == n_keys
    if kind == "dinov2":
        assert own["pos_embed"] == (1, 1370, 1536) and own["blocks.39.mlp.fc1.weight"] == (8192, 1536)
    else:
        assert own["head.norm.weight"] == (3072,) and expert.head["norm"].eps == 1e-5
    if not RELEASED_TSV.is_file():
        return
    prefix = f"llma.{cfg.key}."
    rows = [line.split("\t") for line in RELEASED_TSV.read_text().splitlines()[1:]]
    released = {r[0][len(prefix):]: torch.empty(eval(r[1]), device="meta")
                for r in rows if r[0].startswith(prefix)}
    mapped, unmapped = expert.map_released_state_dict(released)
    assert unmapped == list(expert.unused_released_keys)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == own


# --- weights: offline errors -------------------------------------------------------------------
@pytest.mark.parametrize("kind,names", [
    ("clip_convnext", "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"),
    ("dinov2", "timm/vit_giant_patch14_dinov2.lvd142m"),
])
def test_offline_missing_weights_raise_clear_error(kind, names, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ExpertWeightsUnavailable, match="HF_HUB_OFFLINE") as err:
        build_expert(real_experts()[kind], load_weights=True)
    assert names in str(err.value)
    assert time.monotonic() - start < 10  # fails before building the full-size encoder


def test_load_weights_without_pretrained_is_an_error():
    with pytest.raises(ValueError, match="pretrained"):
        build_expert(tiny_experts()["clip_convnext"], load_weights=True)
