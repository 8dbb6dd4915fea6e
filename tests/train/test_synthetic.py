"""The synthetic world: deterministic scenes, truth boxes that are exactly the drawn pixels,
dialogues in the training schema whose boxes parse."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from sphinx_model.boxes import canvas_to_pixels, parse_regions
from sphinx_model.conversation import Conversation
from sphinx_model.tiling import canvas_geometry
from train.synthetic import main as synthetic_main
from train.world.scene import render_scene
from train.world.tasks import TaskWriter, describe
from train.world.vocab import COLOURS, NUMBER_WORDS, SHAPES, SIZES, WORDS


def test_vocabulary_has_no_attribute_or_number_words():
    taken = set(SHAPES) | set(COLOURS) | set(SIZES) | set(NUMBER_WORDS)
    assert len(set(WORDS)) == len(WORDS) >= 200
    assert not taken & set(WORDS)


@pytest.mark.parametrize("renderer", ["train", "heldout"])
def test_scene_is_deterministic_per_seed_and_index(renderer):
    a_scene, a_image = render_scene(7, 3, renderer)
    b_scene, b_image = render_scene(7, 3, renderer)
    assert a_scene == b_scene
    assert np.array_equal(np.asarray(a_image), np.asarray(b_image))
    other_scene, _ = render_scene(8, 3, renderer)
    assert other_scene.to_dict() != a_scene.to_dict()


def _plain_scenes(n_wanted: int):
    found = []
    for i in range(400):
        scene, image = render_scene(11, i)
        if scene.background == "plain" and scene.mark_style is None and (scene.objects or scene.words):
            found.append((scene, np.asarray(image).astype(int)))
        if len(found) == n_wanted:
            return found
    raise AssertionError("too few plain scenes")


def test_truth_boxes_are_exactly_the_drawn_pixels():
    for scene, px in _plain_scenes(12):
        colours, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[counts.argmax()]
        ink = (px != background).any(-1)                       # (H, W) drawn pixels
        items = [o.box for o in scene.objects] + [w.box for w in scene.words]
        for x0, y0, x1, y1 in items:
            inside = ink[y0:y1, x0:x1]
            # every edge of the box touches drawn pixels ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # ... and the one-pixel ring around it holds none (items keep a gap between them)
            ring = [ink[y0 - 1, x0:x1] if y0 > 0 else None, ink[y1, x0:x1] if y1 < scene.height else None,
                    ink[y0:y1, x0 - 1] if x0 > 0 else None, ink[y0:y1, x1] if x1 < scene.width else None]
            assert not any(r is not None and r.any() for r in ring)


def test_world_mix_has_repeats_lookalikes_marks_words_and_aspect_ratios():
    scenes = [render_scene(3, i)[0] for i in range(300)]
    ratios = [s.width / s.height for s in scenes]
    assert min(ratios) <= 0.3 and max(ratios) >= 3.3
    assert all(256 <= max(s.width, s.height) <= 1024 for s in scenes)
    assert sum(any(n > 1 for n in Counter(o.shape for o in s.objects).values()) for s in scenes) > 100
    assert sum(s.mark_style is not None for s in scenes) > 50
    assert sum(bool(s.words) for s in scenes) > 150
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)


def test_phrases_name_exactly_one_object_and_boxes_round_trip():
    for i in range(60):
        scene, _ = render_scene(5, i)
        writer = TaskWriter(scene)
        canvas = canvas_geometry(scene.width, scene.height, "top-left")
        for obj in scene.objects:
            phrase = describe(obj, scene)
            if phrase:
                words = phrase.split()[1:]
                assert sum(all(w in (o.shape, o.colour, o.size) for w in words) for o in scene.objects) == 1
            (region,) = parse_regions(writer.box(obj.box))
            back = canvas_to_pixels(region.coords, canvas)
            side = max(scene.width, scene.height)
            assert max(abs(a - b) for a, b in zip(back, obj.box)) <= 0.005 * side + 1e-6


def test_cli_writes_images_scenes_and_schema_valid_dialogues(tmp_path):
    assert synthetic_main(["--out", str(tmp_path / "w"), "--n", "30", "--seed", "2"]) == 0
    root = tmp_path / "w"
    scenes = [json.loads(line) for line in open(root / "scenes.jsonl")]
    assert len(scenes) == 30 and all((root / s["image"]).is_file() for s in scenes)
    rows = [json.loads(line) for line in open(root / "data.jsonl")]
    assert len(rows) >= 30
    for row in rows:
        conv = Conversation.from_dict(row)
        conv.validate(for_training=True)
    answers = " ".join(m["content"][0]["text"] for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert parse_regions(answers)


def test_cli_refuses_absurd_counts(tmp_path, capsys):
    assert synthetic_main(["--out", str(tmp_path), "--n", "0"]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_counting_questions_and_captions_spell_every_shapes_plural():
    import random

    from train.world.scene import Scene, WorldObject

    scene = Scene(id="p", width=300, height=300, background="plain",
                  objects=[WorldObject("cross", "red", "small", (10, 10, 40, 40)),
                           WorldObject("cross", "red", "small", (100, 100, 130, 130)),
                           WorldObject("circle", "blue", "large", (160, 160, 260, 260))])
    writer = TaskWriter(scene)
    asked = {writer.count_shape(random.Random(seed))[0] for seed in range(40)}
    assert any("crosses" in q for q in asked) and not any("crosss" in q for q in asked)
    assert "two small red crosses" in writer.caption(random.Random(0))[1]
