"""Fixtures for the app's tests: a real model (a tiny random one whose replies go on until
stopped), a store in a temporary folder, and pictures made on the spot."""
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
from app.settings import AppSettings
from storage import open_store

from apptest_support import scene, tiny_text_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Stop, cancel and queue tests need replies that go on until stopped; the demo model ends its
    # answers after a few tokens, so these tests run the tiny random model (unscripted, real).
    # The demo model itself is exercised through the service in test_service.py.
    return tiny_text_model(tmp_path_factory.mktemp("model") / "tiny-text")


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
