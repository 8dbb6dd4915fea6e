"""The demo world as lmms-eval tasks, scored exactly as `python -m train.evaluate` scores it.

    python -m train.synthetic --out data/heldout --n 200 --seed 7 --renderer heldout
    python -m train.benchmarks.world_tasks --data data/heldout --out data/heldout_tasks
    lmms-eval --model sphinx_x --model_args pretrained=assets/demo --tasks sphinx_world \\
              --include_path data/heldout_tasks --batch_size 16

The questions are `train.evaluate.make_questions` of the world folder, one task per metric
(`sphinx_world_grounding`, ..._detection, _counting, _attribute, _ocr, _spotting, _som; the group
`sphinx_world` holds them); each answer is scored by `train.evaluate.score` and each task's
number is `train.evaluate.summarise`'s. The YAMLs are `train/benchmarks/tasks/world/`, copied next
to the documents they read.

Boxes: the grounding, detection and spotting tasks read boxes as fractions of the original
image (any model can answer them; `sphinx_x` maps its canvas boxes there, see `postprocess`).
Here they are put back on the scene's top-left canvas and scored by `score(..., "top-left")`,
which maps them to the same pixels `train.evaluate` reaches through the model's own anchor.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sphinx_model.boxes import parse_regions, pixels_to_canvas
from sphinx_model.tiling import canvas_geometry

from ..evaluate import METRICS, Question, make_questions, score, summarise
from ..world.scene import Scene
from .postprocess import format_labelled

TEMPLATES = Path(__file__).parent / "tasks" / "world"
BOX_METRICS = ("grounding", "detection", "spotting")
GROUP = "sphinx_world"


def task_name(metric: str) -> str:
    return f"{GROUP}_{metric}"


# --- documents ---------------------------------------------------------------------------------
def question_doc(q: Question) -> dict[str, Any]:
    """One question as an lmms-eval document (scene and truth as JSON text: Arrow wants flat columns)."""
    return {"id": q.id, "metric": q.metric, "image": str(q.image.resolve()), "prompt": q.prompt,
            "scene": json.dumps(q.scene.to_dict()), "truth": json.dumps(q.truth)}


def doc_question(doc: Mapping[str, Any]) -> Question:
    """The evaluator's Question back from a document."""
    return Question(doc["id"], doc["metric"], Scene.from_dict(json.loads(doc["scene"])), Path(doc["image"]),
                    doc["prompt"], json.loads(doc["truth"]))


def write_tasks(data: Path, out: Path, limit: int | None = None) -> dict[str, int]:
    """Documents and task YAMLs of the world folder `data` into `out`; questions per task."""
    if not (data / "scenes.jsonl").is_file():
        raise ValueError(f"{data} is not a world folder (no scenes.jsonl); write one with python -m train.synthetic")
    questions = make_questions(data, limit)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for metric in METRICS:
        docs = [question_doc(q) for q in questions if q.metric == metric]
        if not docs:
            continue
        with open(out / f"{metric}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        shutil.copyfile(TEMPLATES / f"{task_name(metric)}.yaml", out / f"{task_name(metric)}.yaml")
        counts[task_name(metric)] = len(docs)
    shutil.copyfile(TEMPLATES / "_default_world_yaml", out / "_default_world_yaml")
    group = f"group: {GROUP}\ntask:\n" + "".join(f"  - {t}\n" for t in counts) + "metadata:\n  version: 1.0\n"
    (out / f"{GROUP}.yaml").write_text(group, encoding="utf-8")
    return counts


# --- the tasks' functions (named in the YAMLs) -------------------------------------------------
def doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The evaluator's prompt, unchanged: the world's first wording of each task is SPHINX's."""
    return doc["prompt"]


def canvas_answer(answer: str, scene: Scene) -> str:
    """An answer whose boxes are fractions of the image, with its boxes on the scene's top-left canvas."""
    regions = parse_regions(answer)
    if not regions:
        return answer
    canvas = canvas_geometry(scene.width, scene.height, "top-left")
    size = (scene.width, scene.height)
    return format_labelled([(r.label, pixels_to_canvas([v * size[i % 2] for i, v in enumerate(r.coords)], canvas))
                            for r in regions])


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`train.evaluate.score` of the answer, under the task's metric name."""
    q = doc_question(doc)
    answer = results[0] if results else ""
    if q.metric in BOX_METRICS:
        answer = canvas_answer(answer, q.scene)
    return {q.metric: {"metric": q.metric, "scored": score(q, answer, "top-left")}}  # not "score": lmms-eval reads that key as a number


def aggregate(items: Sequence[Mapping[str, Any]]) -> float:
    """`train.evaluate.summarise`'s value for the task's metric (it reads only each question's metric)."""
    table = summarise([(SimpleNamespace(metric=i["metric"]), i["scored"]) for i in items])
    return next(iter(table.values()))["value"] if table else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.benchmarks.world_tasks",
                                 description="Write a world folder's evaluation questions as lmms-eval tasks.")
    ap.add_argument("--data", type=Path, required=True, help="world folder from `python -m train.synthetic`")
    ap.add_argument("--out", type=Path, required=True, help="folder for the tasks (give it to --include_path)")
    ap.add_argument("--limit", type=int, help="first N scenes")
    args = ap.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError("--limit must be >= 1")
        if args.out.resolve() == args.data.resolve():
            raise ValueError("--out must not be the world folder itself")
        counts = write_tasks(args.data, args.out, args.limit)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, n in counts.items():
        print(f"{task}: {n} questions")
    print(f"lmms-eval --model sphinx_x --model_args pretrained=PATH --tasks {GROUP} --include_path {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
