"""Training records with several images render exactly as the processor renders them."""
from __future__ import annotations

import json

from PIL import Image

from sphinx_model.conversation import Conversation
from train.data import ConversationDataset
from train.records import OK, REASONS, open_records
from train.mixture import DatasetSpec


def test_two_image_record_and_too_many_images(tmp_path, processor):
    for i, size in enumerate([(64, 64), (128, 64)]):
        Image.new("RGB", size, (40 * i, 120, 200)).save(tmp_path / f"{i}.png")
    two = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "image": "1.png"}]},
        {"role": "assistant", "content": "A wide one."}]}
    many = {"messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"}] * 5},
                         {"role": "assistant", "content": "Five."}]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (two, many)))
    store = open_records([DatasetSpec("d", path, tmp_path)], processor, True, None)
    assert store.status[0] == OK and store.status[1] == 1 + REASONS.index("schema")
    enc = ConversationDataset(store, processor).encode(0)
    conv = Conversation.from_dict(two)
    expected = processor.encode(conv, [tmp_path / "0.png", tmp_path / "1.png"], add_generation_prompt=False)
    assert enc.input_ids == expected.input_ids and len(enc.images) == 2
    assert store.lengths[0] == len(enc.input_ids)   # the index counts both images' tokens
