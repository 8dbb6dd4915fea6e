"""`python -m train.synthetic --out DIR --n N --seed S`: write the synthetic world to disk.

DIR/images/<id>.png     the scenes (PNG: truth boxes are exact pixels)
DIR/scenes.jsonl        one scene per line: size, objects (shape, colour, size, box, mark), words
DIR/data.jsonl          task dialogues in the training schema (`sphinx_model.conversation`),
                        plus a few text-only exchanges; boxes relative to the model's canvas
DIR/pairs.jsonl         with `--pairs N`: N two-image dialogues over scenes already written (a
                        question about one scene, then a new image mid-conversation and
                        questions about it), so a model learns to talk about the latest image

Scene i of seed S is the same picture on every machine and every run (`train.world.scene`).
Held-out data is another seed (and, with `--renderer heldout`, another way of drawing).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from .world.scene import RENDERERS, render_scene
from .world.tasks import TEXT_ONLY, dialogue

TEXT_ONLY_SHARE = 0.03


def _record(messages: list[tuple[str, str]], sample_id: str, task: str, image: str | None) -> dict:
    out = []
    for k, (q, a) in enumerate(messages):
        content = [{"type": "text", "text": q}]
        if image is not None and k == 0:
            content.insert(0, {"type": "image", "image": image})
        out += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    return {"id": sample_id, "task": task, "messages": out}


def _one(job: tuple[str, int, int, str, str, int]) -> tuple[str, list[str]]:
    out_dir, seed, index, renderer, anchor, max_turns = job
    scene, image = render_scene(seed, index, renderer)
    rel = f"images/{scene.id}.png"
    image.save(Path(out_dir) / rel, compress_level=1)
    rng = random.Random(f"dialogue-{seed}-{index}-{renderer}")
    rows = []
    turns, tasks = dialogue(scene, rng, anchor, max_turns)
    if turns:
        rows.append(json.dumps(_record(turns, scene.id, "+".join(tasks), rel)))
    if rng.random() < TEXT_ONLY_SHARE:
        q, a = rng.choice(TEXT_ONLY)
        rows.append(json.dumps(_record([(q, a)], f"{scene.id}-text", "text", None)))
    return json.dumps({"image": rel, **scene.to_dict()}), rows


def write_world(out: Path, n: int, seed: int, renderer: str = "train", anchor: str = "top-left",
                max_turns: int = 4, workers: int = 1, start: int = 0, progress: bool = True) -> Path:
    """Render scenes start..start+n-1 of world `seed` into `out` (atomic per file)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, i, renderer, anchor, max_turns) for i in range(start, start + n)]
    tmp_scenes, tmp_data = out / "scenes.jsonl.tmp", out / "data.jsonl.tmp"
    with open(tmp_scenes, "w", encoding="utf-8") as fs, open(tmp_data, "w", encoding="utf-8") as fd, \
            (get_context("fork").Pool(workers) if workers > 1 else nullcontext()) as pool:
        results = pool.imap(_one, jobs, chunksize=16) if pool is not None else map(_one, jobs)
        for scene_row, rows in tqdm(results, total=n, disable=not progress, desc="scenes"):
            fs.write(scene_row + "\n")
            fd.writelines(r + "\n" for r in rows)
    os.replace(tmp_scenes, out / "scenes.jsonl")
    os.replace(tmp_data, out / "data.jsonl")
    return out


def write_pairs(out: Path, n: int, seed: int = 0, anchor: str = "top-left") -> Path:
    """`n` two-image dialogues over the scenes of the world in `out` (atomic)."""
    from .world.scene import Scene

    path = out / "scenes.jsonl"
    if not path.is_file():
        raise ValueError(f"{out} holds no world (no scenes.jsonl); write the world first")
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    if len(rows) < 2:
        raise ValueError("two-image dialogues need at least two scenes")
    rng = random.Random(f"pairs-{seed}")
    tmp = out / "pairs.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for k in range(n):
            a, b = rng.sample(rows, 2)
            first, _ = dialogue(Scene.from_dict({x: v for x, v in a.items() if x != "image"}), rng, anchor, 1)
            second, tasks = dialogue(Scene.from_dict({x: v for x, v in b.items() if x != "image"}), rng, anchor, 2)
            if not first or not second:
                continue
            record = _record(first + second, f"pair-{seed}-{k}", "pair+" + "+".join(tasks), a["image"])
            record["messages"][2]["content"].insert(0, {"type": "image", "image": b["image"]})  # the new image
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, out / "pairs.jsonl")
    return out / "pairs.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--n", type=int, required=True, help="number of scenes")
    ap.add_argument("--seed", type=int, default=0, help="world seed (held-out data: another seed)")
    ap.add_argument("--start", type=int, default=0, help="index of the first scene")
    ap.add_argument("--renderer", choices=RENDERERS, default="train")
    ap.add_argument("--anchor", choices=("top-left", "center"), default="top-left",
                    help="canvas anchor the boxes in the dialogues are relative to")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=0,
                    help="only write N two-image dialogues over the world already in --out")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 10_000_000 or args.start < 0 or not 1 <= args.max_turns <= 32 or args.workers < 1:
        print("error: --n must be in 1..10,000,000, --start >= 0, --max-turns in 1..32, --workers >= 1",
              file=sys.stderr)
        return 2
    try:
        if args.pairs:
            if args.pairs < 0:
                raise ValueError("--pairs must be >= 0")
            write_pairs(args.out, args.pairs, args.seed, args.anchor)
            return 0
        write_world(args.out, args.n, args.seed, args.renderer, args.anchor, args.max_turns, args.workers, args.start)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
