"""Benchmarks the way MLLM researchers run them: SPHINX-X as the lmms-eval model `sphinx_x`.

    pip install -e .[eval]            # lmms-eval 0.7.3 and the entry point below
    lmms-eval --model sphinx_x --model_args pretrained=PATH --tasks pope,refcoco_bbox_rec_val

Modules: `lmms_model` (the model class), `requests` (one request -> one model input, or the
reason its document cannot be asked), `prompts` (SPHINX's wording per benchmark family, and
where each task's metric reads boxes), `postprocess` (canvas boxes -> the task's coordinates),
`docs` (images of local task files), `world_tasks` (the demo world as local tasks: `python -m
train.benchmarks.world_tasks`). lmms-eval itself is imported only by `lmms_model`, so everything
else here works without the extra.
"""
from __future__ import annotations

from typing import Any

MODEL_ID = "sphinx_x"
MODEL_CLASS = "train.benchmarks.lmms_model.SphinxX"


def manifest() -> Any:
    """The `lmms_eval.models` entry point (pyproject.toml): lmms-eval calls it when it lists models."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
