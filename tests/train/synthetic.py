"""Tiny synthetic training data: images of coloured shapes with dialogues about them, plus
text-only arithmetic dialogues, plus deliberately bad records (deterministic per seed); and
writers of tiny mixture / run YAMLs.

Also used (by path) to regenerate `train/configs/tiny_data/`.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

from typing import Any

import yaml
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220)}
SHAPES = ("square", "circle", "triangle")
SIZES = ((64, 64), (96, 48), (48, 96), (80, 80), (96, 32))
SYSTEM = "Answer briefly."


def draw_shape(w: int, h: int, shape: str, colour: str, rng: random.Random) -> tuple[Image.Image, tuple]:
    img = Image.new("RGB", (w, h), (250, 250, 250))
    d = ImageDraw.Draw(img)
    side = max(8, min(w, h) // 2)
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=fill)
    return img, box


def shape_sample(i: int, ref: str, w: int, h: int, shape: str, colour: str, box: tuple) -> dict:
    s = max(w, h)  # top-left anchored square canvas: boxes are fractions of its side
    coords = ",".join(f"{v / s:.2f}" for v in box)
    return {"id": f"shape-{i}", "task": "vqa", "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image", "image": ref},
                                     {"type": "text", "text": "What is in the image?"}]},
        {"role": "assistant", "content": f"A {colour} {shape}."},
        {"role": "user", "content": "Where is it?"},
        {"role": "assistant", "content": f"[{coords}]"},
    ]}


def text_sample(i: int, rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {"id": f"text-{i}", "task": "text", "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_shapes(folder: Path, n: int, seed: int = 0, image_dir: str = "images") -> Path:
    """folder/shapes.jsonl + folder/images/*.png; returns the JSONL path."""
    rng = random.Random(seed)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        img, box = draw_shape(w, h, shape, colour, rng)
        ref = f"{image_dir}/{i:04d}.png"
        img.save(folder / ref)
        rows.append(shape_sample(i, ref, w, h, shape, colour, box))
    return write_jsonl(folder / "shapes.jsonl", rows)


def make_text(folder: Path, n: int, seed: int = 0, name: str = "text.jsonl") -> Path:
    rng = random.Random(seed + 1)
    return write_jsonl(folder / name, [text_sample(i, rng) for i in range(n)])


def make_export(folder: Path, n: int, seed: int = 0) -> Path:
    """A storage-export-shaped folder: folder/data.jsonl + folder/images/ (LLaVA rows mixed in)."""
    rng = random.Random(seed + 2)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        img, _ = draw_shape(64, 64, shape, colour, rng)
        ref = f"images/fb{i:03d}.png"
        img.save(folder / ref)
        if i % 2:
            rows.append({"id": f"fb-{i}", "image": ref, "conversations": [
                {"from": "human", "value": "<image>\nName the shape."},
                {"from": "gpt", "value": f"It is a {shape}."}]})
        else:
            rows.append({"id": f"fb-{i}", "task": "feedback", "messages": [
                {"role": "user", "content": [{"type": "image", "image": ref},
                                             {"type": "text", "text": "What colour is the shape?"}]},
                {"role": "assistant", "content": f"{colour.capitalize()}."}]})
    write_jsonl(folder / "data.jsonl", rows)
    return folder


def make_bad(folder: Path) -> tuple[Path, dict[str, int]]:
    """One record per failure mode (and two good ones); returns (path, expected reasons)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    img, _ = draw_shape(64, 64, "square", "red", random.Random(0))
    img.save(folder / "images" / "ok.png")
    good = shape_sample(0, "images/ok.png", 64, 64, "square", "red", (0, 0, 32, 32))
    rows = [
        {**good, "id": "bad-missing", "messages": [good["messages"][0], {**good["messages"][1], "content": [
            {"type": "image", "image": "images/nope.png"}, {"type": "text", "text": "What is in the image?"}]},
            *good["messages"][2:]]},
        {**good, "id": "bad-broken", "messages": [good["messages"][0], {**good["messages"][1], "content": [
            {"type": "image", "image": "images/broken.png"}, {"type": "text", "text": "What is in the image?"}]},
            *good["messages"][2:]]},
        {"id": "bad-empty", "messages": []},
        {"id": "bad-long", "messages": [{"role": "user", "content": "Repeat: " + "blah " * 400},
                                        {"role": "assistant", "content": "blah " * 400}]},
        good,
        text_sample(99, random.Random(5)),
    ]
    path = write_jsonl(folder / "bad.jsonl", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("{this is not json\n")
    return path, {"missing_image": 1, "unreadable_image": 1, "empty_dialogue": 1, "too_long": 1, "schema": 1}


# --- tiny configs ----------------------------------------------------------------------------
TINY_TRAIN = {"batch_size": 2, "grad_accum": 1, "max_steps": 4, "mixed_precision": "no",
              "gradient_checkpointing": False, "progress": False, "tensorboard": False, "seed": 0}


def write_mixture(path: Path, datasets: list[tuple[str, str, float]], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({**extra, "datasets": [{"name": n, "path": p, "weight": w}
                                                          for n, p, w in datasets]}), encoding="utf-8")
    return path


def write_run(folder: Path, mixture: Path, **sections: dict[str, Any]) -> Path:
    """A run YAML with tiny defaults; `sections` update them (train={...}, data={...}, ...)."""
    cfg: dict[str, Any] = {"model": {"init": "sphinx-test-tiny"},
                           "data": {"mixture": str(mixture), "megabatch_mult": 4},
                           "optim": {"lr": 2e-3, "warmup_ratio": 0.1, "max_grad_norm": 1.0},
                           "train": {**TINY_TRAIN, "output_dir": str(folder / "out")}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def fill_hub_cache(cache: Path, repo_id: str, export: Path, extra_lines: list[bytes] = ()) -> Path:
    """What `snapshot_download` leaves in the Hugging Face cache for a dataset repo the app's Hub sync
    pushed (conversations/<id>.jsonl + images/), made from a local export; returns the snapshot."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "conversations").mkdir(parents=True, exist_ok=True)
    shutil.copytree(export / "images", snapshot / "images")
    lines = (export / "data.jsonl").read_bytes().splitlines(keepends=True)
    for k, line in enumerate(lines):          # one file per conversation, as the sync writes them
        (snapshot / "conversations" / f"c{k:03d}.jsonl").write_bytes(line)
    (snapshot / "conversations" / "zzz.jsonl").write_bytes(lines[0] + b"".join(extra_lines))  # a duplicate too
    return snapshot
