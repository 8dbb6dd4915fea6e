"""Write the app's example files: scenes of the demo model's synthetic world and a sample PDF.

    python assets/examples/generate.py            (from the repository root)

Scenes come from `train.world` (the world the demo model was trained on) with a seed the
training data does not use, so the examples are new pictures of a familiar kind. The PDF has
one page with a text layer (set in a font of the world's training fonts) and one scanned
page without one. `examples.json` lists what each tab offers; the app reads only that file
and the pictures, so it never imports `train`. Everything stays well under 1 MB.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from train.world.scene import render_scene  # noqa: E402
from train.world.tasks import describe  # noqa: E402
from train.world.vocab import TRAIN_FONTS, font_paths  # noqa: E402

SEED = 2026            # not a training seed (training uses 0)
MAX_BYTES = 150_000    # per picture


def _find(pred, start: int = 0):
    for i in range(start, start + 5000):
        scene, image = render_scene(SEED, i)
        if pred(scene, image):
            buf = io.BytesIO()
            image.save(buf, format="PNG", optimize=True)
            if len(buf.getvalue()) <= MAX_BYTES:
                return i, scene, buf.getvalue()
    raise RuntimeError("no scene fits")


def _objects_only(lo: int, hi: int, tall: bool = False):
    def pred(scene, image) -> bool:
        ok = lo <= len(scene.objects) <= hi and not scene.words and scene.mark_style is None \
            and max(scene.width, scene.height) <= 640
        if tall:
            ok = ok and scene.height >= 1.6 * scene.width
        return ok and any(describe(o, scene) for o in scene.objects)
    return pred


def _words(scene, image) -> bool:
    return len(scene.words) >= 2 and len(scene.objects) <= 2 and scene.mark_style is None \
        and max(scene.width, scene.height) <= 700


def _write(name: str, data: bytes) -> str:
    (HERE / name).write_bytes(data)
    return name


def _pdf(words_png: bytes, words: list[str]) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=420, height=300)
    font = str(font_paths(TRAIN_FONTS)[0])
    page.insert_font(fontname="world", fontfile=font)
    y = 80
    for line in (words[:2], words[2:4] or ["open", "book"]):
        page.insert_text((40, y), " ".join(line), fontname="world", fontsize=34)
        y += 70
    scan = doc.new_page(width=420, height=300)      # a "scanned" page: a picture, no text layer
    scan.insert_image(scan.rect, stream=words_png)
    doc.subset_fonts()
    return doc.tobytes(garbage=4, deflate=True)


def main() -> int:
    i1, s1, png1 = _find(_objects_only(3, 5))
    i2, s2, png2 = _find(_objects_only(2, 4, tall=True))
    i3, s3, png3 = _find(_words)
    i4, s4, png4 = _find(_objects_only(3, 6), start=i1 + 1)
    phrase1 = next(p for p in (describe(o, s1) for o in s1.objects) if p)
    phrase2 = next(p for p in (describe(o, s2) for o in s2.objects) if p)
    words = [w.text for w in s3.words]
    examples = {
        "seed": SEED,
        "chat": [
            {"text": "Describe the image briefly.", "files": [_write("scene-objects.png", png1)]},
            {"text": "Detect all objects shown in the image.", "files": ["scene-marks.png"]},
            {"text": "What is the text in the image? Answer the question using a single word or phrase.",
             "files": ["scene-words.png"]},
        ],
        "grounding": [
            {"image": "scene-objects.png", "phrase": phrase1.removeprefix("the ")},
            {"image": _write("scene-tall.png", png2), "phrase": phrase2.removeprefix("the ")},
        ],
        "som": [{"image": _write("scene-marks.png", png4),
                 "question": "What is the object marked with the number 1? Answer with its color and shape."}],
        "ocr": [{"file": _write("scene-words.png", png3)},
                {"file": _write("sample.pdf", _pdf(png3, [w.lower() for w in words] + ["open", "book"]))}],
        "scenes": {n: {"index": i, "objects": len(s.objects), "words": [w.text for w in s.words]}
                   for n, i, s in (("scene-objects.png", i1, s1), ("scene-tall.png", i2, s2),
                                   ("scene-words.png", i3, s3), ("scene-marks.png", i4, s4))},
    }
    (HERE / "examples.json").write_text(json.dumps(examples, indent=2) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
    print(f"wrote {HERE} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
