import pytest
import torch

from sphinx_model.conversation import Conversation, Message
from sphinx_model.processor import IMAGE_TOKEN_ID
from sphinx_model.tiling import visual_token_count

RATIOS = [(1, 4), (1, 3), (1, 2), (1, 1), (2, 1), (3, 1), (4, 1), (2, 3), (3, 2)]


def ask(text="What is in the image?"):
    return Conversation([Message.user(text, image=True)])


@pytest.mark.parametrize("ratio", RATIOS)
def test_processor_and_model_agree_and_skipped_views_are_not_encoded(tiny, make_image, ratio):
    model, proc = tiny
    img = make_image(40 * ratio[0], 40 * ratio[1])
    batch = proc(ask(), img)
    skipped = batch["view_skip"][0].tolist()
    n_placeholders = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert n_placeholders == visual_token_count(proc.config.tokens_per_view, skipped)
    seen = []
    hooks = [e.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for e in model.experts]
    with torch.no_grad():
        out = model(**batch)
    for h in hooks:
        h.remove()
    assert seen == [len(skipped) - sum(skipped)] * len(model.experts)   # padded cells never reach an encoder
    assert out.logits.shape[:2] == batch["input_ids"].shape
    if max(ratio) >= 2 * min(ratio):  # top-left anchor: at 2:1 or beyond, whole cells are padding
        assert sum(skipped) > 0


def test_skip_token_sits_where_the_padded_cell_is(tiny, make_image):
    model, proc = tiny
    batch = proc(ask(), make_image(160, 80))            # 2:1 -> bottom row skipped
    assert batch["view_skip"][0].tolist() == [False, False, False, True, True]
    with torch.no_grad():
        seq = model.image_embeddings(batch["pixel_values"], batch["view_skip"])[0]
    t = proc.config.tokens_per_view + 2
    assert seq.shape[0] == 3 * t + 2
    assert torch.equal(seq[3 * t], model.skip_img[0, 0]) and torch.equal(seq[3 * t + 1], model.skip_img[0, 0])
    assert torch.equal(seq[0], model.start_img[0, 0]) and torch.equal(seq[t - 1], model.end_img[0, 0])


def test_skip_tokens_off_encodes_every_view(tiny, make_image):
    model, proc = tiny
    from sphinx_model.processor import SphinxProcessor
    off = SphinxProcessor(proc.config.replace(skip_tokens=False), proc.tokenizer)
    batch = off(ask(), make_image(160, 40))
    assert not batch["view_skip"].any()
    with torch.no_grad():
        model(**batch)   # the same weights accept the longer sequence


def test_placeholder_mismatch_is_a_clear_error(tiny, make_image):
    model, proc = tiny
    batch = proc(ask(), make_image(64, 64))
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN_ID).nonzero()[0]] = 5
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
              view_skip=batch["view_skip"])


def test_loss_only_on_answers_and_gradients_skip_frozen_experts(tiny, make_image):
    model, proc = tiny
    conv = Conversation([Message.user("Colour?", image=True), Message.assistant("Red.")])
    batch = proc(conv, make_image(64, 32), add_generation_prompt=False, padding_side="right")
    model.train()
    out = model(**batch)
    out.loss.backward()
    model.eval()
    assert torch.isfinite(out.loss)
    assert model.visual_proj[0].weight.grad is not None and model.start_img.grad is not None
    assert model.skip_img.grad is not None          # 2:1 image -> skip tokens in the sequence, so they learn
    assert all(p.grad is None and not p.requires_grad for e in model.experts for p in e.parameters())
    model.zero_grad(set_to_none=True)


def test_moe_backbone_adds_router_loss():
    from sphinx_model.config import get_preset
    from sphinx_model.loading import build_from_config
    torch.manual_seed(0)
    model, proc = build_from_config(get_preset("sphinx-test-moe"))
    conv = Conversation([Message.user("Hi"), Message.assistant("Hello there.")])
    batch = proc(conv, None, add_generation_prompt=False, padding_side="right")
    with torch.no_grad():
        with_aux = model(**batch)
        plain = model(**batch, output_router_logits=False)
    coef = proc.config.llm.router_aux_loss_coef
    assert with_aux.aux_loss is not None
    assert torch.allclose(with_aux.loss, plain.loss + coef * with_aux.aux_loss, atol=1e-6)


def test_bf16_is_configuration_not_code(make_image):
    from sphinx_model.config import get_preset
    from sphinx_model.loading import build_from_config
    cfg = get_preset("sphinx-test-tiny")
    cfg = cfg.replace(llm={**cfg.llm.__dict__, "dtype": "bfloat16"})
    model, proc = build_from_config(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(**proc(ask(), make_image(64, 128)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_unknown_backbone_type_is_a_clear_error():
    from sphinx_model.config import LLMConfig
    from sphinx_model.modeling import build_llm
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_llm(LLMConfig(config={"model_type": "internlm2", "hidden_size": 8}), load_weights=False)


def test_extract_views_crops_cells_row_major_and_only_kept_ones():
    import torch.nn.functional as F
    from sphinx_model.modeling import extract_views
    canvas = torch.randn(2, 3, 8, 8)
    all_views = extract_views(canvas, size=4, grid=2)                  # native crops, no resize
    assert all_views.shape == (10, 3, 4, 4)
    assert torch.equal(all_views[1], canvas[0, :, :4, :4]) and torch.equal(all_views[2], canvas[0, :, :4, 4:])
    assert torch.equal(all_views[3], canvas[0, :, 4:, :4]) and torch.equal(all_views[9], canvas[1, :, 4:, 4:])
    glob = F.interpolate(canvas, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(all_views[0], glob[0])
    keep = torch.tensor([[True, True, False, False, False], [True, False, False, False, True]])
    kept = extract_views(canvas, size=4, grid=2, keep=keep)
    assert torch.equal(kept, all_views[[0, 1, 5, 9]])
