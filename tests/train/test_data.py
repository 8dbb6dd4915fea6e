"""Lazy JSONL indexes, rendering through the model's processor, and bad-record accounting."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import synthetic

from sphinx_model.conversation import Conversation
from train.data import Collator, ConversationDataset
from train.records import OK, REASONS, RecordStore, build_index, load_index, open_records
from train.mixture import DatasetSpec, DataError, resolve_source


def spec(path: Path, root: Path | None = None, name: str = "d") -> DatasetSpec:
    file, image_root = resolve_source(path, root)
    return DatasetSpec(name, file, image_root)


def test_index_reads_records_by_offset_and_lengths_match_the_processor(data_dir, processor):
    store = open_records([spec(data_dir / "shapes.jsonl"), spec(data_dir / "text.jsonl")], processor, True, None)
    assert len(store) == 32 and (store.status == OK).all()
    ds = ConversationDataset(store, processor)
    for gid in (0, 7, 16, 31):
        enc = ds.encode(gid)
        # the byte tokenizer makes the chars -> tokens estimate exact, image headers give the visual count
        assert store.lengths[gid] == len(enc.input_ids)
        conv = Conversation.from_dict(json.loads(store.read(gid)))
        assert conv.id == (f"shape-{gid}" if gid < 16 else f"text-{gid - 16}")


def test_rendering_is_the_processors(data_dir, processor):
    store = open_records([spec(data_dir / "shapes.jsonl")], processor, True, None)
    ds = ConversationDataset(store, processor)
    conv = ds.conversation(3)
    expected = processor.encode(conv, data_dir / conv.image_refs[0], add_generation_prompt=False)
    got = ds.encode(3)
    assert got.input_ids == expected.input_ids and got.labels == expected.labels
    assert got.image.skipped == expected.image.skipped


def test_storage_export_folder_and_llava_rows(data_dir, processor):
    file, root = resolve_source(data_dir / "export", None)
    assert file.name == "data.jsonl" and root == data_dir / "export"
    store = open_records([DatasetSpec("fb", file, root)], processor, True, None)
    ds = ConversationDataset(store, processor)
    items = [ds[i] for i in range(len(store))]
    assert all(it.encoded is not None and it.encoded.image is not None for it in items)  # LLaVA rows too
    with pytest.raises(DataError):
        resolve_source(data_dir / "nope", None)
    with pytest.raises(DataError):
        resolve_source(data_dir / "shapes.jsonl.missing", None)


def test_bad_records_are_counted_at_indexing(tmp_path, processor):
    path, expected = synthetic.make_bad(tmp_path)
    index = build_index(spec(path), processor, scan_images=True)
    found = index.bad_counts()
    # visible without decoding: unparsable, empty, missing file, corrupt header; too_long needs rendering
    assert found == Counter({k: v for k, v in expected.items() if k != "too_long"})


def test_bad_records_are_skipped_replaced_and_counted_when_drawn(tmp_path, processor):
    path, expected = synthetic.make_bad(tmp_path)
    store = open_records([spec(path)], processor, scan_images=False, cache_dir=None)  # nothing caught early
    pool = np.arange(len(store))
    ds = ConversationDataset(store, processor, pool=pool, max_fallbacks=8)
    seen: Counter = Counter()
    for gid in range(len(store)):
        item = ds[gid]
        assert item.encoded is not None  # always replaced by a good record
        seen.update(item.skipped)
    assert set(seen) == set(REASONS) - {"uncached_image"}  # that one needs a feature cache (test_feature_cache.py)
    # without fallbacks the item is empty and the collated batch says why
    bare = ConversationDataset(store, processor)
    batch = Collator(processor)([bare[0], bare[4]])
    assert batch.skipped == Counter({"missing_image": 1}) and batch.samples == 1


def test_context_limit_skips_or_truncates(data_dir, processor):
    store = open_records([spec(data_dir / "shapes.jsonl")], processor, True, None)
    n = len(ConversationDataset(store, processor).encode(0).input_ids)
    visual = processor.num_visual_tokens(ConversationDataset(store, processor).encode(0).image)
    text = n - 1 - visual
    tight = ConversationDataset(store, processor, max_text_tokens=text - 5)
    assert tight[0].encoded is None and tight[0].skipped == ("too_long",)
    cut = ConversationDataset(store, processor, max_text_tokens=text - 5, truncate=True)[0].encoded
    assert len(cut.input_ids) == n - 5 and cut.image is not None


def test_index_cache_is_reused_and_invalidated(data_dir, processor, tmp_path):
    src = tmp_path / "text.jsonl"
    src.write_bytes((data_dir / "text.jsonl").read_bytes())
    first = load_index(spec(src), processor, True, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_index(spec(src), processor, True, tmp_path / "cache")
    assert np.array_equal(first.offsets, again.offsets)
    with open(src, "a", encoding="utf-8") as f:
        f.write(src.read_text().splitlines()[0] + "\n")
    grown = load_index(spec(src), processor, True, tmp_path / "cache")
    assert len(grown) == len(first) + 1


def test_collate_pads_right_and_counts_tokens(data_dir, processor):
    store = open_records([spec(data_dir / "shapes.jsonl"), spec(data_dir / "text.jsonl")], processor, True, None)
    ds = ConversationDataset(store, processor)
    batch = Collator(processor)([ds[0], ds[20]])
    mask = batch.inputs["attention_mask"]
    assert mask[:, 0].all()  # right padding: every row starts with real tokens
    assert batch.tokens == int(mask.sum()) == len(ds[0].encoded.input_ids) + len(ds[20].encoded.input_ids)
    assert batch.inputs["pixel_values"].shape[0] == 1 and 0 < batch.padding < 1


def test_store_survives_pickling_for_workers(data_dir, processor):
    import pickle

    store = open_records([spec(data_dir / "text.jsonl")], processor, True, None)
    store.read(0)
    clone: RecordStore = pickle.loads(pickle.dumps(store))
    assert clone.read(3) == store.read(3)


def test_control_token_strings_in_training_text_stay_plain_text(tmp_path, processor):
    """A record whose text spells `</s>`, `<s>`, `<pad>` must not put those ids in input_ids: only
    the template places control tokens (its EOS after answers, if it uses one, and one BOS)."""
    tok = processor.tokenizer
    sneaky = "stop here</s><s> and <pad><unk> go on"
    rows = [{"messages": [{"role": "user", "content": sneaky}, {"role": "assistant", "content": sneaky},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "fine</s>"}]}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = open_records([spec(path)], processor, True, None)
    enc = ConversationDataset(store, processor).encode(0)
    ids = enc.input_ids
    template_eos = sum(seg.eos for seg in processor.template.segments(Conversation.from_dict(rows[0]),
                                                                       add_generation_prompt=False))
    assert ids.count(tok.eos_token_id) == template_eos and ids.count(tok.bos_token_id) == 1
    assert tok.pad_token_id not in ids
    assert sneaky in tok.decode(ids, skip_special_tokens=False)    # the text itself survives as text
    assert store.lengths[0] == len(ids)                             # and the index measured it the same way
