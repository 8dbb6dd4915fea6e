"""What SPHINX-X is asked, per benchmark family, and where a task's metric wants its boxes.

The wording is the SPHINX authors' own (LLaMA2-Accessory `accessory/eval_mm`, the evaluator
their models were scored with): short-answer VQA appends "Answer the question using a single
word or phrase.", referring expressions ask "Please provide the bounding box coordinate of the
region this sentence describes: {}.". Multiple choice keeps the task's layout (hint, question,
lettered options, "Answer with the option's letter from the given choices directly.", which is
the instruction in the LLaVA-1.5 data SPHINX was trained on).

A task gets a `TaskProfile` from one of two places, and only these two:
  * its YAML, through lmms-eval's own per-model hook
    (`model_specific_generation_kwargs: {sphinx_x: {sphinx_family: ..., sphinx_field: ...,
    sphinx_boxes: ...}}`), which is how our local tasks (tests, the demo world) declare theirs;
  * `HUB_TASKS` below: lmms-eval's hub benchmarks by their exact task names.
Everything else is "open": the task's own prompt, its own answer, untouched.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["short_answer", "multiple_choice", "referring", "open"]
BoxSpace = Literal["image_fraction", "pixels"]
FAMILIES: tuple[str, ...] = ("short_answer", "multiple_choice", "referring", "open")
BOX_SPACES: tuple[str, ...] = ("image_fraction", "pixels")

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."
REFERRING = "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."
MULTIPLE_CHOICE = "\nAnswer with the option's letter from the given choices directly."

KWARG_PREFIX = "sphinx_"  # generation kwargs of this prefix are ours; they never reach `generate`


class ProfileError(ValueError):
    """A task declares a SPHINX profile that cannot be honoured."""


@dataclass(frozen=True)
class TaskProfile:
    """How SPHINX-X answers one task.

    family  which SPHINX wording applies
    field   the document field the wording is built from (the question, the referring
            phrase); None keeps the task's own prompt, e.g. when it already is SPHINX's wording
    boxes   where the task's metric wants boxes: fractions of the original image or its
            pixels; None passes the model's text through (boxes stay on the padded canvas)
    """

    family: Family = "open"
    field: str | None = None
    boxes: BoxSpace | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ProfileError(f"sphinx_family must be one of {FAMILIES}, got {self.family!r}")
        if self.boxes is not None and self.boxes not in BOX_SPACES:
            raise ProfileError(f"sphinx_boxes must be one of {BOX_SPACES}, got {self.boxes!r}")
        if self.field is not None and self.family not in ("short_answer", "referring"):
            raise ProfileError(f"sphinx_field builds a prompt only for short_answer or referring, not {self.family!r}")

    def prompt(self, doc: Mapping[str, Any], task_prompt: str) -> str:
        """The text SPHINX-X is asked: SPHINX's wording around `doc[field]`, else the task's prompt."""
        if self.field is None:
            return task_prompt
        if self.field not in doc:
            raise KeyError(f"the document has no field {self.field!r} (sphinx_field)")
        value = doc[self.field]
        if isinstance(value, (list, tuple)):  # several phrases for one object (RefCOCO): the first is asked
            value = next((v for v in value if str(v).strip()), "")
        text = str(value)
        if not text.strip():
            return ""  # an empty question stays empty, and is reported as such
        if self.family == "referring":
            return REFERRING.format(phrase=text.strip().rstrip("."))
        return SHORT_ANSWER.format(question=text.strip())


def _rec(*names: str, boxes: BoxSpace = "image_fraction") -> dict[str, TaskProfile]:
    return {n: TaskProfile("referring", "answer", boxes) for n in names}


def _short(*names: str, field: str | None = None) -> dict[str, TaskProfile]:
    return {n: TaskProfile("short_answer", field) for n in names}


# lmms-eval 0.7.3's hub tasks, by exact name. RefCOCO's prompts ask for box formats of their
# own; `refcoco*_bbox_rec_*` metrics read fractions of the original image (`utils_rec` divides
# the truth by width and height), `refcoco*_grounding_*` read its pixels. SPHINX's question
# goes in and its canvas boxes are mapped to what each metric reads.
# Short-answer tasks are asked SPHINX's line around their `question` field (most defaults
# already say the same; ChartQA's asks for "a single word", TextVQA's capitalises), so an empty
# question is caught rather than sent as a bare instruction. Multiple choice keeps the task's
# prompt, which already is the layout and instruction above.
HUB_TASKS: dict[str, TaskProfile] = {
    **_rec("refcoco_bbox_rec_val", "refcoco_bbox_rec_test", "refcoco_bbox_rec_testA", "refcoco_bbox_rec_testB",
           "refcoco+_bbox_rec_val", "refcoco+_bbox_rec_testA", "refcoco+_bbox_rec_testB",
           "refcocog_bbox_rec_val", "refcocog_bbox_rec_test"),
    **_rec("refcoco_grounding_test", "refcoco_grounding_testA", "refcoco_grounding_testB",
           "refcoco_plus_grounding_testA", "refcoco_plus_grounding_testB", "refcocog_grounding_test", boxes="pixels"),
    **_short("pope", "pope_adv", "pope_pop", "pope_random", "textvqa_val", "textvqa_test",
             "docvqa_val", "docvqa_test", "chartqa", "gqa", field="question"),
    **{n: TaskProfile("multiple_choice") for n in ("mmbench_en_dev", "mmbench_en_test", "seedbench", "seedbench_ppl")},
}


def split_kwargs(gen_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our `sphinx_*` keys without the prefix, the rest) of a request's generation kwargs."""
    ours = {k[len(KWARG_PREFIX):]: v for k, v in gen_kwargs.items() if k.startswith(KWARG_PREFIX)}
    rest = {k: v for k, v in gen_kwargs.items() if not k.startswith(KWARG_PREFIX)}
    return ours, rest


def resolve_profile(task: str, declared: Mapping[str, Any], use_sphinx_prompts: bool = True) -> TaskProfile:
    """The profile of `task`: what its YAML declares, else `HUB_TASKS`, else open.

    `use_sphinx_prompts=False` keeps every task's own prompt (the box mapping stays: it is
    about where the metric reads boxes, not about wording).
    """
    unknown = set(declared) - {"family", "field", "boxes"}
    if unknown:
        raise ProfileError(f"unknown SPHINX task keys {sorted(KWARG_PREFIX + k for k in unknown)}; "
                           f"known: sphinx_family, sphinx_field, sphinx_boxes")
    if declared:
        profile = TaskProfile(declared.get("family", "open"), declared.get("field"), declared.get("boxes"))
    else:
        profile = HUB_TASKS.get(task, TaskProfile())
    if not use_sphinx_prompts and profile.field is not None:
        profile = TaskProfile(profile.family, None, profile.boxes)
    return profile
