"""Fixtures for the app's tests: a real model (the demo model when it has landed, else a tiny
random one), a store in a temporary folder, and pictures made on the spot."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the support module, with any pytest --import-mode
    sys.path.insert(0, str(HERE))

from app.handlers.common import AppContext
from app.service import ModelService
from app.settings import DEMO_MODEL_DIR, AppSettings
from storage import open_store

from apptest_support import scene  # noqa: E402


def _tiny_text_model(folder: Path) -> Path:
    """The tiny random-init preset, saved as a checkpoint folder. Its output layer keeps only the
    rows of printable ASCII bytes, so that its (random, unscripted) answers are text that
    streams in many pieces and never ends early; everything else is the preset's random init."""
    from sphinx_model.checkpoint import build_from_config, save_pretrained
    from sphinx_model.config import get_preset

    torch.manual_seed(0)
    model, processor = build_from_config(get_preset("sphinx-test-tiny"))
    keep = torch.zeros(model.llm.lm_head.weight.shape[0], dtype=torch.bool)
    keep[[4 + b for b in range(32, 127)]] = True      # byte tokenizer: id = 4 + byte
    with torch.no_grad():
        model.llm.lm_head.weight[~keep] = 0.0
    save_pretrained(model, processor, folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (DEMO_MODEL_DIR / "sphinx_config.json").is_file():
        return DEMO_MODEL_DIR
    return _tiny_text_model(tmp_path_factory.mktemp("model") / "tiny-text")


@pytest.fixture(scope="session")
def service(model_dir: Path) -> ModelService:
    torch.set_num_threads(1)
    return ModelService.load(str(model_dir), device="cpu")


@pytest.fixture
def settings(tmp_path: Path, model_dir: Path) -> AppSettings:
    return AppSettings(model=str(model_dir), data_dir=tmp_path / "data", task_max_new_tokens=24,
                       browser_secret="test-secret")


@pytest.fixture
def ctx(service: ModelService, settings: AppSettings):
    store = open_store(settings.storage)
    yield AppContext(service, store, settings)
    store.dispose()


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    scene().save(path)
    return path
