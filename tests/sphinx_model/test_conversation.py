import json
import subprocess
import sys

import pytest

from sphinx_model.conversation import Conversation, Message, SchemaError, read_jsonl, write_jsonl


def test_round_trip_and_llava(tmp_path):
    conv = Conversation([Message.user("What is this?", image="a.jpg"), Message.assistant("A cat."),
                         Message.user("Colour?"), Message.assistant("Black.")], id="x1", task="vqa")
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [conv])
    (back,) = list(read_jsonl(path))
    assert back == conv and back.image_refs == ["a.jpg"]
    llava = {"id": "7", "image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A dog."}]}
    c = Conversation.from_dict(llava)
    assert c.messages[0].text == "Describe." and c.image_refs == ["b.png"]
    assert Conversation.from_llava(c.to_llava()).messages == c.messages


def test_validation_rules():
    with pytest.raises(SchemaError, match="alternate"):
        Conversation([Message.assistant("hi")]).validate()
    several = Conversation([Message.user("a", image="1"), Message.assistant("b"), Message.user("c", image="2")])
    several.validate()   # how many images a model takes is its processor's check (max_images)
    assert several.image_refs == ["1", "2"]
    with pytest.raises(SchemaError, match="end with"):
        Conversation([Message.user("a")]).validate(for_training=True)
    with pytest.raises(SchemaError):
        Message.from_dict({"role": "robot", "content": "x"})


def test_bad_jsonl_line_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": []}) + "\n{not json\n")
    with pytest.raises(SchemaError, match=":2:"):
        list(read_jsonl(p))


def test_schema_module_imports_no_torch():
    code = "import sphinx_model.conversation, sphinx_model.boxes, sphinx_model.tiling, sphinx_model.config, sys; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
