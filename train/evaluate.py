"""`python -m train.evaluate --model PATH --data DIR`: score a model on held-out world scenes.

Metrics (greedy decoding, boxes parsed with `sphinx_model.boxes` and mapped to original
pixels through the processor's geometry):
  grounding      acc@IoU>=0.5 of the first box answered for a unique phrase
  detection      F1@0.5 over (name, box) pairs of "Detect all objects"
  counting       exact count, by shape and by colour
  attribute      colour of a unique shape / shape of a unique colour
  ocr            word accuracy: share of the scene's words read (exact word, case-insensitive)
  spotting       F1@0.5 over (word, box) pairs, the same word required
  som            the marked object's colour and shape both named

Questions are made from the scenes' truth (`scenes.jsonl`), never from a model; `--answers`
scores a JSONL of {"id", "answer"} instead of generating (how the metrics themselves are tested).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sphinx_model.boxes import canvas_to_pixels, parse_regions
from sphinx_model.tiling import Anchor, canvas_geometry

from .world.scene import Scene
from .world.tasks import PROMPTS, TaskWriter, describe
from .world.vocab import COLOUR_NAMES, NUMBER_WORDS, PLURALS, SHAPES, object_name

METRICS = ("grounding", "detection", "counting", "attribute", "ocr", "spotting", "som")
# The held-out worlds, by (name, seed, renderer): other seeds of the training renderer, and the held-out
# renderer. `python -m train.synthetic --seed` writes them as folders; gates and expert runs render them on the fly.
HELDOUT_WORLDS = (("world_eval", 1001, "train"), ("world_eval_heldout", 1002, "heldout"))
TARGETS = {"grounding": 0.8, "detection": 0.7, "counting": 0.8, "attribute": 0.9, "ocr": 0.8, "spotting": 0.6,
           "som": 0.8}


@dataclass
class Question:
    id: str
    metric: str
    scene: Scene
    image: Path | None  # None where no picture is needed (oracle features)
    prompt: str
    truth: dict  # what scoring needs: boxes, names, count, attribute, words

    def record(self) -> dict:
        return {"id": self.id, "metric": self.metric, "scene": self.scene.id, "prompt": self.prompt, "truth": self.truth}


def make_questions(data: Path, limit: int | None = None, seed: int = 0) -> list[Question]:
    """The evaluation questions of a world folder: one or two per metric and scene, where they apply."""
    rows = [json.loads(line) for line in open(data / "scenes.jsonl", encoding="utf-8")][:limit]
    out: list[Question] = []
    for row in rows:
        scene = Scene.from_dict({k: v for k, v in row.items() if k != "image"})
        out += scene_questions(scene, data / row["image"], seed, first_index=len(out))
    return out


def scene_questions(scene: Scene, image: Path | None, seed: int = 0, first_index: int = 0) -> list[Question]:
    """The questions of one scene (ids numbered from `first_index`), drawn from (seed, scene id) alone."""
    rng = random.Random(f"eval-{seed}-{scene.id}")
    out: list[Question] = []

    def add(metric: str, prompt: str, truth: dict) -> None:
        out.append(Question(f"{scene.id}/{metric}/{first_index + len(out)}", metric, scene, image, prompt, truth))

    objs = scene.objects
    named = [(o, describe(o, scene)) for o in objs]
    named = [(o, p) for o, p in named if p]
    if named:
        o, phrase = rng.choice(named)
        add("grounding", PROMPTS["grounding"][0].format(phrase=phrase), {"box": list(o.box), "phrase": phrase})
    if objs:
        add("detection", PROMPTS["detection"][0],
            {"objects": [[object_name(o.size, o.colour, o.shape), list(o.box)] for o in objs]})
        shape = rng.choice([o.shape for o in objs])
        add("counting", PROMPTS["count_shape"][0].format(plural=PLURALS[shape]),
            {"count": sum(o.shape == shape for o in objs)})
        colour = rng.choice([o.colour for o in objs])
        add("counting", PROMPTS["count_colour"][0].format(colour=colour),
            {"count": sum(o.colour == colour for o in objs)})
    shape_counts, colour_counts = Counter(o.shape for o in objs), Counter(o.colour for o in objs)
    singles = [o for o in objs if shape_counts[o.shape] == 1]
    if singles:
        o = rng.choice(singles)
        add("attribute", PROMPTS["colour_of"][0].format(shape=o.shape), {"answer": o.colour})
    singles = [o for o in objs if colour_counts[o.colour] == 1]
    if singles:
        o = rng.choice(singles)
        add("attribute", PROMPTS["shape_of"][0].format(colour=o.colour), {"answer": o.shape})
    if scene.words:
        add("ocr", PROMPTS["ocr"][0], {"words": [w.text for w in scene.words]})
        add("spotting", PROMPTS["spotting"][0], {"words": [[w.text, list(w.box)] for w in scene.words]})
    marked = [o for o in objs if o.mark is not None]
    if marked:
        o = rng.choice(marked)
        add("som", PROMPTS["som"][0].format(k=o.mark), {"colour": o.colour, "shape": o.shape})
    return out


def reference_answer(q: Question, anchor: Anchor = "top-left") -> str:
    """The answer the world's own task writer gives (a perfect answer, for testing the metrics)."""
    w = TaskWriter(q.scene, anchor)
    t = q.truth
    if q.metric == "grounding":
        return w.box(t["box"])
    if q.metric == "detection":
        return w.detection_answer()
    if q.metric == "counting":
        return str(t["count"])
    if q.metric == "attribute":
        return t["answer"]
    if q.metric == "ocr":
        return w.ocr_answer()
    if q.metric == "spotting":
        return w.spotting_answer()
    return f"{t['colour']} {t['shape']}"


# --- scoring -------------------------------------------------------------------------------------
def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _boxes_px(answer: str, q: Question, anchor: Anchor) -> list[tuple[str | None, tuple[float, ...]]]:
    canvas = canvas_geometry(q.scene.width, q.scene.height, anchor)
    return [(r.label, canvas_to_pixels(r.coords, canvas)) for r in parse_regions(answer) if r.is_box]


def _match_f1(pred: list[tuple[str, tuple]], truth: list[tuple[str, tuple]]) -> tuple[int, int, int]:
    """Greedy one-to-one matching, same (case-folded) name and IoU >= 0.5 -> (tp, n_pred, n_truth)."""
    used, tp = set(), 0
    for name, box in pred:
        best, best_iou = None, 0.5
        for j, (tname, tbox) in enumerate(truth):
            if j in used or (name or "").strip().lower() != tname.lower():
                continue
            v = iou(box, tbox)
            if v >= best_iou:
                best, best_iou = j, v
        if best is not None:
            used.add(best)
            tp += 1
    return tp, len(pred), len(truth)


def _first_number(text: str) -> int | None:
    m = re.search(r"\d+", text)
    if m:
        return int(m.group())
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in NUMBER_WORDS:
            return NUMBER_WORDS.index(word)
    return None


def score(q: Question, answer: str, anchor: Anchor = "top-left") -> dict[str, float]:
    """{'correct': 0/1} for accuracy metrics, {'tp','n_pred','n_truth'} for F1 metrics, {'hit','total'} for OCR."""
    t, text = q.truth, answer.strip()
    words = re.findall(r"[a-z]+", text.lower())
    if q.metric == "grounding":
        boxes = _boxes_px(text, q, anchor)
        return {"correct": float(bool(boxes) and iou(boxes[0][1], t["box"]) >= 0.5)}
    if q.metric in ("detection", "spotting"):
        pred = [(n or "", b) for n, b in _boxes_px(text, q, anchor)]
        truth = [(n, b) for n, b in (t["objects"] if q.metric == "detection" else t["words"])]
        tp, n_pred, n_truth = _match_f1(pred, truth)
        return {"tp": tp, "n_pred": n_pred, "n_truth": n_truth}
    if q.metric == "counting":
        return {"correct": float(_first_number(text) == t["count"])}
    if q.metric == "attribute":
        vocab = COLOUR_NAMES if t["answer"] in COLOUR_NAMES else SHAPES
        named = [w for w in words if w in vocab]
        return {"correct": float(named[:1] == [t["answer"]])}
    if q.metric == "ocr":
        said = Counter(w.lower() for w in re.findall(r"[A-Za-z]+", text))
        want = Counter(w.lower() for w in t["words"])
        return {"hit": sum(min(n, said[w]) for w, n in want.items()), "total": sum(want.values())}
    colours = [w for w in words if w in COLOUR_NAMES]
    shapes = [w for w in words if w in SHAPES]
    return {"correct": float(colours[:1] == [t["colour"]] and shapes[:1] == [t["shape"]])}


def summarise(scored: list[tuple[Question, dict]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        rows = [s for q, s in scored if q.metric == metric]
        if not rows:
            continue
        if metric in ("detection", "spotting"):
            tp, n_pred, n_truth = (sum(r[k] for r in rows) for k in ("tp", "n_pred", "n_truth"))
            value = 2 * tp / (n_pred + n_truth) if n_pred + n_truth else 0.0
        elif metric == "ocr":
            value = sum(r["hit"] for r in rows) / max(1, sum(r["total"] for r in rows))
        else:
            value = sum(r["correct"] for r in rows) / len(rows)
        table[metric] = {"value": round(value, 4), "n": len(rows), "target": TARGETS[metric]}
    return table


def format_table(table: dict[str, dict[str, float]], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + ["| metric | value | target | questions |", "|---|---|---|---|"]
    names = {"grounding": "grounding acc@0.5", "detection": "detection F1@0.5", "counting": "counting accuracy",
             "attribute": "attribute accuracy", "ocr": "OCR word accuracy", "spotting": "text-spotting F1@0.5",
             "som": "Set-of-Mark accuracy"}
    for metric, row in table.items():
        lines.append(f"| {names[metric]} | {row['value']:.3f} | {row['target']:.2f} | {int(row['n'])} |")
    return "\n".join(lines)


def generate_answers(model_path: str, questions: list[Question], batch_size: int, max_new_tokens: int,
                     device: str = "cpu") -> list[str]:
    from tqdm import tqdm

    import sphinx_model.released  # noqa: F401  (registers released:NAME with the loader)
    from sphinx_model.conversation import Conversation, Message
    from sphinx_model.loading import from_pretrained
    from sphinx_model.serving.generation import GenerationSettings, Generator

    model, processor = from_pretrained(model_path, device=device)
    gen = Generator(model, processor)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    order = sorted(range(len(questions)), key=lambda i: questions[i].metric)  # similar lengths batch together
    by_index: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="evaluate"):
        idx = order[start:start + batch_size]
        convs = [Conversation([Message.user(questions[i].prompt, image=True)]) for i in idx]
        outs = gen.generate(convs, [str(questions[i].image) for i in idx], settings)
        by_index.update(zip(idx, outs))
    return [by_index[i] for i in range(len(questions))]


CARD_BEGIN, CARD_END = "<!-- eval:begin -->", "<!-- eval:end -->"


def write_card_table(card: Path, text: str) -> None:
    """Replace the evaluation section of a model card (between the eval markers), or append it."""
    old = card.read_text(encoding="utf-8") if card.is_file() else ""
    block = f"{CARD_BEGIN}\n{text}\n{CARD_END}"
    if CARD_BEGIN in old and CARD_END in old:
        head, rest = old.split(CARD_BEGIN, 1)
        new = head + block + rest.split(CARD_END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    card.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description="Score a model on held-out world scenes.")
    ap.add_argument("--model", help="checkpoint folder or hub id (default: assets/demo)")
    ap.add_argument("--data", type=Path, action="append", required=True,
                    help="world folder(s) from `python -m train.synthetic` (repeatable)")
    ap.add_argument("--answers", type=Path, help="score this JSONL of {id, answer} instead of generating")
    ap.add_argument("--limit", type=int, help="first N scenes of each folder")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--records", type=Path, help="per-question JSONL (prompt, truth, answer, score)")
    ap.add_argument("--card", type=Path, help="model card whose eval section gets the table")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model = args.model or str(Path(__file__).resolve().parents[1] / "assets" / "demo")
    try:
        if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
            raise ValueError("--batch-size, --max-new-tokens and --limit must be >= 1")
        sections = []
        all_records = []
        for data in args.data:
            if not (data / "scenes.jsonl").is_file():
                raise ValueError(f"{data} is not a world folder (no scenes.jsonl); write one with python -m train.synthetic")
            questions = make_questions(data, args.limit)
            if args.answers:
                given = {r["id"]: r["answer"] for r in map(json.loads, open(args.answers, encoding="utf-8"))}
                answers = [given.get(q.id, "") for q in questions]
                anchor: Anchor = "top-left"
            else:
                import sphinx_model.released  # noqa: F401  (registers released:NAME)
                from sphinx_model.config import SphinxConfig
                from sphinx_model.loading import resolve_checkpoint

                anchor = SphinxConfig.load(resolve_checkpoint(model)).anchor
                answers = generate_answers(model, questions, args.batch_size, args.max_new_tokens, args.device)
            scored = [(q, score(q, a, anchor)) for q, a in zip(questions, answers)]
            all_records += [{**q.record(), "answer": a, "score": s} for (q, s), a in zip(scored, answers)]
            renderer = questions[0].scene.renderer if questions else "?"
            sections.append(format_table(summarise(scored), f"{data.name} ({renderer} renderer, "
                                                             f"{len({q.scene.id for q in questions})} scenes)"))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "\n\n".join(sections)
    print(text)
    if args.records:
        with open(args.records, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in all_records)
    if args.card:
        write_card_table(args.card, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
