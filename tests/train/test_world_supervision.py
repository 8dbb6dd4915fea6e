"""Attention supervision in the one-stage trainer: each box an answer writes is traced back to its object's
visual tokens and to the words that name it, from the world record's own scene (issue 18, Gate C)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from synthetic import write_mixture, write_run

from train.config import ConfigError, load_run_config
from train.records import parse_record
from train.synthetic import write_world
from train.trainer import Trainer
from train.world.scene import render_scene
from train.world.tasks import TaskWriter
from train.world_supervision import WorldBoxTargets, scene_of

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world") / "w", 24, seed=0, progress=False)


@pytest.fixture(scope="module")
def demo_processor():
    from sphinx_model.config import SphinxConfig
    from sphinx_model.processor import SphinxProcessor
    from sphinx_model.tokenizer import load_tokenizer

    return SphinxProcessor(SphinxConfig.load(DEMO), load_tokenizer(str(DEMO)))


def encoded_records(world: Path, proc):
    for line in (world / "data.jsonl").read_text().splitlines():
        record, conv = json.loads(line), parse_record(line)
        image = Image.open(world / conv.image_refs[0]).convert("RGB")
        yield record, conv, proc.encode(conv, [proc.process_image(image)], add_generation_prompt=False)


def test_every_box_of_a_world_answer_is_traced_to_its_object_and_its_name(world, demo_processor):
    proc, targets = demo_processor, WorldBoxTargets(demo_processor)
    grounded = named = 0
    for record, conv, enc in encoded_records(world, proc):
        found = targets(conv, enc)
        boxes = targets.written_boxes(enc.labels)
        assert found is not None and len(found) == len(boxes)
        scene = render_scene(*scene_of(conv.image_refs[0])[1:])[0]
        writer = TaskWriter(scene)
        for target, (first, box) in zip(found, boxes):
            if not target.slots:      # a word's box: the object boxes all match one of the scene's objects
                continue
            grounded += 1
            obj = min(scene.objects, key=lambda o: float((torch.tensor(writer.canvas_box(o.box)) - box).abs().max()))
            name = proc.tokenizer.decode([enc.input_ids[i] for i in target.phrase]).strip()
            assert name and name in f"{obj.size} {obj.colour} {obj.shape}" and name.endswith(obj.shape)
            assert target.phrase[-1] < first                      # named before its box is written
            named += 1
        spotted = record["task"].count("spotting")
        if spotted and not scene.objects:
            assert all(not t.slots for t in found)
    assert grounded >= 10 and named == grounded


def test_records_that_are_not_world_scenes_get_no_targets(demo_processor):
    from sphinx_model.conversation import Conversation, Message

    targets = WorldBoxTargets(demo_processor)
    conv = Conversation([Message.user("What is this?", image="images/holiday.png"), Message.assistant("[0.10,0.20,0.30,0.40]")])
    enc = demo_processor.encode(conv, [demo_processor.process_image(Image.new("RGB", (64, 64)))],
                                add_generation_prompt=False)
    assert targets(conv, enc) is None
    assert scene_of("images/train-3-000012.png") == ("train", 3, 12) and scene_of("images/other-3-1.png") is None


def test_a_supervised_run_logs_its_attention_losses_and_a_tokenizer_without_coordinates_is_refused(world, tmp_path):
    mixture = write_mixture(tmp_path / "mixture.yaml", [("world", str(world / "data.jsonl"), 1.0)])
    path = write_run(tmp_path / "run", mixture, model={"init": str(DEMO)}, data={"mixture": str(mixture)},
                     train={"max_steps": 3, "batch_size": 4, "loss_per": "answer"},
                     supervision={"attend": [2, 2, 0.3], "gather": [1, 1, 0.3], "name": [3, 1, 0.3]})
    result = Trainer(load_run_config(path)).run()
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    attend = [r["train/supervision/attend"] for r in logged if "train/supervision/attend" in r]
    assert attend and all(v > 0 for v in attend)
    bad = write_run(tmp_path / "bytes", mixture, data={"mixture": str(mixture)}, supervision={"attend": [0, 0, 0.3]})
    with pytest.raises(ConfigError, match="coordinate"):
        Trainer(load_run_config(bad)).run()
    with pytest.raises(ConfigError, match="supervision"):
        load_run_config(write_run(tmp_path / "neg", mixture, supervision={"attend": [2, -1, 0.3]}))
