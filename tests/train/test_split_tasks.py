"""Splitting a world data file by task, so a mixture can weigh the tasks far from target."""
from __future__ import annotations

import json

from train.split_tasks import main, split_tasks


def write(path, lines):
    path.write_bytes(b"".join(lines))
    return path


def test_records_naming_a_task_go_to_the_part_and_every_other_line_to_the_rest(tmp_path):
    lines = [json.dumps({"id": "a", "task": "grounding+count_shape"}).encode() + b"\n",
             json.dumps({"id": "b", "task": "caption"}).encode() + b"\n",
             b"not json at all\n",
             json.dumps(["a", "list"]).encode() + b"\n",
             json.dumps({"id": "d", "task": "groundings"}).encode() + b"\n",   # a task's name, not a prefix
             json.dumps({"id": "c", "task": "detection"}).encode()]           # no newline at the end
    source = write(tmp_path / "data.jsonl", lines)
    kept, other = split_tasks(source, {"grounding", "detection"}, tmp_path / "point.jsonl", tmp_path / "rest.jsonl")
    assert (kept, other) == (2, 4)
    point = [json.loads(x)["id"] for x in (tmp_path / "point.jsonl").read_text().splitlines()]
    assert point == ["a", "c"]
    rest = (tmp_path / "rest.jsonl").read_bytes().splitlines()
    assert rest == [lines[1].strip(), lines[2].strip(), lines[3].strip(), lines[4].strip()]


def test_the_cli_refuses_to_overwrite_its_source_with_a_clear_error(tmp_path, capsys):
    source = write(tmp_path / "data.jsonl", [json.dumps({"task": "ocr"}).encode() + b"\n"])
    assert main([str(source), "--tasks", "ocr", "--out", str(source)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert source.read_bytes() == json.dumps({"task": "ocr"}).encode() + b"\n"
    assert main([str(source), "--tasks", " , ", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert main([str(source), "--tasks", "ocr", "--out", str(tmp_path / "ocr.jsonl")]) == 0
    assert "1 records" in capsys.readouterr().out
