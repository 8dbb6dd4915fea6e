"""sphinx_model/serving/caches.py: the serving caches are least-recently-used, bounded by bytes, cut a
shared prefix to its length, and key images by their content (and the model's vision config)."""
from __future__ import annotations

import pytest
import torch

from sphinx_model.processor import IMAGE_TOKEN_ID
from sphinx_model.serving.caches import ImageCache, LRUBytes, PrefixCache, position_keys


def test_lru_bytes_evicts_the_least_recently_used_and_refuses_what_cannot_fit():
    lru: LRUBytes[str] = LRUBytes(100)
    assert lru.put("a", "A", 40) and lru.put("b", "B", 40)
    assert lru.get("a") == "A"                          # a is now the most recent
    assert lru.put("c", "C", 40)                        # evicts b, not a
    assert "b" not in lru and lru.get("a") == "A" and lru.get("c") == "C" and lru.nbytes == 80
    assert not lru.put("huge", "H", 101) and "huge" not in lru and lru.nbytes == 80


def test_image_cache_is_bounded_by_the_bytes_of_its_tokens():
    cache = ImageCache(2 * 10 * 8 * 4)                  # two (10, 8) float32 sequences
    for k in range(3):
        cache.put_tokens(f"img{k}", torch.full((10, 8), float(k)))
    assert len(cache) == 2 and cache.nbytes == 640 and cache.get("img0") is None
    assert torch.equal(cache.get("img2"), torch.full((10, 8), 2.0))


def _kv(n: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).clone(),
             -torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).clone()) for _ in range(layers)]


def test_prefix_cache_returns_the_longest_shared_prefix_cut_to_its_length():
    cache = PrefixCache(1 << 20)
    cache.store((1, 2, 3, 4, 5), _kv(5))
    n, kv = cache.longest((1, 2, 3, 9, 9, 9), most=5)
    assert n == 3 and kv.get_seq_length() == 3
    assert torch.equal(kv.layers[0].keys[0, 0, :, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert cache.longest((1, 2, 3, 4, 5), most=4)[0] == 4          # at least one position is left to run
    assert cache.longest((7, 8), most=2) == (0, None)


def test_prefix_cache_keeps_one_entry_per_conversation_and_respects_its_bound():
    one = sum(t.numel() * 4 for pair in _kv(10) for t in pair)
    cache = PrefixCache(2 * one + one // 2)
    cache.store(tuple(range(5)), _kv(5))
    cache.store(tuple(range(10)), _kv(10))             # the next turn: covers the first entry
    assert len(cache) == 1 and cache.nbytes == one
    cache.store(tuple(range(100, 110)), _kv(10))
    cache.store(tuple(range(200, 210)), _kv(10))       # over the bound: the oldest goes
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.longest(tuple(range(10)) + (5,), most=10)[0] == 0


def test_a_different_image_at_the_same_placeholders_is_not_a_shared_prefix():
    ids = [1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, 8]
    a, b = position_keys(ids, ["cat"], [3]), position_keys(ids, ["dog"], [3])
    cache = PrefixCache(1 << 20)
    cache.store(a, _kv(6))
    assert cache.longest(b, most=5)[0] == 1             # BOS only: the image differs
    assert cache.longest(a, most=5)[0] == 5
    with pytest.raises(ValueError):
        position_keys(ids, ["cat"], [2])


def test_images_are_keyed_by_their_content(tmp_path, make_image):
    import io

    from sphinx_model.serving.caches import source_key

    a, b = make_image(64, 48, 1), make_image(64, 48, 1)
    assert source_key(a) == source_key(b)                    # two objects, one content
    b.putpixel((0, 0), (0, 0, 0))
    assert source_key(a) != source_key(b)                    # one pixel differs
    a.save(tmp_path / "a.png")
    assert source_key(tmp_path / "a.png") == source_key(str(tmp_path / "a.png")) != source_key(a)
    assert source_key(io.BytesIO(b"stream")) is None and source_key(tmp_path / "missing.png") is None


def test_a_keyed_image_is_opened_only_when_its_canvas_is_not_cached(tiny, make_image):
    import hashlib

    from sphinx_model.image_processing import ImageError, KeyedImage, load_image
    from sphinx_model.serving import ContinuousBatcher, EngineConfig
    from sphinx_model.serving.caches import source_key
    from sphinx_model.serving.generation import Generator

    opened = []
    picture = make_image(64, 48, 2)
    digest = hashlib.sha256(b"the stored file").hexdigest()

    def open_it():
        opened.append(1)
        return picture

    engine = ContinuousBatcher(Generator(*tiny), EngineConfig())
    try:
        first, key = engine.process_images([KeyedImage(digest, open_it)])
        again, key2 = engine.process_images([KeyedImage(digest, open_it)])   # a later turn, another tab
        plain, _ = engine.process_images([picture])
    finally:
        engine.close()
    assert len(opened) == 1 and key == key2 and torch.equal(first[0].pixels, again[0].pixels)
    assert torch.equal(first[0].pixels, plain[0].pixels)                       # the same canvas as decoded
    assert source_key(KeyedImage(digest, open_it)) != source_key(KeyedImage("0" * 64, open_it))
    with pytest.raises(ValueError):
        KeyedImage("not-a-digest", open_it)

    def gone():
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(ImageError, match="can no longer be read"):
        load_image(KeyedImage(digest, gone))
