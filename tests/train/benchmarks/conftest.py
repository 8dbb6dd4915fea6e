"""Fixtures of the lmms-eval tests: a tiny random checkpoint on disk, local task folders in the
formats of four benchmark families (documents and images written here), the demo world as
tasks, and one end-to-end run of lmms-eval's CLI over all of them.

Everything is skipped, with the reason, when lmms-eval or the project's entry point is not
installed (`pip install -e .[eval]`, which .ci/run does).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

FIXTURES = Path(__file__).parent / "tasks"
ROOT = Path(__file__).resolve().parents[3]


def lmms_eval_ready() -> str | None:
    """None when lmms-eval and our `sphinx_x` entry point are installed, else why not."""
    if importlib.util.find_spec("lmms_eval") is None:
        return "lmms-eval is not installed (pip install -e .[eval])"
    if not any(ep.name == "sphinx_x" for ep in entry_points(group="lmms_eval.models")):
        return "the sphinx_x entry point is not installed (pip install -e .[eval])"
    return None


needs_lmms_eval = pytest.mark.skipif(lmms_eval_ready() is not None, reason=str(lmms_eval_ready()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset at a fixed random init, saved in our checkpoint format."""
    from sphinx_model.checkpoint import build_from_config, save_pretrained
    from sphinx_model.config import get_preset

    torch.manual_seed(0)
    model, processor = build_from_config(get_preset("sphinx-test-tiny"))
    return save_pretrained(model.eval(), processor, tmp_path_factory.mktemp("ckpt") / "tiny")


def scene(path: Path, w: int, h: int, k: int) -> str:
    """A picture with one red box at a known place (its pixel box is returned by `box_of`)."""
    img = Image.new("RGB", (w, h), (40 + 30 * k % 200, 120, 200))
    ImageDraw.Draw(img).rectangle(box_of(w, h), fill=(230, 20, 20))
    img.save(path)
    return str(path)


def box_of(w: int, h: int) -> list[int]:
    return [w // 5, h // 4, w // 2, (3 * h) // 4]


SIZES = [(96, 64), (64, 112), (80, 80), (120, 48)]


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


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from train.synthetic import write_world

    return write_world(tmp_path_factory.mktemp("world"), 4, seed=11, renderer="heldout", progress=False)


@pytest.fixture(scope="session")
def task_root(tmp_path_factory, world) -> Path:
    """formats/ (the four benchmark forms) and world/ (the demo world's tasks), one --include_path."""
    from train.benchmarks.world_tasks import write_tasks

    root = tmp_path_factory.mktemp("tasks")
    write_format_tasks(root / "formats")
    write_tasks(world, root / "world")
    return root


FORMAT_TASKS = ["fmt_seedbench_ppl", "fmt_textvqa", "fmt_refcoco_rec", "fmt_pope"]


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, tiny_checkpoint, task_root) -> dict:
    """One `python -m lmms_eval` run over every local task: results, samples per task, output, seconds."""
    reason = lmms_eval_ready()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("lmms_out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(out / "datasets"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "sphinx_x",
           "--model_args", f"pretrained={tiny_checkpoint},device=cpu", "--tasks", ",".join(FORMAT_TASKS + ["sphinx_world"]),
           "--include_path", str(task_root), "--batch_size", "3", "--output_path", str(out), "--log_samples",
           "--process-docs-parallel", "1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    results_files = list(out.rglob("*_results.json"))
    assert len(results_files) == 1, text[-2000:]
    samples = {}
    for f in out.rglob("*_samples_*.jsonl"):
        task = f.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    return {"results": json.loads(results_files[0].read_text())["results"], "samples": samples, "output": text,
            "seconds": seconds}
