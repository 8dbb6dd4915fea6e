"""Visual question answering -> one multi-turn dialogue per image (split at --max-turns).

The form is detected from the JSON structure, never from the file name:
  * VQAv2 / OK-VQA: an object with a `questions` list (`image_id`, `question`, `question_id`)
    plus, via `--annotations`, an object with an `annotations` list (`question_id`,
    `answers: [{"answer"}]`, `multiple_choice_answer`); the two may be given either way round.
    The answer is the most common of the ten (ties: `multiple_choice_answer`). Images are
    named by `--image-pattern`, default `COCO_{data_subtype}_{image_id:012d}.jpg`.
  * GQA: an object mapping question id -> `{"imageId", "question", "answer"}`; images
    `{image_id}.jpg` by default.
  * Generic (TextVQA / DocVQA / ChartQA exports): a list (or JSONL) of `{"image", "question",
    "answer"}`; `answer` may be a list, or `answers` a list: the most common one is used.
Every question gets `--suffix` appended (short-answer datasets; `--suffix ''` turns it off).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_model.conversation import Conversation

from .base import (CommonOptions, ConvertError, Stats, dialogues, is_jsonl, iter_records, load_json,
                   record_key, register)

SHORT_ANSWER = "Answer the question using a single word or phrase."

QA = tuple[str, str, str]  # image ref, question, answer


@dataclass(frozen=True)
class VqaOptions:
    annotations: Path | None = field(default=None, metadata={
        "help": "VQAv2/OK-VQA: the annotations JSON (answers) that goes with the questions JSON"})
    image_pattern: str | None = field(default=None, metadata={
        "help": "image path from the id, a format string with {image_id} "
                "(default: VQAv2 'COCO_{data_subtype}_{image_id:012d}.jpg', GQA '{image_id}.jpg')"})
    suffix: str = field(default=SHORT_ANSWER, metadata={"help": "appended to every question"})


@register("vqa", task="vqa", options=VqaOptions)
def convert_vqa(source: Path, common: CommonOptions, options: VqaOptions, stats: Stats) -> Iterator[Conversation]:
    """VQAv2/OK-VQA, GQA or generic image/question/answer lists -> per-image QA dialogues."""
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ref, question, answer in _records(source, options, stats):
        if not question.strip():
            stats.skip("empty question")
        elif not answer.strip():
            stats.skip("empty answer")
        else:
            q = " ".join(question.split())
            by_image[common.image_ref(ref)].append((f"{q}\n{options.suffix}" if options.suffix else q,
                                                    answer.strip()))
    for ref, pairs in by_image.items():
        if common.image_missing(ref):
            stats.skip("missing image", len(pairs))
            continue
        yield from dialogues(pairs, ref, common, id=f"vqa-{ref}")


def _records(source: Path, options: VqaOptions, stats: Stats) -> Iterator[QA]:
    """Dispatch on structure: VQAv2 pair, GQA mapping, or generic list."""
    if is_jsonl(source):
        yield from _generic(iter_records(source, stats), stats)
        return
    data = load_json(source)
    if isinstance(data, dict) and ("questions" in data or "annotations" in data):
        yield from _vqav2(data, source, options, stats)
    elif isinstance(data, dict) and _looks_like_gqa(data):
        yield from _gqa(data, options.image_pattern or "{image_id}.jpg", stats)
    elif isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("data"), list)):
        yield from _generic(data if isinstance(data, list) else data["data"], stats)
    else:
        raise ConvertError(f"{source}: not a recognised VQA structure (VQAv2 questions/annotations, "
                           "GQA question mapping, or a list of image/question/answer records)")


def _looks_like_gqa(data: dict[str, Any]) -> bool:
    first = next(iter(data.values()), None)
    return isinstance(first, dict) and "imageId" in first and "question" in first


def _vqav2(data: dict[str, Any], source: Path, options: VqaOptions, stats: Stats) -> Iterator[QA]:
    if options.annotations is None:
        raise ConvertError(f"{source}: a VQAv2-style file needs its partner via --annotations")
    other = load_json(options.annotations)
    questions, annotations = (data, other) if "questions" in data else (other, data)
    if not (isinstance(questions, dict) and isinstance(questions.get("questions"), list)
            and isinstance(annotations, dict) and isinstance(annotations.get("annotations"), list)):
        raise ConvertError("VQAv2 needs one questions JSON ('questions' list) and one annotations JSON "
                           "('annotations' list)")
    subtype = questions.get("data_subtype", "train2014")
    if not isinstance(subtype, str) or "/" in subtype or "\x00" in subtype:
        raise ConvertError("VQAv2 questions JSON: 'data_subtype' must be a plain name like train2014")
    pattern = options.image_pattern or f"COCO_{subtype}_{{image_id:012d}}.jpg"
    answers = {record_key(a.get("question_id")): a for a in annotations["annotations"] if isinstance(a, dict)}
    answers.pop(None, None)
    for q in questions["questions"]:
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or record_key(q.get("image_id")) is None:
            stats.skip("malformed record")
            continue
        ann = answers.get(record_key(q.get("question_id")))
        if ann is None:
            stats.skip("question without annotation")
            continue
        raw = ann.get("answers")
        texts = [a.get("answer") for a in (raw if isinstance(raw, list) else []) if isinstance(a, dict)]
        answer = most_common(texts, prefer=ann.get("multiple_choice_answer"))
        ref = _image_path(pattern, q["image_id"], stats)
        if ref is not None:
            yield ref, q["question"], answer


def _gqa(data: dict[str, Any], pattern: str, stats: Stats) -> Iterator[QA]:
    for rec in data.values():
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or record_key(rec.get("imageId")) is None:
            stats.skip("malformed record")
            continue
        ref = _image_path(pattern, rec["imageId"], stats)
        if ref is not None:
            yield ref, rec["question"], rec.get("answer") if isinstance(rec.get("answer"), str) else ""


def _generic(records: Any, stats: Stats) -> Iterator[QA]:
    for rec in records:
        if not (isinstance(rec, dict) and isinstance(rec.get("image"), str)
                and isinstance(rec.get("question"), str)):
            stats.skip("malformed record")
            continue
        answer = rec.get("answer", rec.get("answers"))
        answer = most_common(answer) if isinstance(answer, list) else answer
        yield rec["image"], rec["question"], answer if isinstance(answer, str) else ""


def most_common(answers: list[Any], prefer: Any = None) -> str:
    """The most frequent non-empty answer; among ties `prefer` if tied, else the first seen."""
    counts = Counter(" ".join(a.split()) for a in answers if isinstance(a, str) and a.strip())
    if not counts:
        return prefer if isinstance(prefer, str) else ""
    top = max(counts.values())
    if isinstance(prefer, str) and counts.get(" ".join(prefer.split())) == top:
        return " ".join(prefer.split())
    return next(a for a, n in counts.items() if n == top)


def _image_path(pattern: str, image_id: Any, stats: Stats) -> str | None:
    try:
        return pattern.format(image_id=image_id)
    except (ValueError, KeyError, IndexError, TypeError):
        stats.skip("image id does not fit --image-pattern")
        return None
