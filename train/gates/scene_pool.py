"""Rendered scenes' truth, cached: the gates train on oracle features, which need a scene's objects
and words but never its pixels, and rendering (~14 ms a scene, most of a gate step's time when a
curriculum keeps only the 4% of one-object scenes) is paid once per (world, renderer, count).

The cache is JSON lines of `Scene.to_dict()` (data, nothing executable), under `folder`.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..world.scene import Scene, render_scene


def scene_pool(seed: int, count: int, renderer: str = "train", folder: Path = Path("runs/scene_pool"),
               first: int = 0) -> list[Scene]:
    """Scenes `first` .. `first + count - 1` of world `seed` as drawn by `renderer`, from the cache
    when it holds them, rendered (and cached) otherwise."""
    folder = Path(folder)
    for cached in sorted(folder.glob(f"{renderer}-{seed}-{first}-*.jsonl")):
        held = int(cached.stem.rsplit("-", 1)[1])
        if held >= count:                           # a larger pool of the same world holds these scenes
            with cached.open(encoding="utf-8") as f:
                scenes = [Scene.from_dict(json.loads(line)) for _, line in zip(range(count), f)]
            if len(scenes) == count:
                return scenes
    path = folder / f"{renderer}-{seed}-{first}-{count}.jsonl"
    scenes = [render_scene(seed, first + i, renderer)[0]
              for i in tqdm(range(count), desc=f"rendering {renderer} world {seed}", unit="scene")]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in scenes:
            f.write(json.dumps(s.to_dict()) + "\n")
    tmp.replace(path)
    return scenes
