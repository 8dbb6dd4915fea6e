"""Conversations + images -> model inputs (the transformers-style processor).

The processor owns everything that happens before tensors reach the model: image
sanitising, the padded canvas, which views are skipped, the chat template and the
placeholder positions of the visual tokens. The number of placeholders comes from
`tiling.visual_token_count`, the same function the model uses to check them.

A conversation carries no image, one, or several (one per image part, in order of
appearance; at most `config.max_images`). Image 0's tokens sit right after BOS, later ones
where their image parts are (see templates.py). In a batch, `pixel_values` / `view_skip`
hold every image of every row, row by row, each row's in sequence order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import SphinxConfig
from .conversation import Conversation
from .image_processing import canvas_tensor, load_image
from .templates import IGNORE_INDEX, get_template, tokenize_segments
from .tiling import Canvas, canvas_geometry, skipped_views, visual_token_count

IMAGE_TOKEN_ID = -200  # placeholder id in input_ids; replaced by visual embeddings, never looked up


class PromptTooLongError(ValueError):
    """The rendered conversation does not fit the model's context."""


class TooManyImagesError(ValueError):
    """A conversation holds more images than the model's `max_images`."""


@dataclass
class ProcessedImage:
    pixels: torch.Tensor      # (3, canvas, canvas), CLIP-normalised
    canvas: Canvas            # geometry in original pixels (for mapping boxes back)
    skipped: list[bool]       # per view, in tiling.view_boxes order

    @property
    def num_encoded_views(self) -> int:
        return sum(not s for s in self.skipped)


@dataclass
class Encoded:
    """One tokenised sample, before batching; `images` in sequence order."""

    input_ids: list[int]
    labels: list[int]
    images: list[ProcessedImage] = field(default_factory=list)

    def __post_init__(self) -> None:  # `Encoded(ids, labels, one_image_or_None)` as before
        if self.images is None:
            self.images = []
        elif isinstance(self.images, ProcessedImage):
            self.images = [self.images]
        else:
            self.images = list(self.images)

    @property
    def image(self) -> ProcessedImage | None:
        """The first image (the one after BOS), or None."""
        return self.images[0] if self.images else None


class SphinxProcessor:
    def __init__(self, config: SphinxConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.template = get_template(config.template)

    # --- images ------------------------------------------------------------------------
    def process_image(self, image: Any) -> ProcessedImage:
        """Path / bytes / PIL image -> canvas tensor + geometry + skip decisions."""
        pil = load_image(image, max_pixels=self.config.max_pixels)
        pixels, canvas = canvas_tensor(pil, self.config.anchor, self.config.canvas_size)
        return ProcessedImage(pixels, canvas, self.skipped_views(canvas))

    def skipped_views(self, canvas: Canvas) -> list[bool]:
        return skipped_views(canvas, self.config.grid, self.config.skip_tokens)

    def num_visual_tokens(self, image: ProcessedImage | Sequence[ProcessedImage] | None) -> int:
        """Placeholders of one image, or of several together."""
        if image is None:
            return 0
        if isinstance(image, ProcessedImage):
            return visual_token_count(self.config.tokens_per_view, image.skipped)
        return sum(self.num_visual_tokens(im) for im in image)

    @property
    def max_images(self) -> int:
        return self.config.max_images

    def geometry(self, width: int, height: int) -> Canvas:
        return canvas_geometry(width, height, self.config.anchor)

    # --- one sample -------------------------------------------------------------------
    def encode(self, conv: Conversation, images: Any | Sequence[Any] | None = None,
               add_generation_prompt: bool = True, max_length: int | None = None) -> Encoded:
        """One conversation + its images (None, one, or a list: one per image part, in order)."""
        given = _as_list(images)
        wanted = len(conv.image_refs)
        if max(wanted, len(given)) > self.max_images:
            raise TooManyImagesError(f"the conversation holds {max(wanted, len(given))} images; this model takes "
                                     f"at most {self.max_images} (max_images)")
        if wanted != len(given):
            raise ValueError(f"the conversation has {wanted} image part(s) but {len(given)} image(s) were given")
        segments = self.template.segments(conv, add_generation_prompt=add_generation_prompt)
        procs = [im if isinstance(im, ProcessedImage) else self.process_image(im) for im in given]
        counts = [self.num_visual_tokens(p) for p in procs]
        ids, labels = tokenize_segments(segments, self.tokenizer, counts, IMAGE_TOKEN_ID)
        limit = max_length or self.config.max_length
        if len(ids) > limit:
            raise PromptTooLongError(f"conversation needs {len(ids)} tokens, the model takes at most {limit}")
        return Encoded(ids, labels, procs)

    # --- batches ----------------------------------------------------------------------
    def collate(self, samples: Sequence[Encoded], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Pad a list of encoded samples into model inputs.

        `pixel_values` / `view_skip` hold every image of every sample, in batch order and
        within a sample in sequence order; the model fills the placeholders in that order.
        """
        if not samples:
            raise ValueError("empty batch")
        width = max(len(s.input_ids) for s in samples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(s.input_ids)
            labels[row, cols] = torch.tensor(s.labels)
            mask[row, cols] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [im for s in samples for im in s.images]
        if images:
            batch["pixel_values"] = torch.stack([im.pixels for im in images])
            batch["view_skip"] = torch.tensor([im.skipped for im in images], dtype=torch.bool)
        return batch

    def __call__(self, conversations: Conversation | Sequence[Conversation],
                 images: Any | Sequence[Any] | None = None, add_generation_prompt: bool = True,
                 padding_side: str = "left") -> dict[str, torch.Tensor]:
        """One or many conversations -> padded tensors.

        `images` holds one entry per conversation: None, one image, or a list of images
        (one per image part). For a single conversation pass its entry directly.
        """
        if isinstance(conversations, Conversation):
            conversations, images = [conversations], [images]
        images = list(images) if images is not None else [None] * len(conversations)
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
        encoded = [self.encode(c, im, add_generation_prompt) for c, im in zip(conversations, images)]
        batch = self.collate(encoded, padding_side)
        if add_generation_prompt:
            batch.pop("labels")
        return batch



def _as_list(images: Any) -> list[Any]:
    """None -> [], a list/tuple of images -> itself, one image -> [it]."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
