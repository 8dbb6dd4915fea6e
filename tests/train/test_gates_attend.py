"""Attention supervision of Gate A: its targets are the named object's tokens, its attention is the
head's real attention, and its loss falls when the head looks at the object."""
from __future__ import annotations

import random

import torch

from sphinx_model.processor import IMAGE_TOKEN_ID
from train.demo_tokenizer import NUMBER_PIECES
from train.gates.attend import (
    ATTRIBUTE_WORDS,
    BoxTarget,
    HeadAttention,
    attention_loss,
    attributes,
    naming_loss,
    object_slots,
    phrase_loss,
    phrase_positions,
    visual_slots,
)
from sphinx_model.positions import rotary_positions
from train.gates.pointing import GateRun, build, collate, make_sample
from train.world.scene import Scene, WorldObject
from train.world.tasks import TaskWriter


def two_object_scene() -> Scene:
    return Scene(id="t", width=400, height=400, background="plain",
                 objects=[WorldObject("circle", "red", "medium", (240, 50, 320, 130)),
                          WorldObject("triangle", "blue", "large", (40, 220, 160, 340))])


def gate(token_grid: int = 2):
    torch.manual_seed(0)                       # the losses' falls are checked from one fixed start
    run = GateRun(mechanism="box+coords", token_grid=token_grid, system="", shared_image_position=True)
    model, proc, cells = build(run)
    return run, model.eval(), proc, cells


def fit_head(model, b: dict, probe: HeadAttention, loss_of) -> list[float]:
    """15 Adam steps on the probed head's query and key, on `loss_of(probe)` -> the losses."""
    attn = probe.attention
    opt = torch.optim.Adam([attn.q_proj.weight, attn.k_proj.weight], lr=0.02)
    losses = []
    for _ in range(15):
        model.model.llm(inputs_embeds=model.embed(b["input_ids"], b["feats"], b["view_skip"]),
                        attention_mask=b["attention_mask"])
        loss = loss_of(probe)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_an_objects_slots_are_the_visual_positions_that_hold_it():
    run, model, proc, cells = gate()
    scene = two_object_scene()
    sample = make_sample(scene, "Locate the triangle in the image.", "[0.10,0.55,0.40,0.85]", proc, cells, "")
    slots = visual_slots(sample.feats, sample.skipped)
    assert len(slots) == sample.input_ids.count(IMAGE_TOKEN_ID)       # one entry per placeholder
    triangle = object_slots(slots, scene.objects[1])
    circle = object_slots(slots, scene.objects[0])
    assert triangle and circle and not set(triangle) & set(circle)
    assert all(attributes(slots[i]) == ("triangle", "blue", "large") for i in triangle)
    # the global view holds both; each sub-view at most one of them
    assert len(triangle) == 2 and len(circle) == 2


def test_grounding_object_asks_what_grounding_asks_and_names_its_object():
    scene = two_object_scene()
    writer = TaskWriter(scene)
    for seed in range(6):
        q, a, obj, phrase = writer.grounding_object(random.Random(seed))
        assert writer.grounding(random.Random(seed)) == (q, a)
        assert a == writer.box(obj.box) and phrase in q and obj.shape in phrase


def test_detection_groups_list_the_objects_in_the_answers_order():
    scene = two_object_scene()
    writer = TaskWriter(scene)
    order = [o for group in writer.detection_groups().values() for o in group]
    answer = writer.detection_answer()
    places = [answer.index(writer.box(o.box)[1:-1]) for o in order]
    assert places == sorted(places) and len(order) == 2


def test_the_supervised_rows_are_the_heads_own_attention_and_the_loss_rewards_looking_at_the_object():
    run, model, proc, cells = gate()
    scene = two_object_scene()
    writer = TaskWriter(scene)
    coord_ids = torch.tensor([proc.tokenizer.convert_tokens_to_ids(p) for p in NUMBER_PIECES])
    sample = make_sample(scene, "Locate the triangle in the image.", writer.box(scene.objects[1].box), proc, cells, "")
    slots = visual_slots(sample.feats, sample.skipped)
    sample.targets = [BoxTarget(object_slots(slots, scene.objects[1]))]
    b = collate([sample], proc)
    llm = model.model.llm
    llm.set_attn_implementation("eager")
    attn = llm.model.layers[1].self_attn
    probe = HeadAttention(attn, head=3)

    def forward():
        return llm(inputs_embeds=model.embed(b["input_ids"], b["feats"], b["view_skip"]),
                   attention_mask=b["attention_mask"], output_attentions=True,
                   position_ids=rotary_positions(b["input_ids"], b["attention_mask"], True))

    with torch.no_grad():
        out = forward()
        writes = torch.isin(b["labels"][0, 1:], coord_ids).nonzero()[:, 0]
        assert len(writes) == 4
        mine = probe.log_probs(0, writes, b["attention_mask"][0].bool()).exp()
        assert torch.allclose(mine, out.attentions[1][0, 3, writes], atol=1e-5)
        before = attention_loss(probe, b["input_ids"], b["labels"], b["attention_mask"], b["targets"],
                                coord_ids, IMAGE_TOKEN_ID)
    # a few steps on the supervision alone move that head's mass onto the triangle
    opt = torch.optim.SGD([attn.q_proj.weight, attn.k_proj.weight], lr=0.5)
    for _ in range(20):
        forward()
        loss = attention_loss(probe, b["input_ids"], b["labels"], b["attention_mask"], b["targets"],
                              coord_ids, IMAGE_TOKEN_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before.item()
    probe.remove()


def test_rows_whose_boxes_do_not_match_their_targets_are_left_out():
    run, model, proc, cells = gate()
    scene = two_object_scene()
    coord_ids = torch.tensor([proc.tokenizer.convert_tokens_to_ids(p) for p in NUMBER_PIECES])
    sample = make_sample(scene, "Locate the triangle in the image.", TaskWriter(scene).box(scene.objects[1].box),
                         proc, cells, "")
    sample.targets = [BoxTarget([3]), BoxTarget([4])]            # two targets for a one-box answer
    b = collate([sample], proc)
    probe = HeadAttention(model.model.llm.model.layers[0].self_attn, head=0)
    with torch.no_grad():
        model.model.llm(inputs_embeds=model.embed(b["input_ids"], b["feats"], b["view_skip"]),
                        attention_mask=b["attention_mask"])
    assert attention_loss(probe, b["input_ids"], b["labels"], b["attention_mask"], b["targets"], coord_ids,
                          IMAGE_TOKEN_ID) is None


def test_box_targets_find_each_boxs_object_and_the_words_that_name_it():
    from train.gates.pointing import box_targets

    run, model, proc, cells = gate()
    scene = two_object_scene()
    writer = TaskWriter(scene)
    # grounding: the question's phrase
    sample = make_sample(scene, "Where is the large triangle? Give its bounding box.", writer.box(scene.objects[1].box),
                         proc, cells, "")
    (box,) = box_targets(sample, [(" large triangle", scene.objects[1])], proc)
    assert proc.tokenizer.decode([sample.input_ids[i] for i in box.phrase]).strip() == "large triangle"
    assert sorted(ATTRIBUTE_WORDS[i] for i in box.named) == ["large", "triangle"]
    assert box.slots == object_slots(visual_slots(sample.feats, sample.skipped), scene.objects[1])
    # detection: each box's own "<p>name</p>" in the answer, in turn
    question, answer = writer.detection(random.Random(0))
    sample = make_sample(scene, question, answer, proc, cells, "")
    named = [(name, o) for name, group in writer.detection_groups().items() for o in group]
    boxes = box_targets(sample, named, proc)
    names = [proc.tokenizer.decode([sample.input_ids[i] for i in b.phrase]).strip() for b in boxes]
    assert names == [name for name, _ in named] and len(set(map(tuple, (b.phrase for b in boxes)))) == 2
    first_answer = next(i for i, label in enumerate(sample.labels) if label != -100)
    assert all(b.phrase[0] >= first_answer for b in boxes)
    assert phrase_positions(sample.input_ids, proc.tokenizer.encode(" red star", add_special_tokens=False)) == []


def test_the_first_hop_targets_the_naming_words_at_every_coordinate():
    from train.gates.pointing import box_targets

    run, model, proc, cells = gate()
    scene = two_object_scene()
    coord_ids = torch.tensor([proc.tokenizer.convert_tokens_to_ids(p) for p in NUMBER_PIECES])
    sample = make_sample(scene, "Where is the large triangle? Give its bounding box.",
                         TaskWriter(scene).box(scene.objects[1].box), proc, cells, "")
    sample.targets = box_targets(sample, [(" large triangle", scene.objects[1])], proc)
    b = collate([sample], proc)
    probe = HeadAttention(model.model.llm.model.layers[1].self_attn, head=1)
    losses = fit_head(model, b, probe, lambda p: phrase_loss(p, b["labels"], b["attention_mask"], b["targets"], coord_ids))
    assert losses[-1] < 0.5 * losses[0]
    unnamed = [[BoxTarget(box.slots) for box in row] for row in b["targets"]]
    assert phrase_loss(probe, b["labels"], b["attention_mask"], unnamed, coord_ids) is None


def test_naming_targets_the_objects_a_detection_answer_names_at_the_positions_that_write_the_name():
    from train.gates.pointing import box_targets

    run, model, proc, cells = gate()
    scene = two_object_scene()
    writer = TaskWriter(scene)
    question, answer = writer.detection(random.Random(0))
    sample = make_sample(scene, question, answer, proc, cells, "")
    named = [(name, o) for name, group in writer.detection_groups().items() for o in group]
    sample.targets = box_targets(sample, named, proc)
    b = collate([sample], proc)
    probe = HeadAttention(model.model.llm.model.layers[3].self_attn, head=1)
    seen = []
    real = probe.log_probs

    def spy(row, queries, keep):                                    # which positions ask, for which columns
        seen.append(queries.tolist())
        return real(row, queries, keep)

    probe.log_probs = spy
    losses = fit_head(model, b, probe, lambda p: naming_loss(p, b["input_ids"], b["labels"], b["attention_mask"],
                                                             b["targets"], IMAGE_TOKEN_ID))
    assert losses[-1] < 0.5 * losses[0]
    # each name's words are written by the position before each: "<p>" then the words but the last
    names = {tuple(t.phrase) for t in sample.targets}
    assert sorted(seen[0]) == sorted(p - 1 for phrase in names for p in phrase)
    # grounding names its object in the question, not in the answer: nothing to supervise
    grounding = make_sample(scene, "Where is the large triangle? Give its bounding box.",
                            writer.box(scene.objects[1].box), proc, cells, "")
    grounding.targets = box_targets(grounding, [(" large triangle", scene.objects[1])], proc)
    g = collate([grounding], proc)
    assert naming_loss(probe, g["input_ids"], g["labels"], g["attention_mask"], g["targets"], IMAGE_TOKEN_ID) is None


def test_ridge_read_outs_find_an_attribute_that_is_there_and_not_one_that_is_not():
    from train.gates.probe import GROUPS, WORDS, ridge_accuracy

    g = torch.Generator().manual_seed(0)
    n, d = 600, 32
    shape = torch.randint(0, GROUPS["shape"][1], (n,), generator=g)
    y = torch.zeros(n, len(WORDS))
    y[torch.arange(n), shape] = 1.0
    codes = torch.randn(GROUPS["shape"][1], d, generator=g)
    held = codes[shape] + 0.1 * torch.randn(n, d, generator=g)          # shape written into the vectors
    noise = torch.randn(n, d, generator=g)                              # nothing of it
    assert ridge_accuracy(held, y)["shape"] > 0.95
    assert ridge_accuracy(noise, y)["shape"] < 0.4
    assert ridge_accuracy(held, y)["colour"] is None                   # no row names a colour


def test_the_probe_reads_a_fresh_gate_models_visual_tokens_and_measures_its_residual_stream(tmp_path):
    from train.gates.probe import probe

    run = GateRun(mechanism="box+coords", token_grid=2, system="", word_projector=True, max_objects=2,
                  pool=tmp_path, pool_scenes=300)
    model, proc, _ = build(run)
    report = probe(model, proc, run, layer=0, questions=60)
    assert report["key"]["shape"] > 0.9 and report["key"]["colour"] > 0.9
    assert report["norms"]["0/resid/visual"] > 0 and "5/mlp/text" in report["norms"]


def test_the_named_words_read_out_scores_the_questions_words_at_the_coordinates():
    from torch import nn

    from train.gates.attend import named_loss, named_words

    assert sorted(ATTRIBUTE_WORDS[i] for i in named_words("the small red circle")) == ["circle", "red", "small"]
    coord = torch.arange(10, 111)
    labels = torch.tensor([[-100, -100, 20, 30, 40, 50, 2]])                 # positions 1-4 write the coordinates
    d = 8
    hidden = torch.zeros(1, 7, d)
    readout = nn.Linear(d, len(ATTRIBUTE_WORDS))
    with torch.no_grad():
        readout.weight.zero_()
        readout.bias.fill_(-10.0)
        readout.bias[named_words("the red circle")] = 10.0                 # says "red circle" everywhere
    right = named_loss(readout, hidden, labels, [[BoxTarget([], [], named_words("the red circle"))]], coord)
    wrong = named_loss(readout, hidden, labels, [[BoxTarget([], [], named_words("the blue square"))]], coord)
    assert right.item() < 0.01 < 10.0 < wrong.item()
    assert named_loss(readout, hidden, labels, [[BoxTarget([])]], coord) is None       # nothing named


def test_the_probes_name_a_folder_that_is_not_a_gate_run(tmp_path, capsys):
    from train.gates import attention, probe

    for tool in (attention, probe):
        assert tool.main([str(tmp_path)]) == 1
        assert "needs run.json and weights.safetensors" in capsys.readouterr().err


def test_a_short_supervised_gate_run_trains_logs_and_saves(tmp_path):
    import json

    from safetensors.torch import load_file

    from train.gates.pointing import train

    run = GateRun(mechanism="box+coords", token_grid=2, system="", shared_image_position=True, max_objects=2,
                  detection_share=0.5, max_steps=3, batch_size=4, eval_scenes=1, out=tmp_path / "runs",
                  name="sup", pool=tmp_path / "pool", pool_scenes=300, word_projector=True, loss_per_answer=True,
                  attend_weight=0.3, gather_weight=0.3, query_weight=0.3, name_weight=0.3)
    result = train(run)
    assert result["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "runs" / "sup" / "metrics.jsonl").read_text().splitlines()]
    for key in ("attend", "gather", "named", "name"):
        values = [r[key] for r in rows if r[key] is not None]
        assert values and all(v == v and v >= 0 for v in values), key
    weights = load_file(tmp_path / "runs" / "sup" / "weights.safetensors")
    assert any(k.startswith("model.llm.") for k in weights)
    assert not any("readout" in k and "canvas_pos" not in k for k in weights)   # the named-words read-out is not kept


def marked_scene() -> Scene:
    return Scene(id="m", width=400, height=400, background="plain",
                 objects=[WorldObject("circle", "red", "medium", (240, 50, 320, 130), mark=2),
                          WorldObject("triangle", "blue", "large", (40, 220, 160, 340), mark=5)])


def test_short_answers_look_at_what_they_are_read_from():
    from train.gates.pointing import GLOBAL_POOLED_SLOT, answer_looks

    run, model, proc, cells = gate()
    scene = marked_scene()
    slots_of = {}
    for task, question, answer, want in (
            ("colour_of", "What color is the triangle?", "blue", scene.objects[1]),
            ("shape_of", "What shape is the red object?", "circle", scene.objects[0]),
            ("som", "What is the object marked with the number 5? Answer with its color and shape.", "blue triangle",
             scene.objects[1]),
            ("count_colour", "How many blue objects are there in the image?", "1", None)):
        sample = make_sample(scene, question, answer, proc, cells, "")
        looks = answer_looks(task, question, scene, sample)
        assert len(looks) == 1, task
        queries, slots = looks[0]
        answer_at = [i for i, label in enumerate(sample.labels) if label != -100]
        # every answer word is written by the position before it; the end token is not looked for
        assert queries == [i - 1 for i in answer_at[:-1]] and len(queries) == len(answer.split())
        visual = visual_slots(sample.feats, sample.skipped)
        if want is None:
            assert slots == [GLOBAL_POOLED_SLOT]
            assert visual[GLOBAL_POOLED_SLOT] is not None and visual[GLOBAL_POOLED_SLOT][:1].item() == 0  # pooled: no object
        else:
            assert slots == object_slots(visual, want) and slots
        slots_of[task] = slots
    assert slots_of["colour_of"] == slots_of["som"] != slots_of["shape_of"]
    # a caption or region answer reads no one place
    caption = make_sample(scene, "Describe the image briefly.", "There are two objects.", proc, cells, "")
    assert answer_looks("caption", "Describe the image briefly.", scene, caption) == []


def test_the_look_loss_falls_as_the_head_looks_at_the_asked_object():
    from train.gates.attend import look_loss
    from train.gates.pointing import answer_looks

    run, model, proc, cells = gate()
    scene = marked_scene()
    question = "What is the object marked with the number 2? Answer with its color and shape."
    sample = make_sample(scene, question, "red circle", proc, cells, "")
    sample.looks = answer_looks("som", question, scene, sample)
    b = collate([sample], proc)
    probe = HeadAttention(model.model.llm.model.layers[3].self_attn, head=1)
    losses = fit_head(model, b, probe,
                      lambda p: look_loss(p, b["input_ids"], b["attention_mask"], b["looks"], IMAGE_TOKEN_ID))
    assert losses[-1] < 0.5 * losses[0]
    empty = collate([make_sample(scene, question, "red circle", proc, cells, "")], proc)
    assert look_loss(probe, empty["input_ids"], empty["attention_mask"], empty["looks"], IMAGE_TOKEN_ID) is None


def test_a_gate_run_asks_only_the_other_tasks_it_is_given_and_logs_the_look_loss(tmp_path):
    import json

    from train.gates.pointing import evaluate_run, main, train, training_sample, training_scenes

    run = GateRun(mechanism="box+coords", token_grid=2, system="", shared_image_position=True, max_objects=2,
                  other_share=1.0, other_tasks=("count_shape", "som"), max_steps=2, batch_size=4, eval_scenes=1,
                  eval_metrics=("counting", "som"), out=tmp_path / "runs", name="look", pool=tmp_path / "pool",
                  pool_scenes=300, look_weight=0.5, name_weight=0.0)
    rng = random.Random(0)
    model, proc, cells = build(run)
    questions = [proc.tokenizer.decode([i for i in training_sample(rng, training_scenes(run), run, proc, cells).input_ids
                                        if i >= 0]) for _ in range(12)]
    assert all(("How many" in q or "Count the" in q or "mark" in q) for q in questions)
    result = train(run)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "look" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["look"] is not None and r["look"] >= 0 for r in rows)
    # scored on the metrics asked for, and only those
    for table in result["final"].values():
        assert {"counting"} <= set(table) and "grounding" not in table and "detection" not in table
    record = evaluate_run(tmp_path / "runs" / "look", ("attribute",), eval_scenes=1, threads=1)
    assert (tmp_path / "runs" / "look" / "eval.json").exists()
    assert all("grounding" not in t for t in record["final"].values())
    assert main(["--evaluate", str(tmp_path / "nowhere")]) == 1


def test_a_short_answer_asks_for_the_questions_own_naming_word():
    from train.gates.pointing import asking_words

    run, model, proc, cells = gate()
    scene = marked_scene()
    for question, answer, word in (("How many blue objects are there in the image?", "1", " blue"),
                                   ("Count the circles in the image.", "1", " circles"),
                                   ("What is the object marked with the number 5? Answer with its color and shape.",
                                    "blue triangle", " 5")):
        sample = make_sample(scene, question, answer, proc, cells, "The red and blue shapes.")   # words in the prompt too
        asks = asking_words(sample, proc)
        assert len(asks) == 1
        queries, words = asks[0]
        answer_at = [i for i, label in enumerate(sample.labels) if label != -100]
        assert queries == [i - 1 for i in answer_at[:-1]]
        assert proc.tokenizer.decode([sample.input_ids[i] for i in words]) == word
        assert words[0] > sample.input_ids.index(IMAGE_TOKEN_ID)            # the question's word, after the image
