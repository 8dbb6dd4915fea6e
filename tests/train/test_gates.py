"""The Gate A harness: oracle features say what is where, the scene pool caches scene truth, and
the teacher-forced coordinate score counts what it says."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from train.gates.oracle import FEATURES, OBJ, OBJ_BOX, perfect_box_readout, scene_features
from train.gates.pointing import coordinate_accuracy
from train.gates.scene_pool import scene_pool
from train.world.scene import Scene, WorldObject, render_scene
from sphinx_model.canvas_positions import CanvasPositions


def one_object_scene() -> Scene:
    # a 400x400 scene, one object whose centre (280, 90) = (0.7, 0.225) lies in the top-right quarter
    return Scene(id="t", width=400, height=400, background="plain",
                 objects=[WorldObject("circle", "red", "medium", (240, 50, 320, 130))])


def test_the_object_token_is_the_one_over_its_centre():
    feats = scene_features(one_object_scene(), "top-left", grid=2, token_grid=2)   # (5 views, 1 + 4, F)
    assert feats.shape == (5, 5, FEATURES)
    present = feats[..., OBJ].nonzero().tolist()
    # global view: its top-right token (index 1 + 1); view 2 (the top-right cell): its top-left token (1 + 0)
    assert present == [[0, 2], [2, 1]]


def test_a_perfect_read_out_places_the_object_box_on_the_canvas():
    scene = one_object_scene()
    feats = scene_features(scene, "top-left", grid=2, token_grid=2)
    pos = CanvasPositions(grid=2, tokens_per_view=5, dim=64, readout_dim=FEATURES)
    perfect_box_readout(pos.readout)
    boxes = pos.boxes(torch.arange(5), feats)
    truth = torch.tensor([240, 50, 320, 130]) / 400
    for view, token in ((0, 2), (2, 1)):
        assert torch.allclose(boxes[view, token], truth, atol=0.02), boxes[view, token]
    assert torch.allclose(boxes[1, 1], torch.tensor([0.0, 0.0, 0.25, 0.25]))  # empty token: its own cell


def test_the_pool_renders_once_and_reads_back_the_same_scenes(tmp_path):
    first = scene_pool(7, 3, folder=tmp_path)
    assert [s.to_dict() for s in first] == [render_scene(7, i)[0].to_dict() for i in range(3)]
    cached = next(tmp_path.glob("*.jsonl"))
    rows = cached.read_text().splitlines()
    rows[0] = json.dumps({**json.loads(rows[0]), "id": "edited"})
    cached.write_text("\n".join(rows) + "\n")
    assert scene_pool(7, 3, folder=tmp_path)[0].id == "edited"          # read from the cache, not redrawn


def test_coordinate_accuracy_counts_exact_and_near_guesses():
    coord = torch.arange(10, 111)                       # token ids of 0.00 .. 1.00
    labels = torch.tensor([[-100, 50, 5, 80]])          # 0.40, a non-coordinate, 0.70
    logits = torch.full((1, 4, 200), -1.0)
    logits[0, 0, 51] = 5.0                              # predicts 0.41 for 0.40: near, not exact
    logits[0, 1, 5] = 5.0
    logits[0, 2, 80] = 5.0                              # exact
    got = coordinate_accuracy(logits, labels, coord)
    assert got == {"exact": 0.5, "near": 1.0}
    logits[0, 2, 80] = -5.0
    logits[0, 2, 100] = 5.0                             # 0.90 for 0.70: far
    assert coordinate_accuracy(logits, labels, coord) == {"exact": 0.0, "near": 0.5}


def test_the_word_projector_writes_what_a_token_holds_in_the_llms_own_words():
    from train.gates.pointing import GateRun, build

    model, proc, _ = build(GateRun(mechanism="box", token_grid=2, word_projector=True, visual_norm=0.7))
    feats = scene_features(one_object_scene(), "top-left", grid=2, token_grid=2)
    linear = model.model.visual_proj[0]
    emb = model.model.llm.get_input_embeddings().weight
    words = [proc.tokenizer.encode(" " + w, add_special_tokens=False) for w in ("medium", "red", "circle")]
    named = sum(emb[ids].sum(0) for ids in words)
    token = linear(feats[0, 2])                                   # the object's global-view token
    assert torch.nn.functional.cosine_similarity(token, named, dim=0) > 0.9
    other = sum(emb[proc.tokenizer.encode(" " + w, add_special_tokens=False)].sum(0) for w in ("small", "blue", "star"))
    assert torch.nn.functional.cosine_similarity(token, other, dim=0) < 0.5
    # tokens start at the text's scale, not LayerNorm's sqrt(d)
    views = torch.zeros(1, 5, dtype=torch.bool)
    visual = model.model.layout_images(model.model.visual_proj(feats), views, feats)[0]
    assert visual.norm(dim=-1).max() < 3.0


def test_a_later_gate_run_starts_from_an_earlier_ones_weights_on_another_token_grid(tmp_path):
    from safetensors.torch import save_file
    from train.gates.pointing import GateRun, build, load_gate_weights

    small, _, _ = build(GateRun(mechanism="box", token_grid=2))
    with torch.no_grad():
        small.model.llm.lm_head.weight.add_(1.0)
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, tmp_path / "w.safetensors")
    big, _, _ = build(GateRun(mechanism="box", token_grid=4))
    table = big.model.canvas_pos.table.detach().clone()
    load_gate_weights(big, tmp_path / "w.safetensors")
    assert torch.equal(big.model.llm.lm_head.weight, small.model.llm.lm_head.weight)
    assert torch.equal(big.model.canvas_pos.table, table)           # another grid: its own table stays


def test_the_answer_mean_loss_weighs_a_short_answer_as_much_as_a_long_one():
    from train.gates.pointing import answer_mean_loss

    logits = torch.zeros(2, 6, 4)
    logits[0, :, 1] = 5.0                               # row 0 always says 1, row 1 always says 2
    logits[1, :, 2] = 5.0
    labels = torch.tensor([[-100, 1, -100, -100, -100, -100],    # one answer token, right
                           [-100, 3, 3, 3, 3, 3]])               # five answer tokens, all wrong
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
    per_answer = answer_mean_loss(logits, labels)
    wrong = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 0.0, 5.0, 0.0]]), torch.tensor([3]))
    right = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 5.0, 0.0, 0.0]]), torch.tensor([1]))
    assert torch.allclose(per_answer, (wrong + right) / 2)
    assert torch.allclose(per_token, (5 * wrong + right) / 6)


def test_a_smaller_pool_is_read_from_a_larger_one_of_the_same_world(tmp_path):
    scene_pool(7, 4, folder=tmp_path)
    assert [s.id for s in scene_pool(7, 2, folder=tmp_path)] == [render_scene(7, i)[0].id for i in range(2)]
    assert len(list(tmp_path.glob("*.jsonl"))) == 1                    # nothing rendered again


def test_the_gates_greedy_decoder_writes_what_transformers_generate_writes():
    from sphinx_model.positions import rotary_positions
    from train.gates.pointing import GateRun, build, greedy

    torch.manual_seed(0)
    model, proc, _ = build(GateRun(mechanism="none", token_grid=2))
    llm = model.model.llm.eval()
    ids = torch.randint(5, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                                     # left padding
    embeds = llm.get_input_embeddings()(ids)
    ours = greedy(llm, embeds, mask, rotary_positions(ids, mask, False), 6, eos=-1)
    theirs = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    assert ours == theirs.tolist()


def test_the_attention_probe_labels_the_named_objects_tokens_as_the_target():
    from train.gates.attention import slot_kinds

    scene = one_object_scene()
    scene.objects.append(WorldObject("square", "blue", "small", (20, 300, 60, 340)))
    feats = scene_features(scene, "top-left", grid=2, token_grid=2)             # (5, 5, F), no view skipped
    kinds = slot_kinds(feats, [False] * 5, "circle", "red")
    assert len(kinds) == 5 * (5 + 2)
    # layout per view: start, token 0 (pooled), 4 grid tokens, end
    assert [i for i, k in enumerate(kinds) if k == "target"] == [0 * 7 + 1 + 2, 2 * 7 + 1 + 1]
    assert kinds.count("object") == 2                                             # the square: global + its view


def test_gate_curves_average_the_near_score_and_chain_curriculum_steps(tmp_path):
    from train.gates.curves import WINDOW, near_curve, plot, start_step

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, value, n in ((first, 0.2, 2 * WINDOW), (second, 0.6, WINDOW)):
        folder.mkdir()
        rows = [{"step": s + 1, "loss": 1.0, "coord_near": value if s % 2 else value + 0.2} for s in range(n)]
        rows.insert(3, {"step": 3, "eval": {}})                              # evaluation rows are skipped
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (second / "run.json").write_text(json.dumps({"init_weights": str(first / "weights.safetensors")}))
    steps, values = near_curve(first)
    assert steps == [WINDOW, 2 * WINDOW] and all(abs(v - 0.3) < 1e-9 for v in values)
    assert start_step(second, {"first": 2 * WINDOW}) == 2 * WINDOW
    assert start_step(first, {}) == 0
    assert plot([first, second], tmp_path / "c.png").stat().st_size > 1000


def test_the_gate_names_a_missing_starting_point_instead_of_failing_later(tmp_path, capsys):
    from train.gates.pointing import main

    assert main(["--init-weights", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)]) == 1
    assert "not found: --init-weights" in capsys.readouterr().err
    assert main(["--init-llm", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "--init-llm" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                                   # no run folder was started


def test_the_gate_table_lists_gate_a_runs_and_passes_over_other_gates_records(tmp_path, capsys):
    from train.gates.pointing import GateRun, main, run_record

    final = {name: {"grounding": 0.91, "detection": 0.82} for name in ("world_eval", "world_eval_heldout")}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text(json.dumps({"run": run_record(GateRun(name="a")), "final": final,
                                                            "steps": 5, "examples": 80, "train_minutes": 1.0}))
    (tmp_path / "transfer").mkdir()                                    # Gate C's transfer record: another schema
    (tmp_path / "transfer" / "result.json").write_text(json.dumps({"scores": {}, "quality": {}}))
    assert main(["--table", "--out", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| a:")]
    assert len(rows) == 1 and "0.91 / 0.91" in rows[0] and "0.82 / 0.82" in rows[0]


def test_with_an_other_share_the_gate_also_asks_the_worlds_other_tasks_with_their_own_answers(tmp_path):
    import random

    from train.gates.pointing import GateRun, OTHER_TASKS, build, training_sample, training_scenes

    run = GateRun(mechanism="box+coords", token_grid=2, pool=tmp_path / "pool", pool_scenes=40, other_share=0.5,
                  attend_weight=0.3, system="")
    _, proc, cells = build(run)
    rng = random.Random(0)
    scenes = training_scenes(run)
    samples = [training_sample(rng, scenes, run, proc, cells) for _ in range(40)]
    answers = [proc.tokenizer.decode([t for t in s.labels if t != -100]) for s in samples]
    boxed = [a for a in answers if a.lstrip().startswith(("[", "<p>"))]
    assert 8 <= len(boxed) <= 32                                   # about half point, half answer otherwise
    other = [s for s, a in zip(samples, answers) if a not in boxed]
    assert other and all(s.targets == [] for s in other)           # nothing to supervise in them
    assert all(s.targets for s, a in zip(samples, answers) if a in boxed)
    assert {"count_shape", "colour_of", "som"} <= set(OTHER_TASKS) and "ocr" not in OTHER_TASKS


def test_as_cells_the_oracle_gives_each_tokens_letters_and_no_word_identity():
    from train.gates.oracle import CASE, CELL_LETTERS, LETTER_CLASSES, WORD, WORD_BOX
    from train.world.scene import WorldWord
    from train.world.vocab import TRAIN_FONTS, WORDS

    word = next(w for w in WORDS if len(w) >= 5 and w.isalpha())
    scene = Scene(id="w", width=400, height=400, background="plain",
                  words=[WorldWord(word.upper(), (60, 180, 340, 220), Path(TRAIN_FONTS[0]).stem)])
    as_word = scene_features(scene, "top-left", grid=2, token_grid=4)
    as_cells = scene_features(scene, "top-left", grid=2, token_grid=4, text="cells")
    assert as_word.shape == as_cells.shape == (5, 17, FEATURES)
    assert as_word[..., WORD:WORD_BOX].sum() > 0 and as_cells[..., WORD:WORD_BOX].sum() == 0
    assert as_word[..., CELL_LETTERS:].sum() == 0
    # the global view (4 cells across the word's row) reads the word, cell by cell, left to right
    slots = as_cells[0, 1:, CELL_LETTERS:CASE].view(16, -1, LETTER_CLASSES).argmax(-1)     # (tokens, slots)
    held = as_cells[0, 1:, CELL_LETTERS:CASE].sum(-1) > 0
    read = "".join("abcdefghijklmnopqrstuvwxyz"[c - 1] for t in held.nonzero()[:, 0].tolist()
                   for c in slots[t].tolist() if c > 0)
    assert read == word.lower()
    # its case (upper) at the token over its centre, and nowhere else
    assert as_cells[0, :, CASE:].sum() == 1 and as_cells[0, :, CASE + 1].sum() == 1


def test_a_run_from_before_the_letter_channels_loads_with_them_silent(tmp_path):
    from safetensors.torch import save_file
    from train.gates.oracle import CELL_LETTERS
    from train.gates.pointing import GateRun, build, load_gate_weights

    old, _, _ = build(GateRun(mechanism="box", token_grid=2))
    state = {k: v.contiguous() for k, v in old.state_dict().items()}
    for key in ("model.visual_proj.0.weight", "model.canvas_pos.readout.weight"):
        state[key] = state[key][:, :CELL_LETTERS].contiguous() + 0.5      # as saved before the channels existed
    save_file(state, tmp_path / "old.safetensors")
    new, _, _ = build(GateRun(mechanism="box", token_grid=2))
    load_gate_weights(new, tmp_path / "old.safetensors")
    proj = new.model.visual_proj[0].weight
    assert torch.equal(proj[:, :CELL_LETTERS], state["model.visual_proj.0.weight"])
    assert proj[:, CELL_LETTERS:].abs().sum() == 0
    assert new.model.canvas_pos.readout.weight[:, CELL_LETTERS:].abs().sum() == 0


def test_reading_tasks_are_asked_only_when_named_and_unknown_tasks_are_refused(tmp_path, capsys):
    import argparse
    import random

    import pytest

    from train.gates.pointing import GateRun, build, main, parse_other_tasks, training_sample, training_scenes

    assert parse_other_tasks("ocr, spotting") == ("ocr", "spotting")
    with pytest.raises(argparse.ArgumentTypeError, match="reading"):
        parse_other_tasks("ocr,reading")
    with pytest.raises(SystemExit):
        main(["--other-tasks", "nonsense", "--minutes", "0"])
    assert "unknown task" in capsys.readouterr().err
    run = GateRun(mechanism="box+coords", token_grid=2, other_share=1.0, other_tasks=("ocr",), text_features="cells",
                  system="", pool_scenes=300, pool=tmp_path / "pool")
    model, proc, cells = build(run)
    sample = training_sample(random.Random(0), training_scenes(run), run, proc, cells)
    text = proc.tokenizer.decode([i for i in sample.input_ids if i >= 0])
    assert "text in the image" in text or "Read the text" in text


def test_text_only_exchanges_train_beside_images_and_alone(tmp_path):
    import random

    from train.gates.pointing import GateRun, build, collate, text_sample, training_sample, training_scenes
    from train.world.tasks import TEXT_ONLY

    run = GateRun(mechanism="box+coords", token_grid=2, system="", pool_scenes=300, pool=tmp_path / "pool",
                  text_only_share=0.5, other_share=0.5)
    model, proc, cells = build(run)
    rng = random.Random(0)
    samples = [training_sample(rng, training_scenes(run), run, proc, cells) for _ in range(8)]
    chats = [s for s in samples if not s.skipped]
    assert chats and len(chats) < len(samples)
    words = {proc.tokenizer.decode([i for i in s.input_ids if i >= 0]) for s in chats}
    assert all(any(q in w for q, _ in TEXT_ONLY) for w in words)
    for batch in (samples, chats):                                   # mixed, and text alone
        b = collate(batch, proc)
        embeds = model.embed(b["input_ids"], b["feats"], b["view_skip"])
        out = model.model.llm(inputs_embeds=embeds, attention_mask=b["attention_mask"], labels=b["labels"])
        assert torch.isfinite(out.loss)
    alone = text_sample("What is 2 plus 3?", "5", proc, "")
    assert alone.feats.shape[0] == 0 and alone.skipped == []


def test_the_pooled_token_codes_each_count_as_a_thermometer():
    from train.gates.oracle import COUNT_CODE, COUNT_LEVELS
    from train.world.vocab import COLOUR_NAMES, SHAPES

    scene = Scene(id="c", width=400, height=400, background="plain",
                  objects=[WorldObject("circle", "red", "small", (20 + 60 * i, 20, 60 + 60 * i, 60)) for i in range(3)]
                  + [WorldObject("star", "blue", "small", (20, 300, 60, 340))])
    code = scene_features(scene, "top-left", grid=2, token_grid=2)[0, 0, COUNT_CODE:].view(-1, COUNT_LEVELS)
    assert code.shape[0] == len(SHAPES) + len(COLOUR_NAMES)
    assert code.sum(-1)[SHAPES.index("circle")] == 3 and code.sum(-1)[SHAPES.index("star")] == 1
    assert code.sum(-1)[len(SHAPES) + COLOUR_NAMES.index("red")] == 3
    assert code[SHAPES.index("circle")].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]    # on up to the count, then off
    assert code.sum() == 8                                                       # 4 objects, each a shape and a colour
    grid = scene_features(scene, "top-left", grid=2, token_grid=2)[:, 1:, COUNT_CODE:]
    assert grid.sum() == 0                                                       # only pooled tokens carry counts


def test_token_noise_touches_only_the_visual_tokens_at_the_size_asked():
    from sphinx_model.processor import IMAGE_TOKEN_ID
    from train.gates.pointing import noisy_tokens

    torch.manual_seed(0)
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7] + [IMAGE_TOKEN_ID] * 200])
    embeds = torch.randn(1, ids.shape[1], 256) * 3.0
    noisy = noisy_tokens(embeds, ids, 0.33)
    text = ids[0] != IMAGE_TOKEN_ID
    assert torch.equal(noisy[0, text], embeds[0, text])
    image = ~text
    cosine = torch.nn.functional.cosine_similarity(noisy[0, image], embeds[0, image], dim=-1).mean()
    assert abs(cosine.item() - 1 / (1 + 0.33 ** 2) ** 0.5) < 0.01
