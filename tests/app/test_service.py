"""The model service: requests, cancel (before and during decoding), and failures that leave it serving."""
from __future__ import annotations

import os
import threading

import pytest
import torch
from apptest_support import ALICE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.handlers import chat
from app.handlers.common import generation_settings
from app.service import GenerationRequest, ModelService, ServiceError
from sphinx_model.conversation import Conversation, Message
from sphinx_model.serving.generation import GenerationSettings
from storage.models import MessageRow


def _request(n: int = 32, text: str = "Hello") -> GenerationRequest:
    return GenerationRequest(Conversation([Message.user(text)]), [], GenerationSettings(max_new_tokens=n))


def test_generate_equals_the_streamed_pieces(service):
    a, b = _request(), _request()
    assert "".join(service.stream(a)) == service.generate(b) == b.text
    assert a.latency_ms > 0 and a.first_piece_at >= a.started_at and not a.cancelled


def test_cancel_before_start_and_while_decoding(service):
    early = _request()
    service.cancel(early.id)
    assert list(service.stream(early)) == [] and early.cancelled
    running = _request(n=600)
    before = set(threading.enumerate())
    pieces = []
    stream = service.stream(running)
    pieces.append(next(stream))
    threading.Timer(0.05, service.cancel, [running.id]).start()
    pieces += list(stream)
    assert running.cancelled and running.text == "".join(pieces) and len(running.text) < 600
    assert {t for t in threading.enumerate() if t.is_alive()} <= before   # the decoding thread has ended


def test_an_unknown_model_is_one_clear_line():
    with pytest.raises(ServiceError, match="cannot load model"):
        ModelService.load("no/such-model-anywhere")


@pytest.mark.parametrize("error, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"), "ran out of memory"),
    (RuntimeError("shape mismatch\nsecond line"), "the model failed: shape mismatch"),
])
def test_model_failures_reach_the_user_and_the_app_keeps_serving(ctx, monkeypatch, error, message):
    llm = ctx.service.engine.llm
    real, calls = llm.forward, []

    def failing(*args, **kwargs):              # prefill and two decode steps, then the failure
        calls.append(1)
        if len(calls) > 3:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(llm, "forward", failing)
    state = chat.submit(ctx, chat.ChatState(), ALICE, "Hi", [])
    views = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 16, 512)))
    assert message in views[-1].error and "\n" not in views[-1].error
    assert views[-1].state.turns == [] and views[-1].restore["text"] == "Hi"
    with Session(ctx.store.engine) as s:
        assert s.scalar(select(func.count()).select_from(MessageRow)) == 0   # a failed turn is not stored
    monkeypatch.setattr(llm, "forward", real)
    state = chat.submit(ctx, views[-1].state, ALICE, "Hi again", [])
    assert list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 8, 512)))[-1].state.turns[-1].answer


def test_the_demo_model_answers_a_world_question_through_the_service(tmp_path):
    """The app's default model, loaded by the service: a grounding question about a scene of its
    world gets one box back, which the app maps to the picture's pixels."""
    from app.settings import DEMO_MODEL_DIR
    from sphinx_model.boxes import canvas_to_pixels, parse_regions
    from train.world.scene import render_scene

    demo = ModelService.load(str(DEMO_MODEL_DIR), device="cpu")
    scene, picture = render_scene(4242, 1)
    path = tmp_path / "scene.png"
    picture.save(path)
    obj = scene.objects[0]
    question = f"Please provide the bounding box coordinate of the region this sentence describes: the {obj.colour} {obj.shape}."
    request = GenerationRequest(Conversation([Message.user(question, image=True)]), [str(path)],
                                GenerationSettings(max_new_tokens=24))
    (region,) = parse_regions(demo.generate(request))
    x0, y0, x1, y1 = canvas_to_pixels(region.coords, demo.geometry(*picture.size))
    assert 0 <= x0 < x1 <= picture.width and 0 <= y0 < y1 <= picture.height


def test_an_8bit_service_quantises_the_llm_and_still_answers(model_dir):
    quantised = ModelService.load(str(model_dir), device="cpu", quantize="8bit")
    names = {type(m).__name__ for m in quantised.generator.model.llm.modules()}
    assert "Linear8bitLt" in names
    assert quantised.generate(_request(n=4))


def test_the_version_of_a_folder_tells_two_trainings_of_one_architecture_apart(model_dir, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from app.service import _folder_version

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert _folder_version(copy, is_hub=False) == _folder_version(model_dir, is_hub=False)   # same content
    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(weights)
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    name = max(tensors, key=lambda k: tensors[k].numel())
    tensors[name] = tensors[name] + 1e-3          # a retraining: same names, shapes, file size
    size = weights.stat().st_size
    save_file(tensors, weights, metadata=metadata)
    assert weights.stat().st_size == size
    assert _folder_version(copy, is_hub=False) != _folder_version(model_dir, is_hub=False)


def test_a_service_with_its_engine_in_a_process_of_its_own_serves_and_cancels(model_dir, service):
    from app.service import ServingLimits

    remote = ModelService.load(str(model_dir), device="cpu", limits=ServingLimits(engine_mode="process",
                                                                                  engine_threads=1))
    try:
        assert remote.generator is None and remote.engine.pid != os.getpid()   # no model in this process
        assert remote.info == service.info
        assert remote.generate(_request()) == service.generate(_request())    # the same weights, greedy
        running = _request(n=600)
        stream = remote.stream(running)
        first = next(stream)
        remote.cancel(running.id)
        rest = "".join(stream)
        assert running.cancelled and running.text == first + rest and len(running.text) < 600
        assert remote.wait_idle(5)
    finally:
        remote.close()
    with pytest.raises(ServiceError, match="cannot load model"):
        ModelService.load(str(model_dir / "missing"), limits=ServingLimits(engine_mode="process"))
