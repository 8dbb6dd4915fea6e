"""Expert pretraining: a few steps on a tiny world lower the loss, the state resumes from
safetensors + JSON, and the starting checkpoint it writes loads and runs."""
from __future__ import annotations

import json

import pytest

from train.experts import ExpertRun, ExpertTrainer, main as experts_main, write_init
from train.synthetic import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("expert_world"), 40, seed=99, progress=False)


def test_loss_falls_and_the_init_checkpoint_loads(world, tmp_path):
    run = ExpertRun(preset="sphinx-test-tiny", data=world, output_dir=tmp_path / "run", eval_scenes=8, steps=12, batch_size=4, lr=3e-3,
                    warmup_steps=2, log_every=1, eval_every=100, save_every=6, workers=0, vocab_size=600)
    trainer = ExpertTrainer(run)
    trainer.train()
    losses = [json.loads(line)["loss"] for line in open(run.output_dir / "metrics.jsonl")
              if json.loads(line)["split"] == "train"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3

    resumed = ExpertTrainer(run)
    assert resumed.load_state() and resumed.step == 12
    for key in trainer.experts:
        for (name, a), b in zip(trainer.experts[key].state_dict().items(), resumed.experts[key].state_dict().values()):
            assert (a == b).all(), name

    from sphinx_model.conversation import Conversation, Message
    from sphinx_model.loading import from_pretrained
    from sphinx_model.serving.generation import GenerationSettings, Generator

    out = write_init(trainer, tmp_path / "init")
    model, processor = from_pretrained(out)
    for key, expert in trainer.experts.items():  # the trained experts, frozen, in the model
        loaded = getattr(model, key)
        assert not any(p.requires_grad for p in loaded.parameters())
        assert all((a == b).all() for a, b in zip(expert.state_dict().values(), loaded.state_dict().values()))
    ids = processor.tokenizer.encode("[0.12,0.34,0.56,1.00]", add_special_tokens=False)
    assert len(ids) == 9  # every coordinate is one token
    image = next((world / "images").iterdir())
    answer = Generator(model, processor).generate([Conversation([Message.user("Detect all objects shown in the image.", image=True)])],
                                                  [str(image)], GenerationSettings(max_new_tokens=4))
    assert isinstance(answer[0], str)


def test_cli_reports_a_missing_world(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {tmp_path / 'nowhere'}\noutput_dir: {tmp_path / 'out'}\nsteps: 1\n")
    assert experts_main(["--config", str(cfg)]) == 2
    assert "error:" in capsys.readouterr().err


def test_init_from_starts_a_new_run_on_earlier_experts_with_fresh_new_heads(world, tmp_path):
    from safetensors.torch import load_file, save_file

    from train.config import ConfigError
    from train.experts import load_run

    first = ExpertRun(preset="sphinx-test-tiny", data=world, output_dir=tmp_path / "first", eval_scenes=8, steps=2, batch_size=4,
                      warmup_steps=1, eval_every=100, save_every=2, workers=0)
    trainer = ExpertTrainer(first)
    trainer.train()
    state = first.output_dir / "state"
    older = tmp_path / "older"                     # a state from before the view-frame head existed
    older.mkdir()
    save_file({k: v for k, v in load_file(state / "weights.safetensors").items() if ".where." not in k},
              older / "weights.safetensors")

    second = ExpertTrainer(ExpertRun(preset="sphinx-test-tiny", data=world, output_dir=tmp_path / "second", seed=5, workers=0))
    fresh = second.load_init(older)
    assert sorted(fresh) == sorted(f"{key}.where.{p}" for key in trainer.experts for p in ("weight", "bias"))
    for key in trainer.experts:
        for a, b in zip(trainer.experts[key].state_dict().values(), second.experts[key].state_dict().values()):
            assert (a == b).all()
    assert second.step == 0

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {world}\noutput_dir: {tmp_path / 'third'}\ninit_from: {tmp_path / 'nowhere'}\n")
    with pytest.raises(ConfigError, match="init_from"):
        load_run(cfg, {})


def test_v5_run_renders_its_world_spells_words_and_reads_boxes_in_their_cells(tmp_path):
    from train.experts import RenderedViews, _cell_box_iou50
    from train.world.targets import view_targets
    from train.world.scene import render_scene

    run = ExpertRun(preset="sphinx-test-tiny", world_seed=3, spell_heads=True, read_cells=True, text_rich_share=0.5,
                    data=tmp_path / "no_world", output_dir=tmp_path / "v5",
                    tokenizer_scenes=20, vocab_size=512, eval_scenes=4, steps=3, batch_size=4, warmup_steps=1, log_every=1, eval_every=3, save_every=3,
                    workers=0)
    trainer = ExpertTrainer(run)
    trainer.train()
    rows = [json.loads(line) for line in open(run.output_dir / "metrics.jsonl")]
    assert {r["split"] for r in rows} == {"train", "eval", "eval_heldout"}
    last = rows[-1]
    for key in trainer.experts:
        for name in ("word_exact", "case", "has_mark_f1", "box_iou50", "letter", "word_read", "mark_sub"):
            assert 0.0 <= last[f"{key}/acc/{name}"] <= 1.0
    init = write_init(trainer, tmp_path / "init")                          # the tokenizer from rendered dialogues
    from sphinx_model.loading import from_pretrained

    model, processor = from_pretrained(init)
    from train.demo_tokenizer import single_token_numbers

    assert single_token_numbers(processor.tokenizer) == 1.0 and not (run.data / "data.jsonl").exists()
    assert len(processor.tokenizer) > 384                                    # merges learnt from the dialogues
    first = RenderedViews(3, 2, trainer.config, trainer.token_grid)[0]      # the same scene every time
    again = RenderedViews(3, 2, trainer.config, trainer.token_grid)[0]
    assert (first[0] == again[0]).all()

    # the box read-out: the truth's own cell-relative box, placed in its cell, is the truth
    scene, _ = render_scene(5, 3)
    t = view_targets(scene, "top-left", 2, 4)
    assert _cell_box_iou50(t.obj_box, t, t.obj > 0) == 1.0
    shifted = t.obj_box + 0.5                                                # half a cell off on every edge
    assert _cell_box_iou50(shifted, t, t.obj > 0) < 1.0


def test_imagenet_weights_map_onto_the_cnn_expert_by_order_with_every_shape_checked():
    import timm
    import torch

    from train.imagenet_init import efficientnet_lite0_weights, load_imagenet_trunk, map_by_order

    trunk = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))
    load_imagenet_trunk(trunk)
    source = efficientnet_lite0_weights()
    assert torch.equal(trunk.state_dict()["conv_stem.weight"], source["_conv_stem.weight"])
    bad = dict(source)
    bad["_conv_stem.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not fit"):
        map_by_order(bad, trunk.state_dict())


def test_frozen_imagenet_stages_stay_as_loaded_while_the_rest_of_the_expert_learns(tmp_path):
    import torch

    from train.config import ConfigError
    from train.experts import RenderedViews, collate

    run = ExpertRun(preset="sphinx-demo", world_seed=3, spell_heads=True, imagenet_init=True, freeze_blocks=3,
                    output_dir=tmp_path / "frozen", batch_size=1, lr=1e-2, warmup_steps=1, workers=0)
    trainer = ExpertTrainer(run)
    trunk = trainer.experts["efficientnet_lite0"].trunk
    frozen = {n: p.detach().clone() for n, p in trunk.named_parameters() if n.startswith(("conv_stem", "bn1", "blocks.0.",
                                                                                            "blocks.1.", "blocks.2."))}
    stats = trunk.blocks[1][0].bn1.running_mean.clone()
    later = trunk.blocks[5][0].conv_pw.weight.detach().clone()
    in_optimizer = {id(p) for g in trainer.optim.param_groups for p in g["params"]}
    assert frozen and not any(p.requires_grad for n, p in trunk.named_parameters() if n in frozen)
    assert not any(id(p) in in_optimizer for n, p in trunk.named_parameters() if n in frozen)
    pixels, targets = collate([RenderedViews(3, 1, trainer.config, trainer.token_grid)[0]])
    loss, _, _ = trainer.forward(pixels, targets)
    loss.backward()
    trainer.optim.step()
    assert all(torch.equal(p, frozen[n]) for n, p in trunk.named_parameters() if n in frozen)
    assert torch.equal(trunk.blocks[1][0].bn1.running_mean, stats)               # batch norms too
    assert not torch.equal(trunk.blocks[5][0].conv_pw.weight, later)              # the rest learns
    with pytest.raises(ConfigError, match="freeze_blocks"):
        ExpertTrainer(ExpertRun(preset="sphinx-demo", freeze_blocks=7, output_dir=tmp_path / "bad"))


def test_the_gate_b_table_reads_the_last_held_out_read_outs_against_the_targets(tmp_path, capsys):
    from train.experts import GATE_B, gate_b_table

    def row(step, split, value):
        return json.dumps({"step": step, "split": split, **{f"{e}/acc/{k}": value for e in ("cnn", "vit")
                                                           for k in GATE_B}})

    (tmp_path / "metrics.jsonl").write_text("\n".join([row(10, "train", 1.0), row(10, "eval", 0.5),
                                                      row(10, "eval_heldout", 0.5), row(20, "eval", 0.99),
                                                      row(20, "eval_heldout", 0.97)]) + "\n")
    table = gate_b_table(tmp_path / "metrics.jsonl")
    assert table.startswith("Step 20")
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[3:]}
    assert lines["shape"].endswith("| yes |") and lines["colour"].endswith("| no |")   # 0.97 < 0.98 on one set
    assert experts_main(["--table", str(tmp_path)]) == 0 and "box_iou50" in capsys.readouterr().out
    earlier = json.dumps({"step": 30, "split": "eval", "cnn/acc/word_exact": 0.03, "cnn/acc/mark": 0.6})
    (tmp_path / "metrics.jsonl").write_text(earlier + "\n")                 # a run from before the per-cell reading
    lines = {line.split(" | ")[0].strip("| "): line for line in gate_b_table(tmp_path / "metrics.jsonl").splitlines()[3:]}
    assert "0.03" in lines["word_exact"] and "0.60" in lines["mark"] and "word_read" not in lines
    (tmp_path / "metrics.jsonl").write_text(row(5, "train", 1.0) + "\n")
    assert experts_main(["--table", str(tmp_path)]) == 2 and "no held-out" in capsys.readouterr().err
