"""SPHINX-X: frozen visual experts + projector + start/end/skip embeddings + any causal LM.

Tensors in, tensors out (the processor prepares them). Forward path:

    canvas (N, 3, C, C) --views--> per expert (N*V_kept, 3, s, s) --expert--> (N*V_kept, T, c_e)
    --concat channels--> (N*V_kept, T, sum c_e) --visual_proj--> (N*V_kept, T, d)
    [experts with fused = False (the Q-Former): (N*V_kept, Q, c_q) --{key}_proj--> (N*V_kept, Q, d),
     placed before the fused tokens]
    [+ canvas positions of each token's slot, when config.canvas_positions]
    --layout per image--> [start, Q + T tokens, end] per encoded view, one skip token per skipped view
    --scatter into the placeholder positions of input_ids--> inputs_embeds (B, L, d) --> LLM
    [or `expert_features` (N*V_kept, T, sum c_e) computed once before (a feature cache): the experts
     do not run, the path goes on at visual_proj; for models whose experts are all fused]
    [rotary positions: one per image's visual tokens, when config.shared_image_position (positions.py)]

The N images are those of all rows in order (a row may hold none, one or several); they
fill the placeholders row by row, each row's images in sequence order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .canvas_positions import CanvasPositions
from .config import LLMConfig, ProjectorConfig, SphinxConfig
from .experts import build_expert
from .positions import rotary_positions
from .processor import IMAGE_TOKEN_ID
from .tiling import num_views, visual_token_count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_llm(cfg: LLMConfig, load_weights: bool) -> PreTrainedModel:
    """The backbone through transformers' Auto classes; weights only when asked."""
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if load_weights:
        if not cfg.name_or_path:
            raise ValueError("load_weights=True needs llm.name_or_path (a hub id or a local folder)")
        overrides = {k: v for k, v in (cfg.config or {}).items() if k != "model_type"}
        return AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, dtype=resolve_dtype(cfg.dtype), device_map=cfg.device_map, **overrides, **kwargs)
    if cfg.config is not None:
        d = dict(cfg.config)
        model_type = d.pop("model_type")
        if model_type in CONFIG_MAPPING:
            try:
                hf_config = AutoConfig.for_model(model_type, **d)
            except (StrictDataclassError, TypeError, ValueError) as e:  # transformers' configs validate fields
                raise ValueError(f"llm.config is not a valid {model_type} config: "
                                 f"{' '.join(str(e).split())[:300]}") from e
        elif cfg.trust_remote_code and cfg.name_or_path:  # e.g. InternLM2: config class lives in hub code
            hf_config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=True, **d)
        else:
            raise ValueError(f"unknown LLM model_type {model_type!r}: set llm.name_or_path and "
                             "llm.trust_remote_code to use a model whose code lives on the hub")
    elif cfg.name_or_path:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    else:
        raise ValueError("llm needs either `config` or `name_or_path`")
    return AutoModelForCausalLM.from_config(hf_config, dtype=resolve_dtype(cfg.dtype), **kwargs)


def extract_views(canvas: torch.Tensor, size: int, grid: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, C, C) canvas -> (K, 3, size, size): the kept views, image by image, in view order.

    As the released 1k models do: the global view is the canvas resized to `size`; the
    cells are crops of the canvas resized to `size * grid` (bicubic, no antialias).
    `keep` (N, V) selects views (default: all); skipped views are never cropped or copied.
    """
    def resize(x: torch.Tensor, side: int) -> torch.Tensor:
        if x.shape[-1] == side:
            return x
        return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=False)

    n = canvas.shape[0]
    if keep is None:
        keep = torch.ones(n, num_views(grid), dtype=torch.bool)
    whole = resize(canvas, size)                                       # (N, 3, s, s)
    pairs = keep.nonzero().tolist()                                    # [(image, view), ...]
    big = resize(canvas, size * grid) if grid > 1 and any(v > 0 for _, v in pairs) else None  # (N, 3, s*g, s*g)
    views = []
    for i, v in pairs:
        if v == 0:
            views.append(whole[i])
        else:
            r, c = divmod(v - 1, grid)
            views.append(big[i, :, r * size:(r + 1) * size, c * size:(c + 1) * size])
    return torch.stack(views)                                          # (K, 3, s, s)


def _projector(in_dim: int, d: int, cfg: ProjectorConfig) -> nn.Sequential:
    """Linear(in_dim, d) -> LayerNorm(d), the released projectors' shape; or, for `mlp_ln`, a GELU
    hidden layer before it (LLaVA-1.5's two-layer projector, with the released LayerNorm kept)."""
    if cfg.type == "mlp_ln":
        return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, d),
                             nn.LayerNorm(d, eps=cfg.norm_eps))
    return nn.Sequential(nn.Linear(in_dim, d), nn.LayerNorm(d, eps=cfg.norm_eps))


def _check_token_layout(config: SphinxConfig, experts: list[nn.Module]) -> None:
    """The fused experts agree on their token count; with the separate ones that is tokens_per_view."""
    fused = [(c, e) for c, e in zip(config.experts, experts) if e.fused]
    if not fused:
        raise ValueError("at least one visual expert must be fused on channels (fused = True)")
    counts = {(c.kind, c.model_name, c.image_size): e.num_tokens for c, e in fused}
    if len(set(counts.values())) != 1:
        raise ValueError(f"the fused experts give different token counts per view: {counts}")
    separate = sum(e.num_tokens for e in experts if not e.fused)
    total = separate + fused[0][1].num_tokens
    if total != config.tokens_per_view:
        where = f"{separate} separate + {fused[0][1].num_tokens} fused" if separate else f"{total}"
        c = fused[0][0]
        raise ValueError(f"expert {c.kind}/{c.model_name} at {c.image_size}px gives {where} tokens per view; "
                         f"config says {config.tokens_per_view}")


def _check_placeholders(per_row: list[int], per_image: list[int]) -> None:
    """Images are handed out to rows in order; each row's placeholders must take whole images.

    `per_row`: placeholder count of each row; `per_image`: visual tokens of each image, in
    batch order. Raises when the two cannot be matched exactly (the drift transformers'
    llava reports as "image features and image tokens do not match").
    """
    k = 0
    for n in per_row:
        while n > 0 and k < len(per_image) and per_image[k] <= n:
            n -= per_image[k]
            k += 1
        if n:
            break
    else:
        if k == len(per_image):
            return
    raise ValueError(f"image tokens and image features do not match: placeholders per row "
                     f"{[n for n in per_row if n > 0]}, visual tokens per image {per_image}")


class SphinxForCausalLM(nn.Module):
    def __init__(self, config: SphinxConfig, load_weights: bool = False, llm: PreTrainedModel | None = None):
        super().__init__()
        self.config = config
        self.llm = llm if llm is not None else build_llm(config.llm, load_weights)
        if config.llm.router_aux_loss_coef:  # MoE load balancing: the LLM reads it from its attribute
            self.llm.config.router_aux_loss_coef = config.llm.router_aux_loss_coef
            self.llm.router_aux_loss_coef = config.llm.router_aux_loss_coef
        d = self.llm.config.hidden_size
        dtype = resolve_dtype(config.llm.dtype)
        if config.projector.type not in ("linear_ln", "mlp_ln"):
            raise ValueError(f"unknown projector {config.projector.type!r}")
        # Experts live under their released attribute names (e.g. `openclip_convnext_xxl`).
        self.expert_keys: list[str] = []
        for ecfg in config.experts:
            self.add_module(ecfg.key, build_expert(ecfg, load_weights=load_weights).to(dtype))
            self.expert_keys.append(ecfg.key)
        _check_token_layout(config, self.experts)
        in_dim = sum(e.out_dim for e in self.experts if e.fused)
        self.visual_proj = _projector(in_dim, d, config.projector)
        for key, expert in zip(self.expert_keys, self.experts):
            if not expert.fused:  # e.g. `qformer_proj`, as released
                self.add_module(f"{key}_proj", _projector(expert.out_dim, d, config.projector))
        self.start_img = nn.Parameter(torch.zeros(1, 1, d))
        self.end_img = nn.Parameter(torch.zeros(1, 1, d))
        self.skip_img = nn.Parameter(torch.zeros(1, 1, d)) if config.skip_tokens else None
        self.canvas_pos = None
        if config.canvas_positions:
            if any(not e.fused for e in self.experts):
                raise ValueError("canvas_positions needs every expert fused on channels (no separate query tokens)")
            readout = sum(e.out_dim for e in self.experts) if config.box_positions else None
            self.canvas_pos = CanvasPositions(config.grid, config.tokens_per_view, d, readout,
                                              config.box_readout_hidden)
        for p in (self.start_img, self.end_img, self.skip_img):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        self.to(dtype=dtype)

    # --- parts --------------------------------------------------------------------------
    @property
    def experts(self) -> list[nn.Module]:
        return [getattr(self, k) for k in self.expert_keys]

    @property
    def device(self) -> torch.device:
        return self.visual_proj[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_proj[0].weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    # --- vision -------------------------------------------------------------------------
    def expert_features(self, pixel_values: torch.Tensor,
                        view_skip: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Only the views that are not skipped, through the experts -> (separate experts' projected
        tokens, each (K, Q, d); the fused experts' tokens concatenated on channels, (K, T, sum c_e))."""
        keep = ~view_skip.cpu()                                         # (N, V)
        views: dict[int, torch.Tensor] = {}                             # one crop set per view size
        first, fused = [], []
        for key, expert in zip(self.expert_keys, self.experts):
            if expert.image_size not in views:
                views[expert.image_size] = extract_views(pixel_values, expert.image_size, self.config.grid, keep)
            with torch.no_grad():
                out = expert(views[expert.image_size].to(self.dtype))   # (K, T_e, c_e)
            if expert.fused:
                fused.append(out)
            else:
                first.append(getattr(self, f"{key}_proj")(out.to(self.dtype)))  # (K, Q, d)
        return first, torch.cat(fused, dim=-1).to(self.dtype)

    def project(self, first: list[torch.Tensor], fused: torch.Tensor) -> torch.Tensor:
        """(K, T, sum c_e) fused features -> (K, T, d), after the separate experts' tokens -> (K, Q + T, d)."""
        return torch.cat([*first, self.visual_proj(fused)], dim=1)

    def image_embeddings(self, pixel_values: torch.Tensor, view_skip: torch.Tensor) -> list[torch.Tensor]:
        """Per image: the full visual token sequence (start/view/end and skip tokens) -> (K_i, d)."""
        first, fused = self.expert_features(pixel_values, view_skip)
        return self.layout_images(self.project(first, fused), view_skip, fused)

    @property
    def fused_dim(self) -> int:
        """Channels of the fused experts' tokens, concatenated (the projector's input)."""
        return self.visual_proj[0].in_features

    def image_embeddings_from_features(self, expert_features: torch.Tensor,
                                       view_skip: torch.Tensor) -> list[torch.Tensor]:
        """`image_embeddings` from the frozen experts' outputs computed before: `expert_features`
        (K, T, sum c_e) is `expert_features(...)[1]` of the same images (kept views, in batch order).
        The experts stay frozen, so their outputs can be computed once per image and cached
        (train/feature_cache.py); from here on the path is the pixel path's, bit for bit. Separate
        experts (the Q-Former) are projected by a trainable `{key}_proj` from tokens of their own,
        which this one tensor does not hold: such models are refused."""
        separate = [k for k, e in zip(self.expert_keys, self.experts) if not e.fused]
        if separate:
            raise ValueError(f"expert_features hold the fused experts' tokens only; this model's {separate} "
                             "give separate tokens: pass pixel_values")
        kept = int((~view_skip).sum())
        want = (kept, self.config.tokens_per_view, self.fused_dim)
        if tuple(expert_features.shape) != want:
            raise ValueError(f"expert_features have shape {tuple(expert_features.shape)}; {kept} kept views of "
                             f"this model need {want}")
        fused = expert_features.to(device=self.device, dtype=self.dtype)   # (K, T, sum c_e)
        return self.layout_images(self.project([], fused), view_skip, fused)

    def layout_images(self, tokens: torch.Tensor, view_skip: torch.Tensor,
                      features: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Projected tokens of the kept views (K, T, d) -> per image (K_i, d): canvas positions added
        (when configured; `features` (K, T, c) feed the box read-out of `box_positions`), each kept
        view between start/end, one skip token per skipped view."""
        if self.canvas_pos is not None:
            views = (~view_skip.cpu()).nonzero()[:, 1].to(tokens.device)  # view index of each kept view
            tokens = tokens + self.canvas_pos(views, features).to(tokens.dtype)  # (K, T, d)
        start, end = self.start_img[0], self.end_img[0]                  # (1, d)
        out, k = [], 0
        for skips in view_skip.tolist():
            parts = []
            for skipped in skips:
                if skipped:
                    parts.append(self.skip_img[0])
                else:
                    parts += [start, tokens[k], end]
                    k += 1
            seq = torch.cat(parts, dim=0)
            assert seq.shape[0] == visual_token_count(self.config.tokens_per_view, skips)
            out.append(seq)
        return out

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     view_skip: torch.Tensor | None = None,
                     expert_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image placeholders filled -> (B, L, d); the images come as
        pixels, or as the experts' outputs of their kept views (see image_embeddings_from_features)."""
        if expert_features is not None:
            if pixel_values is not None or view_skip is None:
                raise ValueError("expert_features go with view_skip (which views they are of) and without pixel_values")
            return self.fill_image_tokens(input_ids, self.image_embeddings_from_features(expert_features, view_skip))
        if pixel_values is None:
            return self.fill_image_tokens(input_ids, [])
        if view_skip is None:
            view_skip = torch.zeros(pixel_values.shape[0], self.config.num_views, dtype=torch.bool)
        return self.fill_image_tokens(input_ids, self.image_embeddings(pixel_values.to(self.device), view_skip))

    def fill_image_tokens(self, input_ids: torch.Tensor, visual: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with the placeholders filled by `visual` (per image (K_i, d), row by
        row, each row's in sequence order) -> (B, L, d). The serving engine passes cached ones."""
        is_image = input_ids == IMAGE_TOKEN_ID
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if not visual:
            if is_image.any():
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return embeds
        _check_placeholders(is_image.sum(dim=1).tolist(), [v.shape[0] for v in visual])
        embeds = embeds.clone()
        # row-major: row by row, images in sequence order; in the LLM's dtype (a quantised LLM computes in bf16)
        embeds[is_image] = torch.cat(visual).to(device=embeds.device, dtype=embeds.dtype)
        return embeds

    # --- forward ------------------------------------------------------------------------
    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) rotary positions of (left- or right-padded) rows, as this model counts them:
        one image's visual tokens share one position when `config.shared_image_position` is on."""
        return rotary_positions(input_ids, attention_mask, self.config.shared_image_position)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, view_skip: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, expert_features: torch.Tensor | None = None, **kwargs):
        embeds = self.embed_inputs(input_ids, pixel_values, view_skip, expert_features)   # (B, L, d)
        if self.config.shared_image_position and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.position_ids(input_ids, attention_mask).to(embeds.device)
        if labels is not None and self.config.llm.router_aux_loss_coef:
            kwargs.setdefault("output_router_logits", True)  # MoE load balancing joins the loss
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
