"""Released LLaMA2-Accessory layout <-> our checkpoints, at tiny dims (CPU, no network).

The tests write their own released-layout folders with `export_accessory` from randomly
initialised models, so every conversion can be checked against the model it came from.
"""
import ast
import csv
import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from sphinx_model.config import get_preset
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import CheckpointError, build_from_config, from_pretrained
from sphinx_model.released.cli import main_convert
from sphinx_model.released.convert import (
    _empty_model,
    _map_all,
    convert_accessory,
    find_shards,
    llm_config,
    load_shard,
    merge_shards,
    permute_rotary,
    split_dim,
    unpermute_rotary,
)
from sphinx_model.released.export import export_accessory

PRESET = "sphinx-test-released"
RELEASED_KEYS = Path(__file__).resolve().parents[4] / "shared/reference/released_keys_sphinx_tiny.tsv"
TEXT = ["A chat between a curious human and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "### Human: What is in the image?", "### Assistant: A red square [0.12,0.30,0.55,0.91].",
        "Please provide the bounding box coordinate of the region this sentence describes."]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory, train_sentencepiece):
    """A Llama-style SentencePiece model (BPE, byte fallback, whitespace kept, unk/bos/eos = 0/1/2)."""
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model", TEXT, 320,
                               character_coverage=1.0)


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")) or ".norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # make norms non-trivial
    return model.eval()


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    model, _ = build_from_config(get_preset(PRESET))
    return _randomise(model)


@pytest.fixture(scope="module")
def released(tmp_path_factory, original, spm_file):
    root = tmp_path_factory.mktemp("released")
    one = export_accessory(original, spm_file, root / "one", num_shards=1)
    two = export_accessory(original, spm_file, root / "two", num_shards=2)
    return one, two


@pytest.fixture(scope="module")
def converted(tmp_path_factory, released):
    dst = tmp_path_factory.mktemp("converted") / "ckpt"
    report = convert_accessory(released[0], dst, base_preset=PRESET)
    return dst, report


def _batch(processor, size=(48, 32)):
    image = Image.new("RGB", size)
    image.putdata([((7 * i) % 256, (13 * i) % 256, (29 * i) % 256) for i in range(size[0] * size[1])])
    conv = Conversation([Message.user("What is in the image?", image=True)])
    return processor(conv, image)


# --- layout ---------------------------------------------------------------------------------
def test_export_writes_the_released_key_layout(released, original):
    sd = load_shard(find_shards(released[0])[0])
    assert {"start_img", "end_img", "tok_embeddings.weight", "output.weight", "norm.weight",
            "layers.1.attention.wk.weight", "layers.0.feed_forward.w2.weight", "visual_proj.1.bias",
            "openclip_convnext_xxl.head.norm.weight", "dinov2_vitg14.pos_embed"} <= set(sd)
    assert not any(k.startswith("llm.") for k in sd)
    halves = [load_shard(p) for p in find_shards(released[1])]
    assert halves[0]["layers.0.attention.wq.weight"].shape == (32, 64)      # column-parallel: dim 0
    assert halves[0]["layers.0.attention.wo.weight"].shape == (64, 32)      # row-parallel: dim 1
    assert halves[0]["tok_embeddings.weight"].shape == (384, 32)            # embeddings: dim 1
    assert torch.equal(halves[0]["start_img"], halves[1]["start_img"])      # replicated
    args = json.loads((released[0] / "config.json").read_text())
    hidden = int(args["ffn_dim_multiplier"] * int(2 * 4 * args["dim"] / 3))  # Meta's FFN-size formula
    hidden = args["multiple_of"] * ((hidden + args["multiple_of"] - 1) // args["multiple_of"])
    assert hidden == sd["layers.0.feed_forward.w1.weight"].shape[0]
    assert json.loads((released[0] / "meta.json").read_text()) == {"llama_type": "llama_ens_light"}


def test_two_shard_merge_equals_one_shard_bit_for_bit(released):
    notes = []
    one = load_shard(find_shards(released[0])[0])
    two = merge_shards([load_shard(p) for p in find_shards(released[1])], notes)
    assert set(one) == set(two) and not notes
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_differing_replicas_are_noted(released):
    shards = [load_shard(p) for p in find_shards(released[1])]
    shards[1]["end_img"] = shards[1]["end_img"] + 1
    notes = []
    merged = merge_shards(shards, notes)
    assert notes == ["replicated tensor llma.end_img differs between shards; rank 0's copy is used"]
    assert torch.equal(merged["end_img"], shards[0]["end_img"])


def test_converted_model_gives_identical_logits(converted, original):
    dst, report = converted
    assert report.unmapped == [] and report.missing == [] and report.mapped == len(original.state_dict())
    model, processor = from_pretrained(dst)
    assert not model.llm.config.tie_word_embeddings
    batch = _batch(processor)
    assert batch["pixel_values"].shape[0] == 1
    with torch.no_grad():
        want = original(**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_two_shard_conversion_gives_the_same_checkpoint(tmp_path, converted, released):
    convert_accessory(released[1], tmp_path / "ckpt", base_preset=PRESET)
    a, b = load_file(str(converted[0] / "model.safetensors")), load_file(str(tmp_path / "ckpt/model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_matches_sentencepiece(converted, spm_file):
    _, processor = from_pretrained(converted[0])
    tok, sp = processor.tokenizer, spm.SentencePieceProcessor(model_file=str(spm_file))
    for text in TEXT + ["ünïcode 1234 \n### Human:", "two  spaces  ", "x\n\ny", " leading", "  two leading"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert not converted[1].notes


@pytest.mark.skipif(not RELEASED_KEYS.is_file(), reason="reference key list not available")
@pytest.mark.parametrize("preset", ["sphinx-tiny", "sphinx-tiny-1k"])
def test_every_released_key_maps_with_full_size_experts(preset):
    """The authors' SPHINX-Tiny key list (tiny LLM, full-size encoders) as meta tensors."""
    with RELEASED_KEYS.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    sd = {r["key"].removeprefix("llma."): torch.empty(ast.literal_eval(r["shape"]), device="meta") for r in rows}
    assert all(split_dim(k) == (int(r["mp_split_dim"]) if r["mp_split_dim"] else None)
               for k, r in zip(sd, rows))
    notes = []
    base = get_preset(preset)
    hf = llm_config({"n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5}, sd, notes)
    config = base.replace(llm={**base.llm.__dict__, "name_or_path": None, "config": hf})
    state, unmapped = _map_all(sd, config, notes)
    own = _empty_model(config).state_dict()
    assert unmapped == [] and set(state) == set(own)
    assert all(tuple(state[k].shape) == tuple(own[k].shape) for k in own)
    assert hf["intermediate_size"] == 192 and any("mask_token" in n for n in notes)


# --- rotary: independent Meta-layout attention ----------------------------------------------
def meta_attention(x, wq, wk, wv, wo, n_heads, n_kv, theta):
    """Meta's llama attention from the math: rotary on interleaved pairs as complex numbers."""
    b, t, d = x.shape
    hd = d // n_heads
    q, k, v = (x @ wq.T).view(b, t, n_heads, hd), (x @ wk.T).view(b, t, n_kv, hd), (x @ wv.T).view(b, t, n_kv, hd)
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)      # (hd/2,)
    rot = torch.polar(torch.ones(t, hd // 2, dtype=torch.float64), torch.outer(torch.arange(t).double(), freqs))

    def rotate(z):  # (b, t, h, hd): pairs (2i, 2i+1) are one complex number
        zc = torch.view_as_complex(z.double().reshape(*z.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(zc * rot[None, :, None]).flatten(3).to(z.dtype)

    q, k = rotate(q), rotate(k)
    k, v = (z.repeat_interleave(n_heads // n_kv, dim=2) for z in (k, v))     # q head i uses kv head i // rep
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, d)
    return out @ wo.T


def test_rotary_permutation_matches_meta_attention():
    torch.manual_seed(1)
    d, n_heads, n_kv, theta, t = 64, 4, 2, 10000.0, 11
    wq, wk, wv, wo = (torch.randn(r, d) / 8 for r in (d, d * n_kv // n_heads, d * n_kv // n_heads, d))
    x = torch.randn(2, t, d)
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=n_heads, num_key_value_heads=n_kv, intermediate_size=32,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    cfg._attn_implementation = "eager"
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        attn.q_proj.weight.copy_(permute_rotary(wq, n_heads))
        attn.k_proj.weight.copy_(permute_rotary(wk, n_kv))
        attn.v_proj.weight.copy_(wv)
        attn.o_proj.weight.copy_(wo)
        cos_sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(t)[None].expand(2, t))
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        got, _ = attn(x, position_embeddings=cos_sin, attention_mask=mask)
    torch.testing.assert_close(got, meta_attention(x, wq, wk, wv, wo, n_heads, n_kv, theta), atol=1e-5, rtol=1e-5)
    assert torch.equal(unpermute_rotary(permute_rotary(wk, n_kv), n_kv), wk)
    assert not torch.equal(permute_rotary(wq, n_heads), wq)


# --- refusals and reports -------------------------------------------------------------------
def _edit_shard(folder, edit):
    path = find_shards(folder)[0]
    obj = torch.load(path, weights_only=True)
    edit(obj["model"])
    torch.save(obj, path)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_unmapped_keys_are_reported_and_refused(tmp_path, released):
    src = _copy(released[0], tmp_path / "src")

    def add(sd):
        sd["llma.bogus.weight"] = torch.zeros(3)
        sd["llma.dinov2_vitg14.mask_token"] = torch.zeros(1, 32)  # released, known unused: ignored
    _edit_shard(src, add)
    with pytest.raises(CheckpointError, match=r"llma\.bogus\.weight.*allow_unmapped"):
        convert_accessory(src, tmp_path / "out", base_preset=PRESET)
    report = convert_accessory(src, tmp_path / "out", base_preset=PRESET, allow_unmapped=True)
    assert report.unmapped == ["llma.bogus.weight"] and report.missing == []
    assert any("mask_token" in n for n in report.notes)
    from_pretrained(tmp_path / "out")


def test_missing_keys_refuse_conversion(tmp_path, released):
    src = _copy(released[0], tmp_path / "src")
    _edit_shard(src, lambda sd: sd.pop("llma.start_img"))
    with pytest.raises(CheckpointError, match="start_img"):
        convert_accessory(src, tmp_path / "out", base_preset=PRESET)
    assert not (tmp_path / "out").exists()
    report = convert_accessory(src, tmp_path / "out", base_preset=PRESET, allow_unmapped=True)
    assert report.missing == ["start_img"] and report.unmapped == []
    from_pretrained(tmp_path / "out")


def test_a_two_expert_base_refuses_four_expert_keys(tmp_path, released):
    """A base that lacks the Q-Former names the released keys it cannot place."""
    src = _copy(released[0], tmp_path / "src")
    (src / "meta.json").write_text('{"llama_type": "mixtral_sparse_ens"}')
    _edit_shard(src, lambda sd: sd.update({"llma.qformer_proj.0.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"1 released keys have no place.*llma\.qformer_proj\.0\.weight"):
        convert_accessory(src, tmp_path / "out", base_preset=PRESET)


# --- Mixtral ----------------------------------------------------------------------------------
def test_mixtral_round_trip(tmp_path, spm_file):
    moe_llm = get_preset("sphinx-test-moe").llm
    config = get_preset(PRESET).replace(llm=moe_llm.__dict__)
    torch.manual_seed(2)
    model, _ = build_from_config(config)
    model = _randomise(model)
    export_accessory(model, spm_file, tmp_path / "src", num_shards=2, llama_type="mixtral_sparse_ens")
    w1 = load_shard(find_shards(tmp_path / "src")[0])["layers.0.feed_forward.w1"]
    assert w1.shape == (4 * 96 // 2, 64)  # (experts * ffn / shards, dim)
    report = convert_accessory(tmp_path / "src", tmp_path / "out", base_preset=PRESET)
    assert report.unmapped == [] and report.missing == []
    loaded, processor = from_pretrained(tmp_path / "out")
    assert loaded.llm.config.model_type == "mixtral" and loaded.llm.config.num_local_experts == 4
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = _batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_mixtral_expert_shape_assumption_is_checked(tmp_path, spm_file):
    config = get_preset(PRESET).replace(llm=get_preset("sphinx-test-moe").llm.__dict__)
    model, _ = build_from_config(config)
    export_accessory(model, spm_file, tmp_path / "src", llama_type="mixtral_sparse_ens")
    _edit_shard(tmp_path / "src", lambda sd: sd.update(
        {"llma.layers.0.feed_forward.w2": sd["llma.layers.0.feed_forward.w2"].T.contiguous()}))
    with pytest.raises(CheckpointError, match=r"feed_forward\.w2.*mixtral_sparse layout"):
        convert_accessory(tmp_path / "src", tmp_path / "out", base_preset=PRESET)


# --- CLI ------------------------------------------------------------------------------------
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, released):
    assert main_convert([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main_convert([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "consolidated.00-of-02.model.pth").write_bytes(b"")
    assert main_convert([str(partial), str(tmp_path / "out")]) == 2
    src = _copy(released[0], tmp_path / "src")
    _edit_shard(src, lambda sd: sd.pop("llma.end_img"))
    assert main_convert([str(src), str(tmp_path / "out"), "--base-preset", PRESET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "not a folder" in err[0] and "no consolidated" in err[1] and "ranks" in err[2] and "end_img" in err[3]
    assert "Traceback" not in "".join(err)


def test_cli_converts_and_prints_the_report(tmp_path, capsys, released):
    assert main_convert([str(released[0]), str(tmp_path / "out"), "--base-preset", PRESET,
                         "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "mapped" in out and "0 unmapped, 0 missing" in out
    model, _ = from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
