"""SPHINX's wording per family, and where a task's profile comes from (its YAML, else the hub table)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from train.benchmarks.prompts import HUB_TASKS, ProfileError, TaskProfile, resolve_profile, split_kwargs


def test_referring_and_short_answer_wording_are_the_authors():
    rec = TaskProfile("referring", "answer", "image_fraction")
    assert rec.prompt({"answer": "the man in red."}, "task prompt") == \
        "Please provide the bounding box coordinate of the region this sentence describes: the man in red."
    assert rec.prompt({"answer": ["", "black dog", "dog"]}, "x").endswith("describes: black dog.")
    short = TaskProfile("short_answer", "question")
    assert short.prompt({"question": " What is written? "}, "x") == \
        "What is written?\nAnswer the question using a single word or phrase."
    assert short.prompt({"question": "   "}, "x") == ""          # empty stays empty: reported, not asked
    assert TaskProfile("multiple_choice").prompt({"question": "q"}, "the task's prompt") == "the task's prompt"


def test_yaml_declaration_wins_and_prompts_task_keeps_wording_but_not_boxes():
    declared, rest = split_kwargs({"sphinx_family": "referring", "sphinx_field": "phrase",
                                   "sphinx_boxes": "pixels", "max_new_tokens": 9})
    assert rest == {"max_new_tokens": 9}
    assert resolve_profile("refcoco_bbox_rec_val", declared) == TaskProfile("referring", "phrase", "pixels")
    assert resolve_profile("refcoco_bbox_rec_val", {}).boxes == "image_fraction"
    assert resolve_profile("refcoco_bbox_rec_val", {}, use_sphinx_prompts=False) == \
        TaskProfile("referring", None, "image_fraction")
    assert resolve_profile("some_task_we_do_not_know", {}) == TaskProfile()


@pytest.mark.parametrize("declared", [{"family": "poetry"}, {"boxes": "inches"}, {"colour": "red"},
                                      {"family": "multiple_choice", "field": "question"}])
def test_bad_declarations_are_one_clear_error(declared):
    with pytest.raises(ProfileError, match="sphinx_"):
        resolve_profile("t", declared)


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_every_hub_task_name_exists_in_lmms_eval():
    """The table names real lmms-eval 0.7.3 tasks, not groups (requests carry task names; read from its YAMLs)."""
    root = Path(importlib.util.find_spec("lmms_eval").origin).parent / "tasks"
    names = set()
    for y in root.rglob("*.yaml"):
        names |= set(re.findall(r"^task:\s*['\"]?([\w+\-.]+)", y.read_text(encoding="utf-8", errors="replace"), re.M))
    assert sorted(set(HUB_TASKS) - names) == []
