"""Every released llama_type, written in the authors' layout at tiny widths (one shard and two),
converts with no unmapped and no missing key, and our logits equal the released maths computed
independently (released_reference.py) to 1e-4."""
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sphinx_model.config import get_preset
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import build_from_config, from_pretrained
from sphinx_model.processor import IMAGE_TOKEN_ID
from sphinx_model.released.convert import convert_accessory, find_shards, load_shard, merge_shards
from sphinx_model.released.export import export_accessory

sys.path.insert(0, str(Path(__file__).parent))
from released_reference import MEMBERS, reference_logits, tiny_config, write_released  # noqa: E402

TEXT = ["A chat between a curious human and an artificial intelligence assistant.",
        "### Human: What is in the image?", "### Assistant: A red square [0.12,0.30,0.55,0.91]."]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory, train_sentencepiece):
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model", TEXT, 300)


def _image() -> Image.Image:
    image = Image.new("RGB", (90, 60))
    image.putdata([((7 * i) % 256, (13 * i) % 256, (29 * i) % 256) for i in range(90 * 60)])
    return image


@pytest.mark.parametrize("llama_type", sorted(MEMBERS))
def test_released_member_converts_and_matches_the_released_maths(tmp_path, spm_file, llama_type):
    """One shard and two: the two-shard merge gives the one-shard tensors bit for bit, and the
    conversion of the two-shard folder has no unmapped / missing key and the released logits."""
    member = MEMBERS[llama_type]
    sd = write_released(member, tmp_path / "one", spm_file, shards=1)
    write_released(member, tmp_path / "two", spm_file, shards=2)
    one = load_shard(find_shards(tmp_path / "one")[0])
    notes = []
    two = merge_shards([load_shard(p) for p in find_shards(tmp_path / "two")], notes)
    assert set(one) == set(two) == set(sd) and not notes
    assert all(torch.equal(one[k], two[k]) and torch.equal(one[k], sd[k]) for k in sd)

    report = convert_accessory(tmp_path / "two", tmp_path / "ckpt", base_config=tiny_config(member))
    assert report.unmapped == [] and report.missing == [], report.lines()
    if member.four:  # the projection and text leftovers of CLIP, the Q-Former's text FFN, DINOv2's mask token
        ignored = next(n for n in report.notes if n.startswith("ignored"))
        assert "llma.clip.visual.proj" in ignored and "llma.clip.logit_scale" in ignored
        assert "intermediate.dense" in ignored and "mask_token" in ignored

    model, processor = from_pretrained(tmp_path / "ckpt")
    conv = Conversation([Message.user("What is in the image?", image=True)])
    batch = processor(conv, _image())
    ids = batch["input_ids"][0].tolist()
    image_words = ids.count(IMAGE_TOKEN_ID)
    assert image_words == member.views * (member.tokens_per_view + 2)
    with torch.no_grad():
        ours = model(**batch).logits[0, image_words:]
    want = reference_logits(member, sd, batch["pixel_values"], [i for i in ids if i != IMAGE_TOKEN_ID])
    assert ours.shape == want.shape
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_a_four_expert_model_exports_to_the_released_layout_and_back(tmp_path, spm_file):
    member = MEMBERS["mixtral_sparse_ens5"]
    torch.manual_seed(3)
    model, processor = build_from_config(tiny_config(member).replace(llm={
        **get_preset("sphinx-test-moe").llm.__dict__, "config": {**get_preset("sphinx-test-moe").llm.config,
                                                                 "rope_theta": 1e6}}))
    export_accessory(model.eval(), spm_file, tmp_path / "src", num_shards=2, llama_type=member.llama_type)
    shard = load_shard(find_shards(tmp_path / "src")[0])
    assert {"qformer_proj.0.weight", "clip.visual.conv1.weight", "qformer.query_tokens"} <= set(shard)
    report = convert_accessory(tmp_path / "src", tmp_path / "ckpt", base_config=tiny_config(member))
    assert report.unmapped == [] and report.missing == []
    loaded, _ = from_pretrained(tmp_path / "ckpt")
    batch = processor(Conversation([Message.user("What is in the image?", image=True)]), _image())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("flag, quick", [(True, True), (False, False), (None, False)])
def test_load_pretrained_visual_encoder_picks_clips_activation(tmp_path, spm_file, flag, quick):
    """config.json's load_pretrained_visual_encoder: true = the authors build CLIP with open_clip's
    openai weights, whose config uses QuickGELU; false or absent = pretrained=None, plain GELU.
    The converted model follows, and its logits are the released maths with that activation."""
    member = MEMBERS["llama_ens"]
    extra = {} if flag is None else {"load_pretrained_visual_encoder": flag}
    sd = write_released(member, tmp_path / "rel", spm_file, extra_args=extra)
    convert_accessory(tmp_path / "rel", tmp_path / "ckpt", base_config=tiny_config(member))
    model, processor = from_pretrained(tmp_path / "ckpt")
    clip = next(e for e in processor.config.experts if e.kind == "clip_vit")
    assert clip.options.get("quick_gelu", False) is quick
    conv = Conversation([Message.user("What is in the image?", image=True)])
    batch = processor(conv, _image())
    ids = batch["input_ids"][0].tolist()
    n = ids.count(IMAGE_TOKEN_ID)
    with torch.no_grad():
        ours = model(**batch).logits[0, n:]
    text = [i for i in ids if i != IMAGE_TOKEN_ID]
    want = reference_logits(member, sd, batch["pixel_values"], text, quick_gelu=quick)
    other = reference_logits(member, sd, batch["pixel_values"], text, quick_gelu=not quick)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, other, atol=1e-4, rtol=1e-4)   # the activation shows in the logits


def test_a_load_pretrained_visual_encoder_that_is_not_a_bool_is_refused(tmp_path, spm_file):
    from sphinx_model.loading import CheckpointError

    member = MEMBERS["llama_ens"]
    write_released(member, tmp_path / "rel", spm_file, extra_args={"load_pretrained_visual_encoder": "yes"})
    with pytest.raises(CheckpointError, match="load_pretrained_visual_encoder must be true or false"):
        convert_accessory(tmp_path / "rel", tmp_path / "ckpt", base_config=tiny_config(member))
    assert not (tmp_path / "ckpt").exists()
