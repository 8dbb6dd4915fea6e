import pytest
import torch
from PIL import Image, ImageDraw

from sphinx_model.checkpoint import build_from_config
from sphinx_model.config import get_preset


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the tiny random-init preset: Llama + tiny ConvNeXt/DINOv2, skip tokens on."""
    torch.manual_seed(0)
    model, processor = build_from_config(get_preset("sphinx-test-tiny"))
    return model.eval(), processor


@pytest.fixture(scope="session")
def make_image():
    return draw_image


def draw_image(w: int, h: int, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", (w, h), (30 + 40 * seed % 200, 120, 200))
    d = ImageDraw.Draw(img)
    d.rectangle([w // 4, h // 4, w // 2, h // 2], fill=(240, 20 * seed % 255, 20))
    return img
