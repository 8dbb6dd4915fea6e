"""Fixtures of the training tests: tiny synthetic data on disk (see synthetic.py), a processor, and a
clean accelerate state for in-process runs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402
from synthetic import write_mixture  # noqa: E402


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
