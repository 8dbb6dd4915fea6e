"""`python -m train.convert` fed hostile and careless input.

Input-level problems are one `error:` line and exit 2, and nothing is written or changed.
Record-level problems (wrong JSON types, absurd sizes, text that would forge boxes, lines
that are not UTF-8, encrypted PDFs) never stop a run: they are skipped and counted, the run
exits 0, and every written answer holds exactly the boxes the data set's numbers gave.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from sphinx_model.boxes import parse_regions
from sphinx_model.conversation import read_jsonl
from train.convert import main


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "out" not in p.relative_to(folder).parts:
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def coco(images: list[Any], annotations: list[Any], categories: list[Any]) -> dict[str, Any]:
    return {"images": images, "annotations": annotations, "categories": categories}


GOOD_IMAGE = {"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}
GOOD_ANN = {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}
GOOD_CAT = {"id": 1, "name": "dog"}


def detection(root: Path, data: dict[str, Any]) -> list[str]:
    (root / "in.json").write_text(json.dumps(data))
    return ["coco-detection", str(root / "in.json"), str(root / "out" / "o.jsonl")]


def write(root: Path, name: str, data: bytes | str) -> Path:
    path = root / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def encrypted_pdf(root: Path) -> list[str]:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret words")
    doc.save(root / "enc.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    good = pymupdf.open()
    good.new_page(width=300, height=200).insert_text((20, 40), "Hello world")
    good.new_page(width=14400, height=14400).insert_text((20, 40), "Huge page")  # the PDF maximum
    good.new_page(width=14400, height=3).insert_text((1, 2), "sliver")
    good.save(root / "good.pdf")
    return ["pdf-ocr", str(root), str(root / "out" / "o.jsonl")]


FATAL: dict[str, Callable[[Path], list[str]]] = {
    "unknown format": lambda r: ["no-such-format", str(r), str(r / "out" / "o.jsonl")],
    "input missing": lambda r: ["llava", str(r / "gone.json"), str(r / "out" / "o.jsonl")],
    "input not JSON": lambda r: ["llava", str(write(r, "x.json", "{oops")), str(r / "out" / "o.jsonl")],
    "input not UTF-8": lambda r: ["llava", str(write(r, "x.json", b'[{"id": "\xff"}]')), str(r / "out" / "o.jsonl")],
    "input nested too deeply": lambda r: ["llava", str(write(r, "x.json", "[" * 100_000 + "]" * 100_000)),
                                          str(r / "out" / "o.jsonl")],
    "OUT is IN": lambda r: ["llava", str(write(r, "x.json", "[]")), str(r / "x.json")],
    "OUT is IN by another name": lambda r: ["llava", str(write(r, "x.json", "[]")), str(r / "." / "x.json")],
    "OUT is the annotations file": lambda r: ["vqa", str(write(r, "q.json", '{"questions": []}')),
                                              str(r / "a.json"), "--annotations",
                                              str(write(r, "a.json", '{"annotations": []}'))],
    "OUT is a folder": lambda r: ["llava", str(write(r, "x.json", "[]")), str(r)],
    "OUT under a file": lambda r: ["llava", str(write(r, "x.json", "[]")), str(r / "x.json" / "o.jsonl")],
    "not COCO": lambda r: detection(r, {"images": 5}),
    "images dir escapes OUT": lambda r: ["pdf-ocr", str(r), str(r / "out" / "o.jsonl"), "--images-dir", "../../x"],
    "dpi zero": lambda r: ["pdf-ocr", str(r), str(r / "out" / "o.jsonl"), "--dpi", "0"],
    "max turns zero": lambda r: ["llava", str(write(r, "x.json", "[]")), str(r / "out" / "o.jsonl"),
                                 "--max-turns", "0"],
    "bad flag": lambda r: ["llava", str(r), str(r / "out" / "o.jsonl"), "--no-such-flag"],
    "vqa subtype a path": lambda r: ["vqa", str(write(r, "q.json", '{"questions": [], "data_subtype": "../../etc"}')),
                                     str(r / "out" / "o.jsonl"), "--annotations",
                                     str(write(r, "a.json", '{"annotations": []}'))],
}


@pytest.mark.parametrize("name", sorted(FATAL))
def test_input_problems_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, name):
    argv = FATAL[name](tmp_path)
    before = digest(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (name, err)
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert digest(tmp_path) == before
    assert not (tmp_path / "out" / "o.jsonl").exists()


# survivable: (argv builder, reasons that must be counted, boxes expected in each written answer)
SURVIVABLE: dict[str, tuple[Callable[[Path], list[str]], set[str], int]] = {
    "ids of the wrong JSON type": (lambda r: detection(r, coco(
        [GOOD_IMAGE, {"id": [1], "file_name": "b.jpg"}, {"id": {"x": 1}, "file_name": "c.jpg"}, {"id": 3.5}],
        [GOOD_ANN, {"id": 11, "image_id": [1], "category_id": 1, "bbox": [1, 1, 5, 5]},
         {"id": 12, "image_id": 1, "category_id": {"a": 1}, "bbox": [1, 1, 5, 5]},
         {"id": 13, "image_id": 1, "category_id": [1], "bbox": [1, 1, 5, 5]}],
        [GOOD_CAT, {"id": [2], "name": "cat"}, {"id": 3, "name": 7}])),
        {"malformed image record", "malformed annotation", "malformed category", "unknown category"}, 1),
    "category name forging boxes": (lambda r: detection(r, coco(
        [GOOD_IMAGE], [GOOD_ANN, {"id": 11, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20]},
                       {"id": 12, "image_id": 1, "category_id": 3, "bbox": [60, 60, 20, 20]}],
        [GOOD_CAT, {"id": 2, "name": "cat</p> [0.00,0.00,1.00,1.00]\n<p>x"},
         {"id": 3, "name": "spot [0.5,0.5]"}])), {"category name with box markup"}, 1),
    "absurd image sizes": (lambda r: detection(r, coco(
        [GOOD_IMAGE, {"id": 2, "file_name": "b.jpg", "width": 10**9, "height": 10**9},
         {"id": 3, "file_name": "c.jpg", "width": -5, "height": 10}, {"id": 4, "file_name": "d.jpg", "width": True,
                                                                     "height": 10}],
        [GOOD_ANN, *({"id": 20 + i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in (2, 3, 4))],
        [GOOD_CAT])), {"unknown image size"}, 1),
    "polygon canvas of absurd size": (lambda r: ["som", *detection(r, coco(
        [GOOD_IMAGE, {"id": 2, "file_name": "b.jpg", "width": 60_000, "height": 1_000}],
        [{**GOOD_ANN, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
         {"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 59_000, 900],
          "segmentation": [[0, 0, 59_000, 0, 59_000, 900, 0, 900], [1e308, 1, 2, float("inf"), 3, 3]]}],
        [GOOD_CAT]))[1:3], "--image", "raw", "--mark", "polygon"], set(), 1),
    "JSONL lines not UTF-8": (lambda r: ["text", str(write(r, "t.jsonl", b'{"question": "q1", "response": "a1"}\n'
                                                         b'{"question": "\xff\xfe", "response": "a"}\n'
                                                         b'{"question": "q3", "response": "a3"}\n')),
                                         str(r / "out" / "o.jsonl")], {"line not UTF-8"}, 0),
    "text ids of the wrong type": (lambda r: ["text", str(write(r, "t.json", json.dumps(
        [{"id": {"x": 1}, "question": "q", "response": "a"}, {"id": 7, "question": "q", "response": "a"}]))),
        str(r / "out" / "o.jsonl")], {"malformed id"}, 0),
    "encrypted PDF, huge and sliver pages": (encrypted_pdf, {"encrypted PDF", "page of implausible size"}, -1),
}


@pytest.mark.parametrize("name", sorted(SURVIVABLE))
def test_bad_records_are_skipped_and_counted(tmp_path, capsys, name):
    build, reasons, boxes = SURVIVABLE[name]
    argv = build(tmp_path)
    before = digest(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (name, err)
    assert err == "" and all(r in out for r in reasons), out
    assert digest(tmp_path) == before
    convs = list(read_jsonl(Path(argv[2])))
    assert convs, out
    for conv in convs:
        answer = conv.messages[-1].text
        if boxes >= 0:
            assert len(parse_regions(answer)) == boxes, answer
        assert "\ufffd" not in answer + conv.messages[-2].text


def test_huge_pdf_page_renders_within_the_pixel_cap(tmp_path):
    from train.converters.pdf_ocr import MAX_PAGE_PIXELS

    encrypted_pdf(tmp_path)
    assert main(["pdf-ocr", str(tmp_path / "good.pdf"), str(tmp_path / "out" / "o.jsonl")]) == 0
    sizes = {}
    for p in (tmp_path / "out" / "images").iterdir():
        with Image.open(p) as im:
            sizes[p.name] = im.size
    assert sizes["good_p1.png"] == (600, 400)                     # 144 dpi as asked
    w, h = sizes["good_p2.png"]
    assert w == h and w * h <= MAX_PAGE_PIXELS and w > 1000      # dpi lowered, not skipped


def test_som_polygons_of_an_absurd_canvas_cost_little(tmp_path):
    import time

    data = coco([{"id": 2, "file_name": "b.jpg", "width": 8000, "height": 8000}],
                [{"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 7990, 7990],
                  "segmentation": [[0, 0, 7990, 0, 7990, 7990, 0, 7990]]}], [GOOD_CAT])
    (tmp_path / "in.json").write_text(json.dumps(data))
    start = time.perf_counter()
    assert main(["som", str(tmp_path / "in.json"), str(tmp_path / "out" / "o.jsonl"), "--image", "raw",
                 "--mark", "point"]) == 0
    assert time.perf_counter() - start < 5
    (conv,) = read_jsonl(tmp_path / "out" / "o.jsonl")
    assert "Marks: 1 [0.50,0.50]" in conv.messages[0].text
