"""Batched serving through the model service: concurrent requests decode together and answer
as they would alone; a chat's next turn reuses the image and the prefix and answers the same
as without caches; the per-user cap, the global bound and the time limit end in a clear
message (shown in the chat), never a hang; the settings that set them."""
from __future__ import annotations

import threading
import time

import pytest
from apptest_support import ALICE, BOB

from app.handlers import chat
from app.handlers.common import AppContext, generation_settings
from app.launch import serving_limits
from app.service import GenerationRequest, ModelService, ServiceError, ServingLimits
from app.settings import DEMO_MODEL_DIR, AppSettings, SettingsError, parse_settings
from sphinx_model.conversation import Conversation, Message
from sphinx_model.serving.generation import GenerationSettings
from storage import open_store

EXAMPLES = DEMO_MODEL_DIR.parent / "examples"
SCENES = [str(EXAMPLES / n) for n in ("scene-objects.png", "scene-marks.png", "scene-words.png", "scene-tall.png")]
QUESTIONS = ("Describe the image briefly.", "Detect all objects shown in the image.",
             "How many objects are there?", "What is the text in the image?")


@pytest.fixture(scope="module")
def demo() -> ModelService:
    service = ModelService.load(str(DEMO_MODEL_DIR), device="cpu")
    yield service
    service.close()


def _with(service: ModelService, limits: ServingLimits) -> ModelService:
    """Another service on the same model, with other limits."""
    return ModelService(service.generator.model, service.processor, service.info, limits)


def _ask(k: int, n: int = 24, user: str | None = None) -> GenerationRequest:
    conv = Conversation([Message.user(QUESTIONS[k % 4], image=True)])
    return GenerationRequest(conv, [SCENES[k % 4]], GenerationSettings(max_new_tokens=n), user=user)


def _long(user: str | None = None, n: int = 600) -> GenerationRequest:
    return GenerationRequest(Conversation([Message.user("Tell me a long story.")]), [],
                             GenerationSettings(max_new_tokens=n), user=user)


def _until(condition, timeout: float = 10.0) -> bool:
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            return False
        time.sleep(0.005)
    return True


def test_concurrent_requests_decode_together_and_answer_as_alone(demo):
    requests = [_ask(k) for k in range(5)]
    answers: dict[int, str] = {}
    threads = [threading.Thread(target=lambda k=k: answers.__setitem__(k, demo.generate(requests[k])))
               for k in range(5)]
    before = demo.engine.stats["max_rows"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    alone = [demo.generator.generate([r.conversation], [list(r.images)], r.settings)[0] for r in requests]
    assert [answers[k] for k in range(5)] == alone and len(set(alone)) > 2
    assert demo.engine.stats["max_rows"] > max(before, 1)          # some of them shared a step
    assert all(r.first_piece_at >= r.started_at and r.latency_ms > 0 for r in requests)


def test_a_follow_up_turn_reuses_image_and_prefix_and_answers_as_without_caches(demo, tmp_path):
    off = _with(demo, ServingLimits(image_cache_mb=0, prefix_cache_mb=0))
    on = _with(demo, ServingLimits())
    transcripts = []
    try:
        for service in (on, off):
            settings = AppSettings(data_dir=tmp_path / str(id(service)), browser_secret="test-secret")
            store = open_store(settings.storage)
            ctx = AppContext(service, store, settings)
            state = chat.ChatState()
            for text, files in [(QUESTIONS[0], [SCENES[0]]), (QUESTIONS[2], []), (QUESTIONS[1], [SCENES[2]]),
                                (QUESTIONS[3], [])]:
                state = chat.submit(ctx, state, ALICE, text, files)
                state = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 24, 512)))[-1].state
            transcripts.append([t.answer for t in state.turns])
            store.dispose()
    finally:
        on.close()
        off.close()
    assert transcripts[0] == transcripts[1] and all(transcripts[0])
    assert on.engine.stats["images_encoded"] == 2                   # each image once, for all four turns
    assert on.engine.stats["reused"] > on.engine.stats["prefilled"] and off.engine.stats["reused"] == 0


def test_a_follow_up_turn_does_not_read_the_stored_picture_again(demo, tmp_path):
    settings = AppSettings(data_dir=tmp_path / "data", browser_secret="test-secret")
    store = open_store(settings.storage)
    fresh = _with(demo, ServingLimits())
    cold = _with(demo, ServingLimits())
    try:
        ctx = AppContext(fresh, store, settings)
        state = chat.submit(ctx, chat.ChatState(), ALICE, QUESTIONS[0], [SCENES[1]])
        state = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 24, 512)))[-1].state
        stored = state.turns[0].images[0].path
        stored.write_bytes(b"not a picture any more")      # the follow-up must not need the file
        state = chat.submit(ctx, state, ALICE, QUESTIONS[2], [])
        view = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 24, 512)))[-1]
        assert view.error is None and view.state.turns[-1].answer
        assert fresh.engine.stats["images_encoded"] == 1
        # a service that has not seen the picture has to read it, and says so in one line
        with pytest.raises(ServiceError, match="^a stored image can no longer be read; start a new chat$"):
            chat.submit(AppContext(cold, store, settings), view.state, ALICE, QUESTIONS[1], [])
        assert len(view.state.turns) == 2 and not view.state.busy  # the stored turns are untouched
    finally:
        fresh.close()
        cold.close()
        store.dispose()


def test_the_per_user_cap_refuses_a_second_request_of_the_same_user_only(service):
    capped = _with(service, ServingLimits(per_user=1))
    try:
        first = capped.stream(_long(ALICE))
        next(first)                                                 # Alice's first request decodes
        with pytest.raises(ServiceError, match="you already have 1 request waiting or running"):
            capped.generate(_long(ALICE, n=4))
        assert capped.generate(_long(BOB, n=4))                     # Bob is not held back by Alice
        first.close()                                               # Alice's first one ends ...
        assert capped.generate(_long(ALICE, n=4))                   # ... and she may ask again
    finally:
        capped.close()


def test_the_chat_tab_shows_the_cap_as_a_message(service, settings):
    capped = _with(service, ServingLimits(per_user=1))
    store = open_store(settings.storage)
    ctx = AppContext(capped, store, settings)
    try:
        busy = capped.stream(_long(ALICE))
        next(busy)
        state = chat.submit(ctx, chat.ChatState(), ALICE, "Hi", [])
        views = list(chat.respond(ctx, state, ALICE, generation_settings(0, 1, 8, 512)))
        assert "you already have 1 request" in views[-1].error and "\n" not in views[-1].error
        assert views[-1].state.turns == [] and views[-1].restore["text"] == "Hi"
        busy.close()
    finally:
        store.dispose()
        capped.close()


def test_the_global_bound_refuses_when_the_batch_and_the_queue_are_full(service):
    full = _with(service, ServingLimits(max_batch=1, max_waiting=1))
    try:
        running = full.stream(_long())
        next(running)                                               # decoding: the batch of one is full
        waiting = _long()
        thread = threading.Thread(target=full.generate, args=(waiting,))
        thread.start()                                              # waits for a place in the batch
        assert _until(lambda: full._in_service == 2)
        with pytest.raises(ServiceError, match=r"the model is busy \(1 requests are waiting\)"):
            full.generate(_long(n=4))
        running.close()
        full.cancel(waiting.id)
        thread.join(10)
        assert not thread.is_alive() and full.wait_idle(5)
    finally:
        full.close()


def test_a_request_over_its_time_limit_is_stopped_with_a_message(service):
    quick = _with(service, ServingLimits(timeout_s=0.3))
    try:
        request = _long(n=2000)
        t0 = time.perf_counter()
        with pytest.raises(ServiceError, match="took longer than 0.3 s and was stopped"):
            quick.generate(request)
        assert time.perf_counter() - t0 < 5 and 0 < len(request.text)
        assert quick.wait_idle(5)                                   # it left the batch: nothing hangs
        assert quick.generate(_long(n=4))                           # and the service goes on
    finally:
        quick.close()


def test_serving_flags_and_their_twins():
    s = parse_settings(["--max-batch", "16", "--user-queue", "2", "--image-cache-mb", "0"],
                       {"SPHINX_REQUEST_TIMEOUT": "90", "SPHINX_PREFIX_CACHE_MB": "64", "SPHINX_MAX_BATCH": "4",
                        "SPHINX_STREAM_INTERVAL_MS": "0"})
    assert (s.max_batch, s.user_queue, s.request_timeout, s.image_cache_mb, s.prefix_cache_mb) == (16, 2, 90, 0, 64)
    d = parse_settings([], {})
    assert (d.max_batch, d.user_queue, d.request_timeout, d.image_cache_mb, d.prefix_cache_mb) == (8, 4, 300, 256, 512)
    limits = serving_limits(s.with_(queue_size=5))
    assert limits == ServingLimits(max_batch=16, max_waiting=5, per_user=2, timeout_s=90.0,
                                   image_cache_mb=0, prefix_cache_mb=64, stream_interval_s=0.0,
                                   engine_mode="process", engine_threads=0)
    assert serving_limits(d).stream_interval_s == 0.05
    assert limits.engine().image_cache_bytes == 0 and limits.engine().prefix_cache_bytes == 64 << 20
    for bad in (["--max-batch", "0"], ["--request-timeout", "soon"], ["--image-cache-mb", "-1"],
                ["--stream-interval-ms", "-5"]):
        with pytest.raises(SettingsError):
            parse_settings(bad, {})


def test_the_engine_flag_its_twin_and_zerogpu(monkeypatch):
    assert parse_settings([], {}).engine == "process"
    s = parse_settings(["--engine-threads", "3"], {"SPHINX_ENGINE": "thread"})
    assert (s.engine, s.engine_threads) == ("thread", 3)
    assert parse_settings(["--engine", "process"], {"SPHINX_ENGINE": "thread"}).engine == "process"
    for bad in (["--engine", "gpu"], ["--engine-threads", "-1"]):
        with pytest.raises(SettingsError):
            parse_settings(bad, {})
    with pytest.raises(ValueError, match="engine_mode"):
        ServingLimits(engine_mode="fork")

    import app.zerogpu as zerogpu

    monkeypatch.setattr(zerogpu, "_spaces", lambda: object())      # `spaces` imports (as on every Space)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert serving_limits(parse_settings([], {})).engine_mode == "process"
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")                  # a ZeroGPU Space: spaces.GPU works here only
    assert serving_limits(parse_settings([], {})).engine_mode == "thread"


def test_a_reader_that_falls_behind_gets_the_same_text_in_fewer_pieces(service):
    every = _with(service, ServingLimits(stream_interval_s=0.0))    # every piece as it comes
    try:
        quick = list(every.stream(_long(n=60)))
        slow = []
        for piece in every.stream(_long(n=60)):
            slow.append(piece)
            time.sleep(0.03)                                        # tokens pile up meanwhile
    finally:
        every.close()
    assert "".join(slow) == "".join(quick) and len(slow) < len(quick)


def test_after_the_first_piece_updates_come_at_most_once_per_stream_interval(service):
    every = _with(service, ServingLimits(stream_interval_s=0.0))
    paced = _with(service, ServingLimits(stream_interval_s=0.2))
    step = paced.engine._step

    def slow_step() -> None:                                        # >= 10 ms a token: the answer takes
        time.sleep(0.01)                                            # several intervals on any machine
        step()

    paced.engine._step = slow_step
    try:
        pieces = list(every.stream(_long(n=120)))
        request, times = _long(n=120), []
        for _ in paced.stream(request):
            times.append(time.perf_counter())
    finally:
        every.close()
        paced.close()
    assert request.text == "".join(pieces) and len(pieces) > 10     # the same answer, whatever the pace
    gaps = [b - a for a, b in zip(times, times[1:-1])]              # the last one goes out when the job ends
    assert gaps and min(gaps) >= 0.19 and len(times) < len(pieces)
    assert request.first_piece_at - request.started_at < 0.2 + (times[1] - times[0])
