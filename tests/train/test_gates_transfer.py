"""Gate C's first step: Gate A's pointing LLM carried onto real experts by fitting a projector, written
as a checkpoint that loads and sees through its experts exactly as the fit saw them."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from train.gates.pointing import GateRun, build, run_record, save_weights
from train.gates.transfer import (ExpertFed, TransferRun, cached, encoded, fit_quality, real_features, real_model,
                                  token_pairs, transfer)
from train.world.scene import render_scene


@pytest.fixture()
def gate_and_experts(tmp_path):
    """A tiny Gate A run folder (2 x 2 tokens per view) and an expert state for its experts."""
    torch.manual_seed(0)
    run = GateRun(mechanism="box+coords", token_grid=2, name="tiny", out=tmp_path, pool=tmp_path / "pool",
                  shared_image_position=True, system="", eval_scenes=1)
    oracle, _, _ = build(run)
    with torch.no_grad():
        oracle.model.llm.lm_head.weight.add_(0.5)                     # something to recognise later
    folder = tmp_path / "tiny"
    folder.mkdir()
    save_weights(oracle, folder)
    (folder / "run.json").write_text(json.dumps(run_record(run)))
    experts = tmp_path / "experts"
    experts.mkdir()
    torch.manual_seed(1)
    save_file({f"experts.{k}.{n}": v.contiguous() for k in oracle.model.expert_keys
               for n, v in getattr(oracle.model, k).state_dict().items()}, experts / "weights.safetensors")
    return folder, experts, oracle


def test_the_transferred_model_keeps_gate_as_llm_and_takes_the_experts_of_the_expert_run(gate_and_experts):
    from safetensors.torch import load_file

    from train.gates.pointing import load_run

    folder, experts, oracle = gate_and_experts
    _, loaded, _ = load_run(folder)
    model = real_model(loaded, experts)
    assert torch.equal(model.llm.lm_head.weight, oracle.model.llm.lm_head.weight)
    assert torch.equal(model.canvas_pos.table, oracle.model.canvas_pos.table)
    state = load_file(experts / "weights.safetensors")
    key = model.expert_keys[0]
    name, value = next(iter(getattr(model, key).state_dict().items()))
    assert torch.equal(value, state[f"experts.{key}.{name}"])
    assert model.visual_proj[0].in_features == model.fused_dim != oracle.model.visual_proj[0].in_features


def test_fitting_the_projector_brings_real_tokens_to_the_oracle_tokens(gate_and_experts):
    from train.gates.pointing import load_run

    folder, experts, _ = gate_and_experts
    _, oracle, proc = load_run(folder)
    model = real_model(oracle, experts)
    pairs = token_pairs(oracle, proc, encoded(model, proc, [render_scene(0, i) for i in range(12)]), "test")
    assert pairs["x"].shape[0] == pairs["y"].shape[0] == pairs["held"].shape[0] and pairs["held"].any()
    before = fit_quality(model, pairs)
    from train.gates.transfer import fit

    fit(model, pairs, TransferRun(gate=folder, experts=experts, epochs=30, batch_tokens=64, lr=1e-2))
    after = fit_quality(model, pairs)
    assert after["cosine"] > before["cosine"] + 0.2
    assert after["box_edge_cells"] < before["box_edge_cells"]
    assert not any(p.requires_grad for p in model.parameters())


def test_the_gates_features_hook_embeds_what_the_model_embeds_from_pixels(gate_and_experts):
    from train.gates.pointing import collate, load_run, make_sample

    folder, experts, _ = gate_and_experts
    run, oracle, proc = load_run(folder)
    model = real_model(oracle, experts)
    scene, image = render_scene(0, 3)
    sample = make_sample(scene, "Detect all objects shown in the image.", None, proc, None, "",
                         features=lambda s: real_features(model, proc, image)[0])
    batch = collate([sample], proc)
    with torch.no_grad():
        hooked = ExpertFed(model).embed(batch["input_ids"], batch["feats"], batch["view_skip"])
        processed = proc.process_image(image)
        direct = model.embed_inputs(batch["input_ids"], processed.pixels[None], torch.tensor([processed.skipped]))
    assert torch.allclose(hooked, direct, atol=1e-5)


def test_a_transfer_run_writes_a_loadable_checkpoint_and_its_scores(gate_and_experts, tmp_path):
    from sphinx_model.loading import from_pretrained

    folder, experts, _ = gate_and_experts
    result = transfer(TransferRun(gate=folder, experts=experts, out=tmp_path / "out", scenes=4, fit_eval_scenes=2,
                                  eval_scenes=1, epochs=1))
    assert set(result["scores"]) == {"world_eval", "world_eval_heldout"}
    assert -1.0 <= result["quality"]["heldout"]["cosine"] <= 1.0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["tokens"] == result["tokens"]
    model, processor = from_pretrained(tmp_path / "out" / "model")
    assert model.config.box_positions and model.config.shared_image_position
    _, image = render_scene(0, 1)
    processed = processor.process_image(image)
    with torch.no_grad():
        _, fused = model.expert_features(processed.pixels[None], torch.tensor([processed.skipped]))
    assert fused.shape[-1] == model.fused_dim


def test_the_feature_cache_of_the_training_world_stands_in_for_encoding_its_pictures(gate_and_experts, tmp_path):
    from train.feature_cache import write_cache
    from train.feature_files import CacheError, FeatureCache
    from train.gates.pointing import load_run
    from train.synthetic import write_world

    folder, experts, _ = gate_and_experts
    _, oracle, proc = load_run(folder)
    model = real_model(oracle, experts)
    world = write_world(tmp_path / "world", 3, seed=0, progress=False)
    write_cache(model, proc, [world], tmp_path / "cache", "float32", progress=False)
    cache = FeatureCache(tmp_path / "cache")
    from_cache = list(cached(cache, 0, 5))              # the world has 3 scenes: the rest are passed over
    computed = list(encoded(model, proc, [render_scene(0, i) for i in range(3)]))
    assert [s.id for s, _, _ in from_cache] == [s.id for s, _, _ in computed]
    for (_, a, skip_a), (_, b, skip_b) in zip(from_cache, computed):
        assert skip_a == skip_b and torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():
        next(getattr(model, model.expert_keys[0]).parameters()).add_(1.0)
    with pytest.raises(CacheError, match="other experts"):
        cache.check(model)
    result = transfer(TransferRun(gate=folder, experts=experts, out=tmp_path / "out", scenes=3, fit_eval_scenes=1,
                                  eval_scenes=1, epochs=1, feature_cache=tmp_path / "cache", projector_hidden=32,
                                  readout_hidden=8))
    assert result["tokens"] == pairs_tokens(from_cache)
    from sphinx_model.loading import from_pretrained

    loaded, _ = from_pretrained(tmp_path / "out" / "model")
    assert loaded.config.projector.type == "mlp_ln" and loaded.config.box_readout_hidden == 8


def pairs_tokens(entries) -> int:
    return sum(feats.shape[0] * feats.shape[1] for _, feats, _ in entries)
