"""Fixtures of the training tests: tiny synthetic data on disk and tiny run configs."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402

TINY_TRAIN = {"batch_size": 2, "grad_accum": 1, "max_steps": 4, "mixed_precision": "no",
              "gradient_checkpointing": False, "progress": False, "tensorboard": False, "seed": 0}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """shapes.jsonl (16 images), text.jsonl (16), export/ (a storage export, 4 records), mixture.yaml."""
    root = tmp_path_factory.mktemp("data")
    synthetic.make_shapes(root, 16, seed=0)
    synthetic.make_text(root, 16, seed=0)
    synthetic.make_export(root / "export", 4, seed=0)
    write_mixture(root / "mixture.yaml", [("shapes", "shapes.jsonl", 2.0), ("text", "text.jsonl", 1.0),
                                         ("feedback", "export", 1.0)])
    return root


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


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def processor():
    """The tiny preset's processor alone (byte tokenizer, no weights)."""
    from sphinx_model.config import get_preset
    from sphinx_model.processor import SphinxProcessor
    from sphinx_model.tokenizer import byte_tokenizer

    return SphinxProcessor(get_preset("sphinx-test-tiny"), byte_tokenizer())
