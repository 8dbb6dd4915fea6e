"""The experts of the four-expert released members: CLIP ViT-L/14 (which activation the release
runs), the BLIP-2 Q-Former (own tokens, not fused), ConvNeXt at 256 px for 224-px views, and every
released key of the full-size members mapped both ways (meta device: nothing allocated)."""
from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import re
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Blip2Config, Blip2Model

from sphinx_model.config import ExpertConfig, get_preset
from sphinx_model.experts import ClipViTExpert, QFormerExpert, build_expert
from sphinx_model.experts.clip_vit import build_tower
from sphinx_model.released.convert import _empty_model, _map_all, llm_config

RELEASED_TSV = Path(__file__).resolve().parents[3] / "shared/reference/released_keys_sphinx_tiny.tsv"
CLIP_TINY = ExpertConfig("clip_vit", "ViT-L-14", 28, "clip", None, {"width": 32, "layers": 2, "head_width": 16})
QF_TINY = ExpertConfig("blip2_qformer", "Salesforce/blip2-opt-2.7b", 28, "qformer", None, {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "qformer": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "num_query_tokens": 3})


def pixels(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)


# --- CLIP ViT-L/14 ---------------------------------------------------------------------------------
def test_clip_activation_is_the_one_the_released_inference_builds():
    """Settles the open fact: the released inference builds open_clip's `ViT-L-14` with
    pretrained=None, i.e. plain GELU, although OpenAI trained those weights with QuickGELU."""
    with torch.device("meta"):
        authors = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")  # as the release's inference
        ours = build_expert(next(e for e in get_preset("sphinx-moe-released").experts if e.kind == "clip_vit"))
    authors_act = type(authors.visual.transformer.resblocks[0].mlp.gelu)
    assert authors_act is nn.GELU and type(ours.transformer.resblocks[0].mlp.gelu) is authors_act
    assert open_clip.get_pretrained_cfg("ViT-L-14", "openai").get("quick_gelu") is True  # how CLIP was trained
    quick = build_expert(dataclasses.replace(CLIP_TINY, options={**CLIP_TINY.options, "quick_gelu": True}))
    assert type(quick.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert (ours.out_dim, ours.num_tokens, ours.grid_size) == (1024, 257, 16)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_clip_tokens_are_open_clips_tower_after_ln_post_without_proj(quick_gelu):
    cfg = dataclasses.replace(CLIP_TINY, options={**CLIP_TINY.options, "quick_gelu": quick_gelu})
    expert = build_expert(cfg)
    randomise(expert)
    tower = build_tower("ViT-L-14", 28, quick_gelu, {"width": 32, "layers": 2, "head_width": 16})
    tower.load_state_dict({**expert.state_dict(), "proj": tower.proj.detach()})
    x = pixels(28)
    with torch.no_grad():
        want = tower.ln_post(tower.transformer(tower._embeds(x)))   # open_clip's own path, every token
        got = expert(x)
    assert got.shape == (2, 5, 32)
    torch.testing.assert_close(got, want)


def test_clip_released_keys_both_ways():
    expert = build_expert(CLIP_TINY)
    released = ClipViTExpert.to_released_state_dict(expert.state_dict())
    assert all(k.startswith("visual.") for k in released)
    extra = {"visual.proj": torch.zeros(32, 8), "logit_scale": torch.zeros(()), "text_projection": torch.zeros(8, 8)}
    mapped, rest = ClipViTExpert.map_released_state_dict({**released, **extra})
    assert set(mapped) == set(expert.state_dict()) and rest == sorted(extra)
    assert all(ClipViTExpert.is_unused_released_key(k) for k in rest)


# --- BLIP-2 Q-Former ---------------------------------------------------------------------------------
def test_qformer_tokens_are_blip2_qformer_features(tmp_path):
    expert = build_expert(QF_TINY)
    assert not expert.fused and expert.num_tokens == 3 and expert.out_dim == 32
    randomise(expert)
    reference = Blip2Model(Blip2Config(vision_config={**QF_TINY.options["vision"], "image_size": 28},
                                       qformer_config={**QF_TINY.options["qformer"], "encoder_hidden_size": 32},
                                       text_config={"model_type": "opt", "hidden_size": 16, "num_hidden_layers": 1,
                                                    "ffn_dim": 16, "num_attention_heads": 2, "vocab_size": 32,
                                                    "word_embed_proj_dim": 16}, num_query_tokens=3)).eval()
    missing, _ = reference.load_state_dict(expert.state_dict(), strict=False)
    assert all(k.startswith(("language_model.", "language_projection.")) for k in missing)
    x = pixels(28)
    with torch.no_grad():
        torch.testing.assert_close(expert(x), reference.get_qformer_features(pixel_values=x))
    # weights from a local file in the hub checkpoint's layout (only its own keys are read)
    path = tmp_path / "blip2.safetensors"
    save_file({**{k: v.contiguous() for k, v in expert.state_dict().items()}, "language_projection.weight": torch.ones(2)},
              path)
    loaded = build_expert(dataclasses.replace(QF_TINY, pretrained=str(path)), load_weights=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), expert(x))


def test_qformer_ignores_only_the_text_input_ffn():
    expert = build_expert(QF_TINY)
    sd = {**expert.state_dict(), "qformer.encoder.layer.0.intermediate.dense.weight": torch.zeros(1),
          "qformer.encoder.layer.1.output.dense.bias": torch.zeros(1), "bogus.weight": torch.zeros(1)}
    mapped, rest = QFormerExpert.map_released_state_dict(sd)
    assert set(mapped) == set(expert.state_dict())
    assert rest == ["bogus.weight", "qformer.encoder.layer.0.intermediate.dense.weight",
                    "qformer.encoder.layer.1.output.dense.bias"]
    assert [QFormerExpert.is_unused_released_key(k) for k in rest] == [False, True, True]


# --- ConvNeXt for 224-px views ---------------------------------------------------------------------------
def test_convnext_runs_at_its_run_size_and_repeats_the_map():
    plain = ExpertConfig("clip_convnext", "convnext_atto", 64, "openclip_convnext_xxl", None, {})
    small = dataclasses.replace(plain, image_size=56, options={"run_size": 64, "upsample": 2})
    a, b = build_expert(plain), build_expert(small)
    b.load_state_dict(a.state_dict())
    x = pixels(56)
    with torch.no_grad():
        got, ref = b(x), a(torch.nn.functional.interpolate(x, size=(64, 64)))   # nearest, as released
    assert (b.grid_size, b.num_tokens) == (4, 17) and got.shape == (2, 17, 320)
    grid = ref[:, 1:].reshape(2, 2, 2, 320).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 16, 320)
    torch.testing.assert_close(got[:, 1:], grid)
    torch.testing.assert_close(got[:, 0], ref[:, 0])       # the mean is unchanged by repeating


@pytest.mark.parametrize("cfg, message", [
    (ExpertConfig("clip_convnext", "convnext_atto", 56, "k", None, {"run_size": 60}), "multiple of 32"),
    (ExpertConfig("clip_convnext", "convnext_atto", 56, "k", None, {"upsample": 0}), "positive integer"),
    (ExpertConfig("clip_convnext", "convnext_atto", 56, "k", None, {"size": 1}), "run_size and upsample"),
    (dataclasses.replace(CLIP_TINY, options={"depth": 2}), "clip_vit takes options"),
    (dataclasses.replace(CLIP_TINY, options={"quick_gelu": "yes"}), "true or false"),
    (dataclasses.replace(CLIP_TINY, model_name="convnext_base"), "no plain ViT"),
    (dataclasses.replace(QF_TINY, options={"queries": 3}), "blip2_qformer takes options"),
    (dataclasses.replace(QF_TINY, options={"num_query_tokens": 0}), "at least one query"),
    (dataclasses.replace(QF_TINY, options={"vision": []}), "must be JSON objects"),
])
def test_expert_options_are_checked(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_expert(cfg)


# --- every released key of the full-size four-expert members -----------------------------------------
@functools.cache
def released_vision_keys() -> dict[str, torch.Tensor]:
    """The four experts' released keys: CLIP and the Q-Former built the way the authors' classes
    build them (open_clip's `ViT-L-14` without its text transformer, transformers' `Blip2Model`
    without its language parts; meta device), ConvNeXt and DINOv2 from the authors' key list."""
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
        clip.transformer = None
        qformer = Blip2Model(Blip2Config())
        qformer.language_projection, qformer.language_model = None, None
    sd = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    sd |= {f"qformer.{k}": v for k, v in qformer.state_dict().items()}
    with RELEASED_TSV.open() as f:
        sd |= {r["key"].removeprefix("llma."): torch.empty(ast.literal_eval(r["shape"]), device="meta")
               for r in csv.DictReader(f, delimiter="\t")
               if r["key"].startswith(("llma.openclip_convnext_xxl.", "llma.dinov2_vitg14."))}
    return sd


def released_four_expert_keys(moe: bool) -> dict[str, torch.Tensor]:
    """A full-size four-expert member's released key set (tiny LLM), without `llma.`."""
    sd = dict(released_vision_keys())
    d, f, e = 64, 96, 4
    for name, shape in {"qformer_proj.0.weight": (d, 768), "qformer_proj.0.bias": (d,), "qformer_proj.1.weight": (d,),
                        "qformer_proj.1.bias": (d,), "visual_proj.0.weight": (d, 5632), "visual_proj.0.bias": (d,),
                        "visual_proj.1.weight": (d,), "visual_proj.1.bias": (d,), "start_img": (1, 1, d),
                        "end_img": (1, 1, d), "tok_embeddings.weight": (384, d), "norm.weight": (d,),
                        "output.weight": (384, d)}.items():
        sd[name] = torch.empty(shape, device="meta")
    for i in range(2):
        p = f"layers.{i}."
        layer = {"attention.wq.weight": (d, d), "attention.wk.weight": (d // 2, d), "attention.wv.weight": (d // 2, d),
                 "attention.wo.weight": (d, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
        layer |= ({"feed_forward.gate.weight": (e, d), "feed_forward.w1": (e * f, d), "feed_forward.w2": (e * f, d),
                   "feed_forward.w3": (e * f, d)} if moe else
                  {"feed_forward.w1.weight": (f, d), "feed_forward.w2.weight": (d, f), "feed_forward.w3.weight": (f, d)})
        sd |= {p + k: torch.empty(s, device="meta") for k, s in layer.items()}
    return sd


FOUR = ["sphinx", "sphinx-1k", "sphinx-v2-1k", "sphinx-moe-released", "sphinx-moe-1k"]


def test_the_four_expert_presets_share_their_experts_and_layout():
    """Their state dicts differ only in the LLM, so the full-size mapping below covers all five."""
    configs = [get_preset(n) for n in FOUR]
    keys = [[(e.kind, e.key, e.model_name) for e in c.experts] for c in configs]
    assert all(k == keys[0] for k in keys) and [e.kind for e in configs[0].experts][0] == "blip2_qformer"
    assert {c.tokens_per_view for c in configs} == {32 + 257}
    assert [(c.canvas_size, c.grid) for c in configs] == [(224, 1), (448, 2), (448, 2), (512, 1), (1024, 2)]
    convnext = [next(e for e in c.experts if e.kind == "clip_convnext") for c in configs]
    assert [(e.image_size, e.options) for e in convnext] == [(224, {"run_size": 256, "upsample": 2})] * 3 + \
        [(512, {})] * 2


@pytest.mark.skipif(not RELEASED_TSV.is_file(), reason="reference key list not available")
def test_every_released_key_of_the_full_size_members_maps():
    """SPHINX-MoE-1k at full expert size (the dense LLM's keys are mapped at tiny size elsewhere)."""
    base = get_preset("sphinx-moe-1k")
    sd = released_four_expert_keys(moe=True)
    notes: list[str] = []
    hf = llm_config({"n_heads": 4, "n_kv_heads": 2, "moe": {"num_experts": 4, "num_experts_per_tok": 2}}, sd, notes)
    config = base.replace(llm={**base.llm.__dict__, "name_or_path": None, "config": hf})
    state, unmapped = _map_all(sd, config, notes)
    own = _empty_model(config).state_dict()
    assert unmapped == [] and set(state) == set(own)
    assert all(tuple(state[k].shape) == tuple(own[k].shape) for k in own)
    ignored = next(n for n in notes if n.startswith("ignored"))
    assert re.search(r"llma\.clip\.visual\.proj\b", ignored) and "mask_token" in ignored
    assert own["visual_proj.0.weight"].shape == (64, 1024 + 3072 + 1536) and own["qformer_proj.0.weight"].shape == (64, 768)
