"""Helpers of the lmms-eval tests (imported by name; the fixtures live in conftest.py)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

FIXTURES = Path(__file__).parent / "tasks"


def lmms_eval_ready() -> str | None:
    """None when lmms-eval and our `sphinx_x` entry point are installed, else why not."""
    if importlib.util.find_spec("lmms_eval") is None:
        return "lmms-eval is not installed (pip install -e .[eval])"
    if not any(ep.name == "sphinx_x" for ep in entry_points(group="lmms_eval.models")):
        return "the sphinx_x entry point is not installed (pip install -e .[eval])"
    return None


needs_lmms_eval = pytest.mark.skipif(lmms_eval_ready() is not None, reason=str(lmms_eval_ready()))


def scene(path: Path, w: int, h: int, k: int) -> str:
    """A picture with one red box at a known place (its pixel box is returned by `box_of`)."""
    img = Image.new("RGB", (w, h), (40 + 30 * k % 200, 120, 200))
    ImageDraw.Draw(img).rectangle(box_of(w, h), fill=(230, 20, 20))
    img.save(path)
    return str(path)


def box_of(w: int, h: int) -> list[int]:
    return [w // 5, h // 4, w // 2, (3 * h) // 4]


SIZES = [(96, 64), (64, 112), (80, 80), (120, 48)]
FORMAT_TASKS = ["fmt_seedbench_ppl", "fmt_textvqa", "fmt_refcoco_rec", "fmt_pope"]


def write_format_tasks(root: Path) -> Path:
    """Documents of SEED-Bench (likelihood), TextVQA, RefCOCO and POPE form, with their images."""
    root.mkdir(parents=True, exist_ok=True)
    for y in FIXTURES.glob("*.yaml"):
        shutil.copyfile(y, root / y.name)
    images = [scene(root / f"img{k}.png", w, h, k) for k, (w, h) in enumerate(SIZES)]
    rows: dict[str, list[dict]] = {"seed": [], "textvqa": [], "refcoco": [], "pope": []}
    for k, (img, (w, h)) in enumerate(zip(images, SIZES)):
        rows["seed"].append({"question_id": f"s{k}", "question": "What colour is the box?", "choice_a": "red",
                             "choice_b": "green", "choice_c": "blue", "choice_d": "white", "answer": "A",
                             "image": img})
        rows["textvqa"].append({"question_id": k, "question": "what colour is the box?", "answers": ["red"] * 10,
                                "image": img})
        x0, y0, x1, y1 = box_of(w, h)
        rows["refcoco"].append({"question_id": f"r{k}", "answer": "the red box", "image": img,
                                "bbox": [x0 / w, y0 / h, x1 / w, y1 / h]})
        rows["pope"].append({"question_id": f"p{k}", "question": "Is there a red box in the image?",
                             "answer": "yes" if k % 2 == 0 else "no", "category": "random", "image": img})
    rows["pope"].append({"question_id": "p-missing", "question": "Is there a dog in the image?", "answer": "no",
                         "category": "random", "image": str(root / "no-such-image.png")})
    rows["pope"].append({"question_id": "p-empty", "question": "  ", "answer": "no", "category": "random",
                         "image": images[0]})
    for name, docs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return root
