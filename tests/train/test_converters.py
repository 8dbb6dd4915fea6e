"""Dataset converters: each format on tiny hand-made files in its public layout.

Box strings are recomputed here with `sphinx_model.boxes` + `tiling.canvas_geometry` for
both anchors (and a few are written out literally), so a converter that drifts from THE box
format fails. Images are small PIL drawings; PDFs are made with PyMuPDF itself.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sphinx_model.boxes import box_to_text, format_named, pixels_to_canvas
from sphinx_model.conversation import Conversation, read_jsonl
from sphinx_model.tiling import ANCHORS, canvas_geometry
from train.converters import REGISTRY, CommonOptions, ConvertError, convert, register
from train.converters.coco_captions import PROMPTS
from train.converters.coco_detection import DETECT_PROMPT, DetectionOptions
from train.converters.pdf_ocr import READ_PROMPT, SPOT_PROMPTS, PdfOcrOptions, text_problem
from train.converters.refcoco import GROUND_PROMPT, REGION_PROMPT, RefcocoOptions
from train.converters.som import DESCRIBE_PROMPT, SomOptions
from train.converters.vqa import SHORT_ANSWER, VqaOptions, most_common

REPO = Path(__file__).resolve().parents[2]


# --- helpers -----------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def make_image(path: Path, size: tuple[int, int], color: tuple[int, int, int] = (40, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def qa(conv: Conversation) -> list[tuple[str, str]]:
    """(user text, assistant text) pairs of a dialogue."""
    turns = [m for m in conv.messages if m.role != "system"]
    return [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns), 2)]


def run(fmt: str, source: Path, out: Path, options: Any = None, **common: Any) -> tuple[Any, list[Conversation]]:
    stats = convert(fmt, source, out, CommonOptions(**common), options)
    convs = list(read_jsonl(out))
    assert stats.written == len(convs)
    for c in convs:
        c.validate(for_training=True)
        assert c.task
    return stats, convs


def xywh(b: list[float]) -> tuple[float, float, float, float]:
    return (b[0], b[1], b[0] + b[2], b[1] + b[3])


# --- registry ----------------------------------------------------------------------------
def test_registry_knows_every_format_and_refuses_duplicates() -> None:
    assert set(REGISTRY.names()) == {"llava", "coco-captions", "coco-detection", "refcoco", "vqa",
                                     "text", "pdf-ocr", "som"}
    with pytest.raises(ValueError):
        register("llava", task="x")(lambda *a: iter(()))
    with pytest.raises(ConvertError):
        REGISTRY.get("no-such-format")


# --- llava -------------------------------------------------------------------------------
def test_llava(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_image(root / "coco/1.jpg", (32, 32))
    records = [
        {"id": "a", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "m", "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "e", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]},
        {"id": "x", "conversations": "not a list"},
        {"id": "s", "conversations": [{"from": "alien", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "u", "conversations": [{"from": "human", "value": "Q"}]},
        "garbage",
    ]
    stats, convs = run("llava", write_json(tmp_path / "llava.json", records), tmp_path / "out.jsonl",
                       image_root=root, image_prefix="coco/")
    assert [c.id for c in convs] == ["a", "t"]
    assert convs[0].task == "llava" and convs[0].image_refs == ["coco/1.jpg"]
    assert qa(convs[0]) == [("What is this?", "A square."), ("Colour?", "Blue.")]
    assert not convs[1].has_image and qa(convs[1]) == [("Hi", "Hello!")]
    assert stats.skipped == {"missing image": 1, "empty answer": 1, "malformed record": 3, "invalid dialogue": 1}


# --- coco captions -----------------------------------------------------------------------
def captions_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "captions.json", {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "2.jpg", "width": 64, "height": 48},
                   {"id": 3, "file_name": "3.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A dog  runs.\n"},
                        {"id": 11, "image_id": 1, "caption": "A brown dog on grass."},
                        {"id": 12, "image_id": 1, "caption": "Dog playing."},
                        {"id": 13, "image_id": 2, "caption": "A cat."},
                        {"id": 14, "image_id": 2, "caption": "   "},
                        {"id": 15, "image_id": 99, "caption": "orphan"}]})


def test_coco_captions(tmp_path: Path) -> None:
    src = captions_file(tmp_path)
    stats, convs = run("coco-captions", src, tmp_path / "a.jsonl")
    assert [c.image_refs for c in convs] == [["1.jpg"], ["2.jpg"]]
    assert all(c.task == "caption" for c in convs)
    pairs = qa(convs[0])
    assert [a for _, a in pairs] == ["A dog runs.", "A brown dog on grass.", "Dog playing."]
    prompts = [q for q, _ in pairs]
    assert set(prompts) <= set(PROMPTS) and len(set(prompts)) == 3  # varied within a dialogue
    assert stats.skipped == {"empty caption": 1, "image without captions": 1, "annotation of unknown image": 1}
    # deterministic per seed; another seed changes the prompts somewhere
    run("coco-captions", src, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    others = {run("coco-captions", src, tmp_path / f"s{s}.jsonl", seed=s)[1][0].messages[0].text for s in range(6)}
    assert len(others) > 1


# --- coco detection ----------------------------------------------------------------------
DOG1, DOG2, CAT, OUTSIDE = [20, 10, 40, 30], [120, 50, 30, 40], [60, 5, 20, 20], [180, 80, 50, 50]


def detection_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "instances.json", {
        "images": [{"id": 1, "file_name": "wide.jpg", "width": 200, "height": 100},
                   {"id": 2, "file_name": "empty.jpg", "width": 50, "height": 50},
                   {"id": 3, "file_name": "nosize.jpg"}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": DOG2, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": CAT, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": DOG1, "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": OUTSIDE, "iscrowd": 0},  # clipped to the image
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, "x", 5]},
            {"id": 8, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
            {"id": 10, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 11, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]}]})


@pytest.mark.parametrize("anchor", ANCHORS)
def test_coco_detection(tmp_path: Path, anchor: str) -> None:
    stats, convs = run("coco-detection", detection_file(tmp_path), tmp_path / "det.jsonl", anchor=anchor)
    assert len(convs) == 1 and convs[0].task == "detection" and convs[0].image_refs == ["wide.jpg"]
    canvas = canvas_geometry(200, 100, anchor)
    clipped = (180, 80, 200, 100)
    expected = "\n".join([  # reading order: categories by their first (top-most) box
        format_named("cat", [pixels_to_canvas(xywh(CAT), canvas), pixels_to_canvas(clipped, canvas)]),
        format_named("dog", [pixels_to_canvas(xywh(DOG1), canvas), pixels_to_canvas(xywh(DOG2), canvas)])])
    assert qa(convs[0]) == [(DETECT_PROMPT, expected)]
    literal = {"top-left": "<p>dog</p> [0.10,0.05,0.30,0.20];[0.60,0.25,0.75,0.45]",
               "center": "<p>dog</p> [0.10,0.30,0.30,0.45];[0.60,0.50,0.75,0.70]"}[anchor]
    assert expected.splitlines()[1] == literal
    assert stats.skipped == {"crowd annotation": 2, "degenerate box": 2, "unknown category": 1,
                             "annotation of unknown image": 1, "image without objects": 1,
                             "unknown image size": 1}


def test_coco_detection_sizes_from_files_and_caps(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_image(root / "nosize.jpg", (60, 120))  # size read from the file when the record lacks it
    make_image(root / "wide.jpg", (200, 100))
    stats, convs = run("coco-detection", detection_file(tmp_path), tmp_path / "det.jsonl",
                       DetectionOptions(max_objects=1), image_root=root, anchor="center")
    assert [c.image_refs[0] for c in convs] == ["wide.jpg", "nosize.jpg"]
    assert qa(convs[0])[0][1] == format_named("cat", [pixels_to_canvas(xywh(CAT), canvas_geometry(200, 100, "center"))])
    assert qa(convs[1])[0][1] == "<p>dog</p> " + box_to_text((1, 1, 6, 6), canvas_geometry(60, 120, "center"))
    assert stats.skipped["object over --max-objects"] == 3 and stats.skipped["missing image"] == 1


# --- refcoco -----------------------------------------------------------------------------
INSTANCES = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 100, "height": 200}],
             "annotations": [{"id": 50, "image_id": 5, "category_id": 1, "bbox": [10, 20, 30, 40]}],
             "categories": [{"id": 1, "name": "person"}]}
REFS = [
    {"ref_id": 0, "image_id": 5, "ann_id": 50, "split": "train",
     "sentences": [{"sent": "man on the left", "raw": "Man on the left."}, {"sent": "left guy"}]},
    {"ref_id": 1, "image_id": 5, "bbox": [50, 100, 40, 60], "split": "train", "sentences": ["the red car."]},
    {"ref_id": 2, "image_id": 5, "ann_id": 50, "split": "testA", "sentences": [{"sent": "held out"}]},
    {"ref_id": 3, "image_id": 5, "ann_id": 50, "split": "train", "sentences": [{"sent": " "}]},
    {"ref_id": 4, "image_id": 6, "ann_id": 50, "split": "train", "sentences": [{"sent": "x"}]},
    {"ref_id": 5, "image_id": 5, "ann_id": 999, "split": "train", "sentences": [{"sent": "no box"}]},
]


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("layout", ["list+instances", "single"])
def test_refcoco(tmp_path: Path, anchor: str, layout: str) -> None:
    if layout == "single":
        src, options = write_json(tmp_path / "refcoco.json", {"refs": REFS, **INSTANCES}), RefcocoOptions()
    else:
        src = write_json(tmp_path / "refs.json", REFS)
        options = RefcocoOptions(instances=write_json(tmp_path / "instances.json", INSTANCES))
    stats, convs = run("refcoco", src, tmp_path / "ref.jsonl", options, anchor=anchor)
    canvas = canvas_geometry(100, 200, anchor)
    b0, b1 = box_to_text((10, 20, 40, 60), canvas), box_to_text((50, 100, 90, 160), canvas)
    assert b0 == {"top-left": "[0.05,0.10,0.20,0.30]", "center": "[0.30,0.10,0.45,0.30]"}[anchor]
    ground, describe = convs
    assert ground.task == describe.task == "grounding"
    assert ground.image_refs == ["COCO_train2014_000000000005.jpg"]
    assert qa(ground) == [(GROUND_PROMPT.format("man on the left"), b0), (GROUND_PROMPT.format("left guy"), b0),
                          (GROUND_PROMPT.format("the red car"), b1)]
    assert GROUND_PROMPT.format("left guy") == \
        "Please provide the bounding box coordinate of the region this sentence describes: left guy."
    (q0, a0), (q1, a1) = qa(describe)
    assert (q0, q1) == (REGION_PROMPT.format(b0), REGION_PROMPT.format(b1))
    assert a0 in {"man on the left", "left guy"} and a1 == "the red car."
    assert stats.skipped == {"ref of another split": 1, "ref without sentences": 1,
                             "ref of unknown image": 1, "ref without box": 1}


def test_refcoco_all_splits_and_missing_instances(tmp_path: Path) -> None:
    stats, convs = run("refcoco", write_json(tmp_path / "r.json", {"refs": REFS, **INSTANCES}),
                       tmp_path / "o.jsonl", RefcocoOptions(split="all"))
    assert len(qa(convs[0])) == 4 and "ref of another split" not in stats.skipped
    with pytest.raises(ConvertError, match="--instances"):
        convert("refcoco", write_json(tmp_path / "refs.json", REFS), tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


# --- vqa ---------------------------------------------------------------------------------
def vqav2_files(tmp_path: Path) -> tuple[Path, Path]:
    def answers(*words: str) -> list[dict[str, Any]]:
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
        {"image_id": 42, "question": "How many  people?", "question_id": 421},
        {"image_id": 7, "question": "Is it raining?", "question_id": 70},
        {"image_id": 7, "question": "Orphan?", "question_id": 71},
        {"image_id": 7, "question_id": 72}]}
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red",
         "answers": answers("red", "red", "dark red", "red", "maroon", "red", "red", "red", "red", "red")},
        {"question_id": 421, "image_id": 42, "multiple_choice_answer": "3",  # tie 2:2, prefer the official one
         "answers": answers("2", "3", "2", "3")},
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "no", "answers": answers("", " ")}]}
    return write_json(tmp_path / "q.json", questions), write_json(tmp_path / "a.json", annotations)


@pytest.mark.parametrize("swapped", [False, True])
def test_vqa_vqav2(tmp_path: Path, swapped: bool) -> None:
    q, a = vqav2_files(tmp_path)
    src, other = (a, q) if swapped else (q, a)
    stats, convs = run("vqa", src, tmp_path / "v.jsonl", VqaOptions(annotations=other))
    assert len(convs) == 2 and convs[0].task == "vqa"
    assert convs[0].image_refs == ["COCO_val2014_000000000042.jpg"]
    assert qa(convs[0]) == [(f"What color is the bus?\n{SHORT_ANSWER}", "red"), (f"How many people?\n{SHORT_ANSWER}", "3")]
    assert qa(convs[1]) == [(f"Is it raining?\n{SHORT_ANSWER}", "no")]  # no usable answers: the official one
    assert stats.skipped == {"question without annotation": 1, "malformed record": 1}


def test_vqa_gqa_generic_and_errors(tmp_path: Path) -> None:
    gqa = {"201": {"imageId": "n1", "question": "Is the cup empty?", "answer": "yes", "fullAnswer": "Yes."},
           "202": {"imageId": "n1", "question": "What is on the table?", "answer": "cup"},
           "203": {"imageId": "n2", "question": "Which side?", "answer": ""}}
    stats, convs = run("vqa", write_json(tmp_path / "gqa.json", gqa), tmp_path / "g.jsonl",
                       VqaOptions(suffix=""), max_turns=1)
    assert [c.id for c in convs] == ["vqa-n1.jpg#0", "vqa-n1.jpg#1"]  # split at --max-turns
    assert [qa(c) for c in convs] == [[("Is the cup empty?", "yes")], [("What is on the table?", "cup")]]
    assert stats.skipped == {"empty answer": 1}

    root = tmp_path / "imgs"
    make_image(root / "doc.png", (20, 20))
    generic = [{"image": "doc.png", "question": "What is the title?", "answers": ["Report", "report", "Report"]},
               {"image": "doc.png", "question": "Total?", "answer": "12"},
               {"image": "gone.png", "question": "Q?", "answer": "A"},
               {"question": "no image", "answer": "A"}]
    lines = "\n".join(json.dumps(r) for r in generic) + "\n{broken json\n"
    (tmp_path / "gen.jsonl").write_text(lines)
    for src in (write_json(tmp_path / "gen.json", generic), tmp_path / "gen.jsonl"):  # JSON and JSONL alike
        stats, convs = run("vqa", src, tmp_path / "o.jsonl", VqaOptions(suffix=""), image_root=root)
        assert len(convs) == 1 and qa(convs[0]) == [("What is the title?", "Report"), ("Total?", "12")]
        assert stats.skipped["missing image"] == 1 and stats.skipped["malformed record"] == 1
    assert stats.skipped["malformed JSON line"] == 1

    with pytest.raises(ConvertError, match="recognised VQA"):
        convert("vqa", write_json(tmp_path / "odd.json", {"foo": 1}), tmp_path / "x.jsonl")
    q, _ = vqav2_files(tmp_path)
    with pytest.raises(ConvertError, match="--annotations"):
        convert("vqa", q, tmp_path / "x.jsonl")
    assert most_common(["a", "b", "b", "a"]) == "a" and most_common(["a", "b", "b"]) == "b"


# --- text --------------------------------------------------------------------------------
def test_text_forms(tmp_path: Path) -> None:
    records = [
        {"id": "sg", "conversations": [{"from": "gpt", "value": "stray greeting"},
                                       {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                       {"from": "human", "value": "unanswered"}]},
        {"prompt_id": "uc200k", "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": "4"}]},
        {"id": 3, "data": ["q1", "a1", "q2", "a2"]},
        {"system_prompt": "You are helpful.", "question": "Capital of France?", "response": "Paris."},
        {"query": "1+1?", "response": "2"},
        {"instruction": "Add.", "input": "3 and 4", "output": "7"},
        {"conversations": [{"from": "martian", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q again"},
                           {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        {"nothing": "here"},
        {"conversations": [{"from": "gpt", "value": "only me"}]},
    ]
    lines = "\n".join(json.dumps(r) for r in records) + "\nnot json\n"
    (tmp_path / "t.jsonl").write_text(lines)
    stats, convs = run("text", tmp_path / "t.jsonl", tmp_path / "out.jsonl")
    assert all(c.task == "text" and not c.has_image for c in convs)
    assert [c.id for c in convs] == ["sg", "uc200k", "3", "text-3", "text-4", "text-5"]
    assert qa(convs[0]) == [("Hi", "Hello")]
    assert convs[1].messages[0].role == "system" and qa(convs[1]) == [("2+2?", "4")]
    assert qa(convs[2]) == [("q1", "a1"), ("q2", "a2")]
    assert convs[3].messages[0].text == "You are helpful." and qa(convs[3]) == [("Capital of France?", "Paris.")]
    assert qa(convs[4]) == [("1+1?", "2")] and qa(convs[5]) == [("Add.\n\n3 and 4", "7")]
    assert stats.skipped == {"unknown speaker": 1, "invalid dialogue": 1, "empty answer": 1,
                             "unrecognised record": 1, "no answered turn": 1, "malformed JSON line": 1}
    # a JSON list (ShareGPT dumps are one big list) reads the same
    stats2, convs2 = run("text", write_json(tmp_path / "t.json", records), tmp_path / "out2.jsonl")
    assert [c.to_dict() for c in convs2] == [c.to_dict() for c in convs]


# --- pdf-ocr -----------------------------------------------------------------------------
_PUA_CMAP = """/CIDInit /ProcSet findresource begin 12 dict begin begincmap
/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def
/CMapName /Adobe-Identity-UCS def /CMapType 2 def
1 begincodespacerange <00> <FF> endcodespacerange
1 beginbfrange <20> <7E> <E000> endbfrange
endcmap CMapName currentdict /CMap defineresource pop end end"""


def make_pdf(path: Path) -> None:
    """Page 1: two lines of text; page 2: text whose font maps to private-use code points
    (what fonts without a usable Unicode map give); page 3: empty."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=300, height=200)
    page.insert_text((20, 50), "Hello world foo", fontsize=12)
    page.insert_text((20, 80), "second line", fontsize=12)
    broken = doc.new_page(width=300, height=200)
    broken.insert_text((20, 50), "garbled glyphs here", fontsize=12, fontname="cour")
    doc.new_page(width=300, height=200)
    font_xref = next(f[0] for f in doc[1].get_fonts() if f[4] == "cour")
    cmap = doc.get_new_xref()
    doc.update_object(cmap, "<<>>")
    doc.update_stream(cmap, _PUA_CMAP.encode())
    doc.xref_set_key(font_xref, "ToUnicode", f"{cmap} 0 R")
    doc.save(path)


@pytest.mark.parametrize("anchor", ANCHORS)
def test_pdf_ocr(tmp_path: Path, anchor: str) -> None:
    import pymupdf

    pdfs = tmp_path / "pdfs"
    (pdfs / "sub").mkdir(parents=True)
    make_pdf(pdfs / "doc.pdf")
    make_pdf(pdfs / "sub" / "more.pdf")
    (pdfs / "corrupt.pdf").write_bytes(b"not a pdf")
    out = tmp_path / "out" / "ocr.jsonl"
    stats, convs = run("pdf-ocr", pdfs, out, PdfOcrOptions(dpi=72), anchor=anchor)
    assert stats.skipped == {"page with control/private-use characters": 2, "page without text": 2,
                             "unreadable PDF": 1}
    assert [c.id for c in convs] == ["pdf-doc_p1-read", "pdf-doc_p1-spot", "pdf-sub__more_p1-read",
                                     "pdf-sub__more_p1-spot"]
    read, spot = convs[:2]
    assert read.task == spot.task == "ocr" and read.image_refs == spot.image_refs == ["images/doc_p1.png"]
    with Image.open(out.parent / "images/doc_p1.png") as im:
        assert im.size == (300, 200)  # 72 dpi: one pixel per point
    assert qa(read) == [(READ_PROMPT, "Hello world foo\nsecond line")]
    canvas = canvas_geometry(300, 200, anchor)
    words = pymupdf.open(pdfs / "doc.pdf")[0].get_text("words")
    expected = "\n".join(f"<p>{w[4]}</p> {box_to_text(w[:4], canvas)}" for w in words)
    assert qa(spot) == [(SPOT_PROMPTS["word"], expected)]
    assert spot.messages[1].text.splitlines()[0].startswith("<p>Hello</p> [0.07,")


def test_pdf_ocr_scale_lines_and_cap(tmp_path: Path) -> None:
    import pymupdf

    make_pdf(tmp_path / "doc.pdf")
    stats, convs = run("pdf-ocr", tmp_path / "doc.pdf", tmp_path / "o.jsonl",
                       PdfOcrOptions(dpi=144, unit="line", max_words=1, images_dir="pages"))
    with Image.open(tmp_path / "pages/doc_p1.png") as im:
        assert im.size == (600, 400)
    words = pymupdf.open(tmp_path / "doc.pdf")[0].get_text("words")
    first = [w for w in words if w[5:7] == words[0][5:7]]
    box = (min(w[0] for w in first) * 2, min(w[1] for w in first) * 2, max(w[2] for w in first) * 2,
           max(w[3] for w in first) * 2)
    assert qa(convs[1]) == [(SPOT_PROMPTS["line"], f"<p>Hello world foo</p> {box_to_text(box, canvas_geometry(600, 400, 'top-left'))}")]
    assert stats.skipped["line over --max-words"] == 1


def test_pdf_ocr_rotated_page(tmp_path: Path) -> None:
    """PyMuPDF extracts words in unrotated page space; the rendered page is rotated."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=300, height=200)
    page.insert_text((20, 50), "Hello", fontsize=12)
    page.set_rotation(90)
    doc.save(tmp_path / "rot.pdf")
    _, convs = run("pdf-ocr", tmp_path / "rot.pdf", tmp_path / "o.jsonl", PdfOcrOptions(dpi=72))
    with Image.open(tmp_path / "images/rot_p1.png") as im:
        assert im.size == (200, 300)
    # "Hello" spans x 20..47, y 37..54 unrotated -> x 146..163, y 20..47 after a 90 degree turn
    assert qa(convs[1])[0][1] == "<p>Hello</p> [0.49,0.07,0.54,0.16]"


def test_text_problem() -> None:
    assert text_problem("Hello world", 0.1) is None
    assert text_problem("  \n ", 0.1) == "page without text"
    assert text_problem("Hello \ufffd world", 0.1) == "page with replacement characters"
    assert text_problem("ab\x01\x02\x03", 0.1) == "page with control/private-use characters"
    assert text_problem("a long clean line with one \ue000", 0.1) is None


# --- set-of-mark -------------------------------------------------------------------------
def som_files(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    make_image(root / "scene.jpg", (160, 120), (200, 200, 200))
    ann = write_json(tmp_path / "som.json", {
        "images": [{"id": 1, "file_name": "scene.jpg", "width": 160, "height": 120},
                   {"id": 2, "file_name": "absent.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40],
             "segmentation": [[10, 10, 60, 10, 60, 50, 10, 50]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [80, 60, 60, 50],
             "segmentation": [[80, 60, 140, 60, 110, 110]], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [100, 5, 40, 30], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 160, 120],
             "segmentation": {"counts": "xyz", "size": [120, 160]}, "iscrowd": 1}]})
    return ann, root


def parse_describe(text: str) -> dict[int, tuple[str, str]]:
    items = [re.fullmatch(r"(\d+): (\w+) (\[[^\]]+\])", s) for s in text.split("; ")]
    assert all(items), text
    return {int(m.group(1)): (m.group(2), m.group(3)) for m in items}  # type: ignore[union-attr]


@pytest.mark.parametrize("anchor", ANCHORS)
def test_som_marked_boxes(tmp_path: Path, anchor: str) -> None:
    ann, root = som_files(tmp_path)
    out = tmp_path / "out" / "som.jsonl"
    stats, convs = run("som", ann, out, SomOptions(mark="box"), image_root=root, anchor=anchor)
    assert stats.skipped == {"crowd annotation": 1, "missing image": 1}
    (conv,) = convs
    assert conv.task == "som" and conv.image_refs == ["images/scene_som.jpg"]
    canvas = canvas_geometry(160, 120, anchor)
    pairs = qa(conv)
    assert pairs[-1][0] == DESCRIBE_PROMPT
    marks = parse_describe(pairs[-1][1])
    assert sorted(marks) == [1, 2, 3]
    assert sorted(marks.values()) == sorted([("dog", box_to_text((10, 10, 60, 50), canvas)),
                                             ("cat", box_to_text((80, 60, 140, 110), canvas)),
                                             ("dog", box_to_text((100, 5, 140, 35), canvas))])
    for q, a in pairs[:-1]:
        if m := re.fullmatch(r"What is mark (\d+)\?", q):
            assert a == marks[int(m.group(1))][0]
        else:
            name = re.fullmatch(r"Which mark is the (\w+)\?", q).group(1)  # type: ignore[union-attr]
            assert a == ", ".join(str(k) for k, (n, _) in sorted(marks.items()) if n == name)
    assert len(pairs) == 3 + 2 + 1  # 3 "what", 2 "which" (two categories), describe
    with Image.open(out.parent / "images/scene_som.jpg") as marked, Image.open(root / "scene.jpg") as raw:
        assert marked.size == raw.size
        diff = np.abs(np.asarray(marked.convert("L"), dtype=int) - np.asarray(raw.convert("L"), dtype=int))
        assert diff.max() > 50  # marks were drawn


def test_som_polygons_points_raw_and_determinism(tmp_path: Path) -> None:
    ann, root = som_files(tmp_path)
    stats, convs = run("som", ann, tmp_path / "p.jsonl", SomOptions(mark="polygon"), image_root=root)
    assert stats.skipped["annotation without polygon"] == 1
    assert len(parse_describe(qa(convs[0])[-1][1])) == 2
    assert (tmp_path / "images/scene_som.jpg").is_file()

    # same seed -> same file; raw mode: original image, marks listed in text at their points
    a = run("som", ann, tmp_path / "r1.jsonl", SomOptions(mark="point", image="raw"), image_root=root)[1]
    run("som", ann, tmp_path / "r2.jsonl", SomOptions(mark="point", image="raw"), image_root=root)
    assert (tmp_path / "r1.jsonl").read_text() == (tmp_path / "r2.jsonl").read_text()
    (conv,) = a
    assert conv.image_refs == ["scene.jpg"]
    intro = conv.messages[0].text.split("\n")[0]
    canvas = canvas_geometry(160, 120, "top-left")
    points = dict(re.findall(r"(\d+) (\[[^\]]+\])", intro))
    marks = parse_describe(qa(conv)[-1][1])
    box_of = {box_to_text((100, 5, 140, 35), canvas): box_to_text((120, 20), canvas)}  # box-only: its centre
    for k, (name, box) in marks.items():
        if box in box_of:
            assert points[str(k)] == box_of[box]
    assert {len(p.split(",")) for p in points.values()} == {2}
    seeds = {run("som", ann, tmp_path / f"s{s}.jsonl", SomOptions(image="raw"), seed=s)[1][0].messages[-1].text
             for s in range(5)}
    assert len(seeds) > 1  # numbering varies with the seed


# --- CLI ---------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "train.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "det.jsonl"
    done = cli("coco-detection", str(detection_file(tmp_path)), str(out), "--anchor", "center", "--max-objects", "2")
    assert done.returncode == 0, done.stderr
    assert "written 1" in done.stdout and "crowd annotation: 2" in done.stdout
    (conv,) = read_jsonl(out)
    canvas = canvas_geometry(200, 100, "center")
    assert qa(conv)[0][1] == format_named("cat", [pixels_to_canvas(xywh(CAT), canvas)]) + "\n" + \
        format_named("dog", [pixels_to_canvas(xywh(DOG1), canvas)])

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    for args in (("coco-detection", str(bad), str(out)), ("nope", "a", "b"),
                 ("vqa", str(tmp_path / "missing.json"), str(out)), ("som", str(bad), str(out), "--mark", "star")):
        done = cli(*args)
        assert done.returncode == 2, args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr
