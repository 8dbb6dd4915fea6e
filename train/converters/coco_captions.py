"""COCO Captions (`captions_train2017.json`): every caption of an image in one dialogue.

Each caption is a turn asked with a different prompt, drawn without replacement from
`PROMPTS` by a generator seeded with (seed, image id): varied, and the same for a seed.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sphinx_model.conversation import Conversation

from .base import CommonOptions, NoOptions, Stats, dialogues, register
from .coco import load_coco

PROMPTS: tuple[str, ...] = (
    "Provide a one-sentence caption for the provided image.",
    "Describe the image concisely.",
    "Write a short caption for this image.",
    "Summarize the visual content of the image in one sentence.",
    "Give a brief description of the image.",
    "What does this image show? Answer in one sentence.",
    "Share a concise interpretation of the image provided.",
    "Render a clear and concise summary of the photo.",
)


@register("coco-captions", task="caption")
def convert_coco_captions(source: Path, common: CommonOptions, options: NoOptions,
                          stats: Stats) -> Iterator[Conversation]:
    """COCO captions JSON -> caption dialogues, one per image."""
    coco = load_coco(source, stats)
    for image_id, img in coco.images.items():
        captions = []
        for ann in coco.anns_by_image.get(image_id, []):
            text = ann.get("caption")
            if isinstance(text, str) and text.strip():
                captions.append(" ".join(text.split()))
            else:
                stats.skip("empty caption")
        if not captions:
            stats.skip("image without captions")
            continue
        ref = common.image_ref(img["file_name"])
        if common.image_missing(ref):
            stats.skip("missing image")
            continue
        yield from dialogues(_pairs(captions, common, image_id), ref, common, id=f"coco-caption-{image_id}")


def _pairs(captions: list[str], common: CommonOptions, image_id: object) -> list[tuple[str, str]]:
    rng = common.rng("coco-captions", image_id)
    prompts: list[str] = []
    while len(prompts) < len(captions):  # without replacement, refilled if there are more captions
        prompts += rng.sample(PROMPTS, len(PROMPTS))
    return list(zip(prompts, captions))
