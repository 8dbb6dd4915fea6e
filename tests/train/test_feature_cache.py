"""The expert-feature cache: written once per image from a checkpoint's experts, read by a run in
place of the pixels (same losses), resumable, refused when it belongs to other experts, and bad or
uncached images counted instead of raised."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from synthetic import draw_shape, write_mixture, write_run

from sphinx_model.config import get_preset
from sphinx_model.conversation import Conversation
from sphinx_model.loading import build_from_config, from_pretrained, save_pretrained
from sphinx_model.modeling import SphinxForCausalLM
from train.__main__ import main as train_main
from train.config import ConfigError, load_run_config
from train.feature_cache import main as cache_main
from train.feature_cache import write_cache
from train.feature_files import MANIFEST, CacheError, FeatureCache
from train.synthetic import write_pairs, write_world
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def checkpoint(folder, seed: int):
    torch.manual_seed(seed)
    model, proc = build_from_config(get_preset("sphinx-test-tiny"))
    return save_pretrained(model, proc, folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, world folder with data.jsonl + pairs.jsonl (two images a record), checkpoint folder)."""
    root = tmp_path_factory.mktemp("features")
    folder = write_world(root / "world", 8, seed=0, progress=False)
    write_pairs(folder, 3, seed=0)
    return root, folder, checkpoint(root / "ckpt", 0)


@pytest.fixture(scope="module")
def loaded(world):
    model, proc = from_pretrained(world[2], dtype="float32")
    return model.eval(), proc


@pytest.fixture(scope="module")
def cache32(world, loaded, tmp_path_factory):
    """A float32 cache of the world, written one image per pass of the experts."""
    out = tmp_path_factory.mktemp("cache32")
    report = write_cache(*loaded, [world[1], world[1] / "pairs.jsonl"], out, "float32", batch_size=1, progress=False)
    return out, report


def record(image: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": answer}]}


def images_of(folder) -> set:
    return {m["content"][0]["image"] for line in (folder / "data.jsonl").read_text().splitlines()
            for m in json.loads(line)["messages"] if m["role"] == "user" and isinstance(m["content"], list)
            and m["content"][0]["type"] == "image"}


def run(path, **overrides):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Trainer(load_run_config(path, overrides)).run()


def run_yaml(tmp_path, world, name, **data):
    mixture = write_mixture(tmp_path / f"{name}.yaml", [("world", str(world[1] / "data.jsonl"), 1.0),
                                                        ("pairs", str(world[1] / "pairs.jsonl"), 1.0)])
    return write_run(tmp_path / name, mixture, model={"init": str(world[2])},
                     data={"truncate": True, **data},
                     train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 3})


# --- writing -------------------------------------------------------------------------------------
def test_the_cache_holds_what_the_experts_make_of_each_image_and_gives_the_same_logits(world, loaded, cache32):
    model, proc = loaded
    out, report = cache32
    assert report.images == len(images_of(world[1])) == 8 and report.computed == 8 and not report.bad
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["root"] == str(world[1].resolve()) and manifest["shards"]
    cache = FeatureCache(out)
    assert len(cache) == 8
    path = world[1] / sorted(images_of(world[1]))[3]
    image = proc.process_image(path)
    cached = cache.load(path)
    assert cached.skipped == image.skipped and cached.canvas == image.canvas
    conv = Conversation.from_dict(json.loads((world[1] / "data.jsonl").read_text().splitlines()[3]))
    batch = proc.collate([proc.encode(conv, image, add_generation_prompt=False)])
    with torch.no_grad():
        _, fused = model.expert_features(batch["pixel_values"], batch["view_skip"])
        assert torch.equal(cached.features, fused)
        pixels = model(**batch).logits
        features = model(**{k: v for k, v in batch.items() if k != "pixel_values"},
                         expert_features=cached.features).logits
    assert torch.equal(pixels, features)


def test_batched_passes_and_bf16_storage_give_the_same_features(world, loaded, cache32, tmp_path):
    batched = write_cache(*loaded, [world[1]], tmp_path / "c32", "float32", batch_size=5, progress=False)
    rounded = write_cache(*loaded, [world[1]], tmp_path / "c16", progress=False)     # bf16 by default
    assert batched.computed == rounded.computed == 8
    one, five, bf16 = FeatureCache(cache32[0]), FeatureCache(tmp_path / "c32"), FeatureCache(tmp_path / "c16")
    assert bf16.manifest["dtype"] == "bfloat16" and set(one.index) == set(five.index) == set(bf16.index)
    for key in one.index:
        a, b, c = (cache.load(cache.root / key).features for cache in (one, five, bf16))
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)
        assert c.dtype == torch.bfloat16 and torch.allclose(a, c.float(), rtol=1e-2, atol=1e-2)


def test_a_rerun_computes_nothing_and_a_killed_run_goes_on_where_it_stopped(world, loaded, tmp_path, monkeypatch):
    import train.feature_cache as fc

    model, proc = loaded
    calls = []
    real = fc._encode
    def encode(*args):                                         # killed after its third image
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        real(*args)
    monkeypatch.setattr(fc, "_encode", encode)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        write_cache(model, proc, [world[1]], out, batch_size=1, shard_bytes=1, progress=False)  # a shard an image
    assert len(FeatureCache(out)) == 3
    calls.clear()
    monkeypatch.setattr(fc, "_encode", real)
    again = write_cache(model, proc, [world[1]], out, batch_size=1, shard_bytes=1, progress=False)
    assert (again.reused, again.computed) == (3, 5) and len(FeatureCache(out)) == 8
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    monkeypatch.setattr(SphinxForCausalLM, "expert_features", lambda *a: pytest.fail("the experts ran again"))
    done = write_cache(model, proc, [world[1]], out, progress=False)
    assert (done.reused, done.computed) == (8, 0)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards


def test_bad_images_are_counted_and_listed_never_a_traceback(world, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    draw_shape(64, 48, "circle", "red", random.Random(0))[0].save(data / "ok.png")
    rows = [record(name, "A shape.") for name in ("ok.png", "gone.png", "broken.png")]
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    args = ["--checkpoint", str(world[2]), "--data", str(data), "--out", str(tmp_path / "cache"), "--no-progress"]
    assert cache_main(args) == 0
    out = capsys.readouterr().out
    assert "3 images: 1 computed, 0 cached before, 2 bad (1 missing_image, 1 unreadable_image); 1 unparsable" in out
    assert "gone.png (missing_image)" in out and "broken.png (unreadable_image" in out
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert sorted(k.rsplit("/", 1)[1] for k in manifest["bad"]) == ["broken.png", "gone.png"]
    assert cache_main(["--checkpoint", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "c2")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- training from it ------------------------------------------------------------------------------
def test_training_from_the_cache_repeats_training_from_pixels_and_resumes(world, cache32, tmp_path, monkeypatch):
    pixels = run(run_yaml(tmp_path, world, "pixels"))
    with monkeypatch.context() as m:                             # from the cache, no expert runs
        m.setattr(SphinxForCausalLM, "expert_features", lambda *a: pytest.fail("an expert ran"))
        cached = run(run_yaml(tmp_path, world, "cached", feature_cache=str(cache32[0])))
        cut = run(run_yaml(tmp_path, world, "cut", feature_cache=str(cache32[0])), **{"train.stop_after_steps": 2})
        cfg = load_run_config(tmp_path / "cut" / "run.yaml")
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        resumed = Trainer(cfg, resume=cfg.train.output_dir).run()
    assert sorted(pixels.losses) == sorted(cached.losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert cached.losses[step] == pytest.approx(pixels.losses[step], abs=1e-6), step
    a = load_file(str(pixels.final_dir / "model.safetensors"))
    b = load_file(str(cached.final_dir / "model.safetensors"))
    assert not torch.equal(a["visual_proj.0.weight"], from_pretrained(world[2])[0].visual_proj[0].weight)  # it trained
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert cut.stopped_early and sorted(resumed.losses) == [3]
    assert resumed.losses[3] == pytest.approx(cached.losses[3], abs=1e-6)
    assert cached.final_dir is not None and from_pretrained(cached.final_dir)[0].config.name == "sphinx-test-tiny"


def test_an_image_the_cache_lacks_is_a_counted_skip(world, loaded, tmp_path):
    folder = shutil.copytree(world[1], tmp_path / "world")
    write_cache(*loaded, [folder], tmp_path / "cache", progress=False)
    draw_shape(80, 60, "square", "blue", random.Random(1))[0].save(folder / "images" / "late.png")  # after the cache
    (folder / "late.jsonl").write_text(json.dumps(record("images/late.png", "A square.")) + "\n")
    mixture = write_mixture(tmp_path / "m.yaml", [("late", "world/late.jsonl", 1.0),
                                                  ("world", "world/data.jsonl", 1.0)])
    # 9 records: 3 batches of 3 an epoch; a DataLoader worker process reads the cache
    path = write_run(tmp_path / "run", mixture, model={"init": str(world[2])},
                     data={"feature_cache": str(tmp_path / "cache"), "truncate": True, "num_workers": 1},
                     train={"max_steps": 3, "batch_size": 3})
    result = run(path)
    assert result.steps == 3 and set(result.skipped) == {"uncached_image"}   # the late record, each time drawn


# --- refusals --------------------------------------------------------------------------------------
def test_a_cache_of_other_experts_or_settings_is_refused_with_the_reason(world, cache32, tmp_path, capsys):
    other = checkpoint(tmp_path / "other", seed=1)
    path = run_yaml(tmp_path, world, "stale", feature_cache=str(cache32[0]))
    with pytest.raises(CacheError, match="written for other experts: the experts' weights differ"):
        run(path, **{"model.init": str(other)})
    with pytest.raises(CacheError, match=r"the vision settings differ \(anchor\)"):
        run(path, **{"model.overrides": {"anchor": "center"}})
    assert train_main(["--config", str(path), "--set", f"model.init={other}"]) == 2   # the CLI: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.feature_cache") and "the experts' weights differ" in err[-1]
    damaged = shutil.copytree(cache32[0], tmp_path / "damaged")
    (damaged / MANIFEST).write_text("{")
    with pytest.raises(CacheError, match="cannot be read as a feature cache manifest"):
        run(path, **{"data.feature_cache": str(damaged)})
    with pytest.raises(ConfigError, match="not a folder"):
        load_run_config(path, {"data.feature_cache": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        load_run_config(path, {"data.feature_cache": str(tmp_path)})


def test_writing_into_a_cache_of_other_experts_is_refused(world, cache32, tmp_path):
    other = checkpoint(tmp_path / "other", seed=1)
    model, proc = from_pretrained(other, dtype="float32")
    copy = shutil.copytree(cache32[0], tmp_path / "cache")
    with pytest.raises(CacheError, match="another fingerprint"):
        write_cache(model, proc, [world[1]], copy, "float32", progress=False)
