"""The released SPHINX family at tiny widths, and its maths written from the facts, not from our modules.

`write_released` writes a folder in the authors' layout (`consolidated.NN-of-MM.model.pth` with
their key names and tensor-parallel splits, config.json, meta.json, tokenizer.model) from random
tensors, for every released `llama_type`. `reference_logits` computes what the authors' classes
compute on such a folder (shared/reference/SPHINX_X.md, and their encode_image / forward):
Meta-layout LLaMA / Mixtral maths with complex rotary, the experts run from their released
tensors (CLIP ViT and DINOv2 written out here, ConvNeXt through the timm trunk and the Q-Former
through transformers' `Blip2Model`, the libraries the authors build them with), the released
view crops, the channel fusion, the projectors and the `[BOS] views... text` sequence. Nothing
here imports sphinx_model except its config (to tell the converter what the folder is).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2Config, Blip2Model

from sphinx_model.config import ExpertConfig, SphinxConfig, get_preset

D, LAYERS, HEADS, KV, VOCAB, FFN = 64, 2, 4, 2, 384, 96       # the LLM (Llama members)
EXPERTS, TOP_K, EXPERT_FFN = 4, 2, 32                         # Mixtral members
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_TINY = {"width": 32, "layers": 2, "head_width": 16}
QF_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
QF_QFORMER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
QUERIES = 4
DINO_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@dataclass(frozen=True)
class Member:
    """One released llama_type at tiny widths: its canvas, grid and the sides its experts see."""

    llama_type: str
    canvas: int
    grid: int
    small: int                  # DINOv2 (and CLIP / Q-Former) view side
    convnext: int               # ConvNeXt view side
    convnext_run: int | None = None   # 224-px members: nearest resize to this before the trunk, map x2
    four: bool = False          # Q-Former + CLIP-L + ConvNeXt + DINOv2
    moe: bool = False

    @property
    def views(self) -> int:
        return 1 if self.grid == 1 else 1 + self.grid ** 2

    @property
    def fused_tokens(self) -> int:
        g = (self.convnext_run // 32 * 2) if self.convnext_run else self.convnext // 32
        return 1 + g * g

    @property
    def tokens_per_view(self) -> int:
        return self.fused_tokens + (QUERIES if self.four else 0)


MEMBERS = {m.llama_type: m for m in [
    Member("llama_ens_light", canvas=64, grid=1, small=28, convnext=64),
    Member("llama_ens5_light", canvas=128, grid=2, small=28, convnext=64),
    Member("llama_ens", canvas=56, grid=1, small=56, convnext=56, convnext_run=64, four=True),
    Member("llama_ens5", canvas=112, grid=2, small=56, convnext=56, convnext_run=64, four=True),
    Member("mixtral_sparse_ens", canvas=128, grid=1, small=56, convnext=128, four=True, moe=True),
    Member("mixtral_sparse_ens5", canvas=256, grid=2, small=56, convnext=128, four=True, moe=True),
]}


# --- what the converter is told ----------------------------------------------------------------
def tiny_config(m: Member) -> SphinxConfig:
    """Our config of the same tiny member (the converter's `base_config`); LLM read from the folder."""
    experts = [ExpertConfig("clip_convnext", "convnext_atto", m.convnext, "openclip_convnext_xxl", None,
                            {"run_size": m.convnext_run, "upsample": 2} if m.convnext_run else {}),
               ExpertConfig("dinov2", "vit_giant_patch14_dinov2", m.small, "dinov2_vitg14", None, dict(DINO_TINY))]
    if m.four:
        experts = [ExpertConfig("blip2_qformer", "Salesforce/blip2-opt-2.7b", m.small, "qformer", None,
                                {"vision": QF_VISION, "qformer": QF_QFORMER, "num_query_tokens": QUERIES}),
                   ExpertConfig("clip_vit", "ViT-L-14", m.small, "clip", None, dict(CLIP_TINY))] + experts
    base = get_preset("sphinx-test-released")
    return base.replace(name=f"tiny-{m.llama_type}", experts=[e.__dict__ for e in experts], canvas_size=m.canvas,
                        grid=m.grid, tokens_per_view=m.tokens_per_view)


# --- the released tensors ----------------------------------------------------------------------
def _rand(g: torch.Generator, *shape: int, scale: float | None = None) -> torch.Tensor:
    scale = (1 / math.sqrt(shape[-1])) if scale is None else scale
    return torch.randn(*shape, generator=g) * scale


def _norm_weight(g: torch.Generator, n: int) -> torch.Tensor:
    return 1 + 0.1 * torch.randn(n, generator=g)


def llm_tensors(m: Member, g: torch.Generator) -> dict[str, torch.Tensor]:
    hd = D // HEADS
    sd = {"tok_embeddings.weight": _rand(g, VOCAB, D, scale=1.0), "norm.weight": _norm_weight(g, D),
          "output.weight": _rand(g, VOCAB, D)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": _rand(g, HEADS * hd, D), p + "attention.wk.weight": _rand(g, KV * hd, D),
                   p + "attention.wv.weight": _rand(g, KV * hd, D), p + "attention.wo.weight": _rand(g, D, HEADS * hd),
                   p + "attention_norm.weight": _norm_weight(g, D), p + "ffn_norm.weight": _norm_weight(g, D)})
        if m.moe:
            sd.update({p + "feed_forward.gate.weight": _rand(g, EXPERTS, D),
                       p + "feed_forward.w1": _rand(g, EXPERTS * EXPERT_FFN, D),
                       p + "feed_forward.w2": _rand(g, EXPERTS * EXPERT_FFN, D, scale=1 / math.sqrt(EXPERT_FFN)),
                       p + "feed_forward.w3": _rand(g, EXPERTS * EXPERT_FFN, D)})
        else:
            sd.update({p + "feed_forward.w1.weight": _rand(g, FFN, D), p + "feed_forward.w2.weight": _rand(g, D, FFN),
                       p + "feed_forward.w3.weight": _rand(g, FFN, D)})
    return sd


def convnext_trunk(seed: int) -> nn.Module:
    """open_clip's `visual.trunk` of a ConvNeXt at toy width: timm's trunk with the pooling head
    turned into the released identity (global_pool and flatten removed), random layer scales."""
    torch.manual_seed(seed)
    trunk = timm.create_model("convnext_atto", pretrained=False, num_classes=0, global_pool="")
    trunk.head.global_pool, trunk.head.flatten = nn.Identity(), nn.Identity()
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.3 + 0.1 * torch.randn_like(p))
    return trunk.eval()


def dinov2_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    """torch-hub DINOv2 names at toy width; ViT-g's packed SwiGLU (`mlp.w12`, `mlp.w3`) and a 37x37 table."""
    c = DINO_TINY["embed_dim"]
    hidden = int(c * 2.66667 * 2) // 2          # the SwiGLU width timm's ViT-g variant gives this width
    sd = {"cls_token": _rand(g, 1, 1, c, scale=1.0), "pos_embed": _rand(g, 1, 1 + 37 * 37, c, scale=1.0),
          "mask_token": torch.zeros(1, c), "patch_embed.proj.weight": _rand(g, c, 3, 14, 14, scale=0.05),
          "patch_embed.proj.bias": _rand(g, c, scale=0.1), "norm.weight": _norm_weight(g, c), "norm.bias": _rand(g, c, scale=0.1)}
    for i in range(DINO_TINY["depth"]):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": _norm_weight(g, c), p + "norm1.bias": _rand(g, c, scale=0.1),
                   p + "attn.qkv.weight": _rand(g, 3 * c, c), p + "attn.qkv.bias": _rand(g, 3 * c, scale=0.1),
                   p + "attn.proj.weight": _rand(g, c, c), p + "attn.proj.bias": _rand(g, c, scale=0.1),
                   p + "ls1.gamma": _rand(g, c, scale=0.5), p + "norm2.weight": _norm_weight(g, c),
                   p + "norm2.bias": _rand(g, c, scale=0.1), p + "mlp.w12.weight": _rand(g, 2 * hidden, c),
                   p + "mlp.w12.bias": _rand(g, 2 * hidden, scale=0.1), p + "mlp.w3.weight": _rand(g, c, hidden),
                   p + "mlp.w3.bias": _rand(g, c, scale=0.1), p + "ls2.gamma": _rand(g, c, scale=0.5)})
    return sd


def clip_tensors(m: Member, g: torch.Generator) -> dict[str, torch.Tensor]:
    """open_clip `ViT-L-14` keys at toy width, text leftovers included (as released)."""
    w, grid = CLIP_TINY["width"], m.small // 14
    sd = {"visual.class_embedding": _rand(g, w, scale=1.0), "visual.positional_embedding": _rand(g, 1 + grid * grid, w, scale=0.5),
          "visual.conv1.weight": _rand(g, w, 3, 14, 14, scale=0.05), "visual.ln_pre.weight": _norm_weight(g, w),
          "visual.ln_pre.bias": _rand(g, w, scale=0.1), "visual.ln_post.weight": _norm_weight(g, w),
          "visual.ln_post.bias": _rand(g, w, scale=0.1), "visual.proj": _rand(g, w, 16),
          "positional_embedding": _rand(g, 77, 16), "text_projection": _rand(g, 16, 16), "logit_scale": torch.tensor(4.6),
          "token_embedding.weight": _rand(g, 50, 16), "ln_final.weight": torch.ones(16), "ln_final.bias": torch.zeros(16)}
    for i in range(CLIP_TINY["layers"]):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": _norm_weight(g, w), p + "ln_1.bias": _rand(g, w, scale=0.1),
                   p + "attn.in_proj_weight": _rand(g, 3 * w, w), p + "attn.in_proj_bias": _rand(g, 3 * w, scale=0.1),
                   p + "attn.out_proj.weight": _rand(g, w, w), p + "attn.out_proj.bias": _rand(g, w, scale=0.1),
                   p + "ln_2.weight": _norm_weight(g, w), p + "ln_2.bias": _rand(g, w, scale=0.1),
                   p + "mlp.c_fc.weight": _rand(g, 4 * w, w), p + "mlp.c_fc.bias": _rand(g, 4 * w, scale=0.1),
                   p + "mlp.c_proj.weight": _rand(g, w, 4 * w), p + "mlp.c_proj.bias": _rand(g, w, scale=0.1)})
    return sd


def blip2(m: Member, seed: int) -> Blip2Model:
    """transformers' Blip2Model at toy width, language parts dropped as released, norms randomised."""
    torch.manual_seed(seed)
    config = Blip2Config(vision_config={**QF_VISION, "image_size": m.small},
                         qformer_config={**QF_QFORMER, "encoder_hidden_size": QF_VISION["hidden_size"]},
                         text_config={"model_type": "opt", "hidden_size": 16, "num_hidden_layers": 1, "ffn_dim": 16,
                                      "num_attention_heads": 2, "vocab_size": 32, "word_embed_proj_dim": 16},
                         num_query_tokens=QUERIES)
    model = Blip2Model(config)
    model.language_projection, model.language_model = None, None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
        model.query_tokens.normal_(std=1.0)
    return model.eval()


def released_state(m: Member, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every released tensor of the member (keys without `llma.`), random, unsharded."""
    g = torch.Generator().manual_seed(seed)
    sd = llm_tensors(m, g)
    sd |= {f"openclip_convnext_xxl.{k}": v.detach().clone() for k, v in convnext_trunk(seed).state_dict().items()}
    sd |= {f"dinov2_vitg14.{k}": v for k, v in dinov2_tensors(g).items()}
    fused = sum(sd[k].shape[0] for k in ("openclip_convnext_xxl.head.norm.weight", "dinov2_vitg14.norm.weight"))
    if m.four:
        sd |= {f"clip.{k}": v for k, v in clip_tensors(m, g).items()}
        qf = blip2(m, seed).state_dict()
        sd |= {f"qformer.{k}": v.detach().clone() for k, v in qf.items()
               if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
        sd["qformer.qformer.encoder.layer.0.intermediate.dense.weight"] = _rand(g, 8, QF_QFORMER["hidden_size"])
        fused += CLIP_TINY["width"]
        sd |= {"qformer_proj.0.weight": _rand(g, D, QF_QFORMER["hidden_size"]), "qformer_proj.0.bias": _rand(g, D, scale=0.1),
               "qformer_proj.1.weight": _norm_weight(g, D), "qformer_proj.1.bias": _rand(g, D, scale=0.1)}
    sd |= {"visual_proj.0.weight": _rand(g, D, fused), "visual_proj.0.bias": _rand(g, D, scale=0.1),
           "visual_proj.1.weight": _norm_weight(g, D), "visual_proj.1.bias": _rand(g, D, scale=0.1),
           "start_img": _rand(g, 1, 1, D, scale=1.0), "end_img": _rand(g, 1, 1, D, scale=1.0)}
    return sd


def _split(key: str, value: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """The facts' tensor-parallel rule: column-parallel on dim 0, row-parallel and embeddings on dim 1,
    MoE experts on each expert's FFN rows, everything else replicated."""
    leaf = key.split(".", 2)[-1] if key.startswith("layers.") else key
    if n == 1:
        return value
    if leaf in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        return value.reshape(EXPERTS, -1, D).chunk(n, dim=1)[rank].reshape(-1, D).clone()
    if leaf in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                "feed_forward.w3.weight", "output.weight"):
        return value.chunk(n, dim=0)[rank].clone()
    if leaf in ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight"):
        return value.chunk(n, dim=1)[rank].clone()
    return value


def write_released(m: Member, folder: Path, tokenizer_model: Path, shards: int = 1, seed: int = 0,
                   extra_args: dict | None = None) -> dict[str, torch.Tensor]:
    """The member as the authors' saver writes it; returns the unsharded tensors."""
    sd = released_state(m, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(shards):
        shard = {f"llma.{k}": _split(k, v, rank, shards) for k, v in sd.items()}
        torch.save({"model": shard}, folder / f"consolidated.{rank:02d}-of-{shards:02d}.model.pth")
    args = {"dim": D, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV, "vocab_size": VOCAB, "norm_eps": 1e-5,
            "rope_theta": 1e6 if m.moe else 1e4, "max_seq_len": 2048}
    if m.moe:
        args |= {"hidden_dim": EXPERT_FFN, "moe": {"num_experts": EXPERTS, "num_experts_per_tok": TOP_K}}
    (folder / "config.json").write_text(json.dumps({**args, **(extra_args or {})}), encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"llama_type": m.llama_type}), encoding="utf-8")
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return sd


# --- the released maths ------------------------------------------------------------------------
def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


def released_views(canvas: torch.Tensor, side: int, grid: int) -> torch.Tensor:
    """(1, 3, C, C) -> (V, 3, side, side): the global view, then TL, TR, BL, BR of a 2*side resize."""
    if grid == 1:
        return _resize(canvas, side)
    big = _resize(canvas, 2 * side)
    parts = [big[..., :side, :side], big[..., :side, side:], big[..., side:, :side], big[..., side:, side:]]
    return torch.cat([_resize(canvas, side)] + parts)


def _ln(x: torch.Tensor, sd: dict, p: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:          # (B, L, C) -> (B, n, L, C/n)
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v                             # (B, n, L, c)
    return out.transpose(1, 2).flatten(2)


def clip_tokens(sd: dict, x: torch.Tensor, quick_gelu: bool = False) -> torch.Tensor:
    """CLIP ViT as released: every token after ln_post, no proj; plain GELU (the release's inference build),
    or QuickGELU, x * sigmoid(1.702 x), when config.json asks for the openai weights."""
    p = "clip.visual."
    x = F.conv2d(x, sd[p + "conv1.weight"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd[p + "positional_embedding"]
    x = _ln(x, sd, p + "ln_pre", 1e-5)
    heads = CLIP_TINY["width"] // CLIP_TINY["head_width"]
    for i in range(CLIP_TINY["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        q, k, v = F.linear(_ln(x, sd, b + "ln_1", 1e-5), sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"]).chunk(3, -1)
        x = x + F.linear(_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads)),
                         sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"])
        h = F.linear(_ln(x, sd, b + "ln_2", 1e-5), sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return _ln(x, sd, p + "ln_post", 1e-5)


def dinov2_tokens(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """torch-hub DINOv2: ImageNet re-normalisation, hub position interpolation, [normed CLS, patches]."""
    p = "dinov2_vitg14."
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    inet_mean, inet_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (x * std + mean - inet_mean) / inet_std
    x = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=14)
    g = x.shape[-1]
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], 1, -1), x.flatten(2).transpose(1, 2)], 1)
    pos = sd[p + "pos_embed"]
    table = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, scale_factor=((g + 0.1) / 37,) * 2, mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1)
    heads = DINO_TINY["num_heads"]
    for i in range(DINO_TINY["depth"]):
        b = f"{p}blocks.{i}."
        q, k, v = F.linear(_ln(x, sd, b + "norm1", 1e-6), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        a = F.linear(_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads)), sd[b + "attn.proj.weight"],
                     sd[b + "attn.proj.bias"])
        x = x + sd[b + "ls1.gamma"] * a
        x1, x2 = F.linear(_ln(x, sd, b + "norm2", 1e-6), sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, -1)
        x = x + sd[b + "ls2.gamma"] * F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
    return _ln(x, sd, p + "norm", 1e-6)


def convnext_tokens(m: Member, trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if m.convnext_run:                                      # the 224 members: 256 px, nearest; map repeated 2x
        x = F.interpolate(x, size=(m.convnext_run, m.convnext_run))
    fmap = trunk(x)                                         # (N, C, g, g) after head.norm
    if m.convnext_run:
        fmap = fmap.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    grid = fmap.flatten(-2).transpose(1, 2)
    return torch.cat([grid.mean(1, keepdim=True), grid], 1)


def _projector(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return _ln(F.linear(x, sd[p + ".0.weight"], sd[p + ".0.bias"]), sd, p + ".1", 1e-5)


def image_tokens(m: Member, sd: dict, canvas: torch.Tensor, seed: int = 0, quick_gelu: bool = False) -> torch.Tensor:
    """(V * (tokens_per_view + 2), D): every view as [start, (Q-Former), fused, end]."""
    trunk = convnext_trunk(seed)
    trunk.load_state_dict({k[len("openclip_convnext_xxl."):]: v for k, v in sd.items()
                           if k.startswith("openclip_convnext_xxl.")})
    small, big = released_views(canvas, m.small, m.grid), released_views(canvas, m.convnext, m.grid)
    feats = [convnext_tokens(m, trunk, big), dinov2_tokens(sd, small)]
    if m.four:
        feats.insert(0, clip_tokens(sd, small, quick_gelu))
    fused = _projector(sd, "visual_proj", torch.cat(feats, -1))             # (V, T, D)
    if m.four:
        qf = blip2(m, seed)
        qf.load_state_dict({k[len("qformer."):]: v for k, v in sd.items() if k.startswith("qformer.")
                            and ".intermediate." not in k}, strict=False)
        fused = torch.cat([_projector(sd, "qformer_proj", qf.get_qformer_features(pixel_values=small)), fused], 1)
    start, end = sd["start_img"][0].expand(fused.shape[0], 1, D), sd["end_img"][0].expand(fused.shape[0], 1, D)
    return torch.cat([start, fused, end], 1).reshape(-1, D)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w


def _rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's rotary on interleaved pairs as complex numbers; positions 0..L-1. x: (B, L, n, hd)."""
    hd, length = x.shape[-1], x.shape[1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(length, hd // 2, dtype=torch.float64), torch.outer(torch.arange(length).double(), freqs))
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(z * rot[None, :, None]).flatten(3).to(x.dtype)


def _ffn(m: Member, sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    if not m.moe:
        return F.linear(F.silu(F.linear(x, sd[p + "w1.weight"])) * F.linear(x, sd[p + "w3.weight"]), sd[p + "w2.weight"])
    flat = x.reshape(-1, D)
    probs = F.linear(flat, sd[p + "gate.weight"]).float().softmax(-1)
    weights, chosen = probs.topk(TOP_K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    w1, w2, w3 = (sd[p + n].reshape(EXPERTS, EXPERT_FFN, D) for n in ("w1", "w2", "w3"))
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(TOP_K):
            e = int(chosen[t, k])
            h = F.silu(flat[t] @ w1[e].T) * (flat[t] @ w3[e].T)    # (F,)
            out[t] += weights[t, k] * (h @ w2[e])                 # w2 acts untransposed
    return out.reshape(x.shape)


def reference_logits(m: Member, sd: dict, canvas: torch.Tensor, text_ids: list[int], seed: int = 0,
                     quick_gelu: bool = False) -> torch.Tensor:
    """The released forward: logits from the last end_img position on (one row per text token)."""
    with torch.no_grad():
        image = image_tokens(m, sd, canvas, seed, quick_gelu)
        emb = sd["tok_embeddings.weight"]
        h = torch.cat([emb[text_ids[:1]], image, emb[text_ids[1:]]])[None]      # (1, L, D)
        theta, hd = (1e6 if m.moe else 1e4), D // HEADS
        for i in range(LAYERS):
            p = f"layers.{i}."
            x = _rms(h, sd[p + "attention_norm.weight"])
            q = _rotary(F.linear(x, sd[p + "attention.wq.weight"]).view(1, -1, HEADS, hd), theta)
            k = _rotary(F.linear(x, sd[p + "attention.wk.weight"]).view(1, -1, KV, hd), theta)
            v = F.linear(x, sd[p + "attention.wv.weight"]).view(1, -1, KV, hd)
            k, v = (z.repeat_interleave(HEADS // KV, dim=2) for z in (k, v))    # q head i reads kv head i // rep
            a = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            h = h + F.linear(a, sd[p + "attention.wo.weight"])
            h = h + _ffn(m, sd, p + "feed_forward.", _rms(h, sd[p + "ffn_norm.weight"]))
        logits = F.linear(_rms(h, sd["norm.weight"]), sd["output.weight"])[0]
    return logits[image.shape[0]:]
