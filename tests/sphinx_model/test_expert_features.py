"""The model from the frozen experts' outputs computed before (a feature cache): the same logits
as from pixels, bit for bit, without running the experts; refused where the tensor cannot hold
what the model needs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sphinx_model.config import ExpertConfig, get_preset
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import build_from_config

QF_TINY = ExpertConfig("blip2_qformer", "Salesforce/blip2-opt-2.7b", 28, "qformer", None, {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "qformer": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "num_query_tokens": 3})


def two_rows(proc, make_image):
    """Two conversations, three images of different shapes (skipped views among them)."""
    convs = [Conversation([Message.user("What is in the image?", image=True)]),
             Conversation([Message.user("Compare these.", image=True), Message.assistant("Which?"),
                           Message.user("And this one?", image=True)])]
    images = [make_image(160, 80, seed=1), [make_image(60, 60, seed=2), make_image(40, 120, seed=3)]]
    batch = proc(convs, images)                             # left-padded, as generation batches
    assert batch["view_skip"].any() and not batch["view_skip"].all()
    return batch


def logits_both_ways(model, batch):
    ran = []
    hooks = [e.register_forward_hook(lambda m, i, o: ran.append(1)) for e in model.experts]
    try:
        with torch.no_grad():
            from_pixels = model(**batch).logits
            n = len(ran)
            _, fused = model.expert_features(batch["pixel_values"], batch["view_skip"])  # what a cache stores
            ran.clear()
            inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
            from_features = model(**inputs, expert_features=fused.clone()).logits
    finally:
        for h in hooks:
            h.remove()
    assert n == len(model.experts) and not ran            # the features path never runs an expert
    return from_pixels, from_features, fused, inputs


def test_logits_from_expert_features_equal_the_pixel_path_bit_for_bit(tiny, make_image):
    model, proc = tiny
    batch = two_rows(proc, make_image)
    from_pixels, from_features, fused, inputs = logits_both_ways(model, batch)
    assert torch.equal(from_pixels, from_features)
    with torch.no_grad():                                  # and the features do matter
        other = model(**inputs, expert_features=fused + 0.5).logits
    assert not torch.allclose(other, from_pixels)


def test_with_canvas_and_box_positions_the_read_out_sees_the_same_features(make_image):
    torch.manual_seed(0)
    cfg = get_preset("sphinx-test-tiny").replace(canvas_positions=True, box_positions=True)
    model, proc = build_from_config(cfg)
    with torch.no_grad():
        model.canvas_pos.readout.weight.normal_(std=0.05)  # a read-out that depends on the features
    model.eval()
    batch = two_rows(proc, make_image)
    from_pixels, from_features, fused, _ = logits_both_ways(model, batch)
    assert torch.equal(from_pixels, from_features)
    shifted = fused.clone()
    shifted[..., : model.experts[0].out_dim] += 0.3        # changes only what the box read-out can see too
    with torch.no_grad():
        assert not torch.equal(model.image_embeddings_from_features(shifted, batch["view_skip"])[0],
                               model.image_embeddings_from_features(fused, batch["view_skip"])[0])


def test_wrong_shapes_and_mixed_inputs_are_clear_errors(tiny, make_image):
    model, proc = tiny
    batch = two_rows(proc, make_image)
    with torch.no_grad():
        _, fused = model.expert_features(batch["pixel_values"], batch["view_skip"])
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="kept views"):
        model(**inputs, expert_features=fused[1:])
    with pytest.raises(ValueError, match="without pixel_values"):
        model(**batch, expert_features=fused)
    with pytest.raises(ValueError, match="with view_skip"):
        model(**{k: v for k, v in inputs.items() if k != "view_skip"}, expert_features=fused)


def test_a_model_with_a_separate_expert_is_refused():
    base = get_preset("sphinx-test-tiny")
    cfg = base.replace(experts=[*[dataclasses.asdict(e) for e in base.experts], dataclasses.asdict(QF_TINY)],
                       tokens_per_view=base.tokens_per_view + 3)
    model, _ = build_from_config(cfg)
    skip = torch.zeros(1, cfg.num_views, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\['qformer'\] give separate tokens"):
        model.image_embeddings_from_features(torch.zeros(cfg.num_views, 5, model.fused_dim), skip)
