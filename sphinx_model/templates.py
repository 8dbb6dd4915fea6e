"""Chat templates and turn-by-turn tokenisation with labels.

A template renders a conversation as a list of *segments*, each either prompt (no loss) or
assistant text (loss). Segments are tokenised one by one and concatenated, so labels line
up with tokens by construction — never by splitting a rendered string and hoping the
pieces tokenise the same way (LLaVA's "tokenization mismatch").

Layout of one sample: `[BOS] [visual tokens of image 0] segment tokens...`. The first image
always sits right after BOS (as in the released models), whichever turn mentioned it, so a
one-image sample is laid out exactly as the released checkpoints expect. Every later image
(1, 2, ...) becomes an image segment at the place of its own image part in the rendered
turn: `### Human: [visual tokens of image 1] What changed?`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .conversation import Conversation, Part
from .text import encode_text

IGNORE_INDEX = -100

RELEASED_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Segment:
    text: str = ""
    train: bool = False       # labels on these tokens
    eos: bool = False         # append the tokenizer's EOS id (trained when `train`)
    image: int | None = None  # a later image (1, 2, ...): its visual tokens stand here; never trained


_SLOT = "\x00"  # stands for the message text while a format string is split; never reaches a tokenizer


@dataclass(frozen=True)
class ChatTemplate:
    """How turns become text. `{text}` is the message text."""

    name: str
    default_system: str
    system: str              # "{system}"-formatted opening
    first_user: str          # first user turn (after the system text)
    user: str                # later user turns
    assistant: str           # assistant text, trained
    assistant_end: str       # trained end marker text ("" if EOS ends the turn)
    end_with_eos: bool       # the turn ends with the EOS token (trained)
    stop_strings: tuple[str, ...]

    def segments(self, conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
        """Render `conv` into segments; with `add_generation_prompt` it must end on a user turn."""
        conv.validate(for_training=not add_generation_prompt)
        msgs = conv.messages
        has_system = bool(msgs) and msgs[0].role == "system"
        turns = msgs[1:] if has_system else msgs
        if add_generation_prompt and turns[-1].role != "user":
            raise ValueError("a prompt for generation must end with a user turn")
        images = _ImageCounter()
        out: list[Segment] = []
        if has_system:
            out += _render(self.system.format(system=_SLOT), msgs[0].parts, images, strip=False)
        elif self.default_system:
            out.append(Segment(self.system.format(system=self.default_system)))
        for i, m in enumerate(turns):
            if m.role == "user":
                fmt = self.first_user if i == 0 else self.user
                out += _render(fmt.format(text=_SLOT), m.parts, images)
            else:
                fmt = self.assistant.format(text=_SLOT) + self.assistant_end
                out += _render(fmt, m.parts, images, train=True, eos=self.end_with_eos)
        return out

    def clean_output(self, text: str) -> str:
        """Cut generated text at the first stop string and trim it."""
        for stop in self.stop_strings:
            idx = text.find(stop)
            if idx >= 0:
                text = text[:idx]
        return text.strip()


class _ImageCounter:
    """Numbers the image parts of one conversation in order of appearance."""

    def __init__(self) -> None:
        self.seen = 0

    def next(self) -> int:
        self.seen += 1
        return self.seen - 1


def _render(fmt: str, parts: Sequence[Part], images: _ImageCounter, train: bool = False, eos: bool = False,
            strip: bool = True) -> list[Segment]:
    """One message in its format (`fmt` holds `_SLOT` where the text goes) -> segments.

    Text parts are joined and stripped at both ends (as `Message.text.strip()`), so a message
    without later images is one segment, exactly `fmt.format(text=message.text.strip())`.
    Image 0 has no segment (it sits after BOS); each later image splits the text at its part.
    `strip=False` (the system prompt, used verbatim): a message without text or later images
    renders to nothing, as an explicit empty system prompt always has.
    """
    pieces: list[str | int] = [""]
    for p in parts:
        if p.type == "image":
            index = images.next()
            if index > 0:
                pieces += [index, ""]
        else:
            pieces[-1] += p.text
    texts = [i for i, x in enumerate(pieces) if isinstance(x, str)]
    if not strip:
        if pieces == [""]:
            return []
    else:
        for order in (texts, texts[::-1]):  # strip the message's text at both ends, across image parts
            for i in order:
                pieces[i] = pieces[i].lstrip() if order is texts else pieces[i].rstrip()
                if pieces[i]:
                    break
    prefix, suffix = fmt.split(_SLOT)
    pieces[0] = prefix + pieces[0]
    pieces[-1] = pieces[-1] + suffix
    out = [Segment(image=x) if isinstance(x, int) else Segment(x, train=train) for x in pieces]
    if eos:
        out[-1] = Segment(out[-1].text, train=train, eos=True)
    return out


TEMPLATES: dict[str, ChatTemplate] = {}


def register_template(t: ChatTemplate) -> ChatTemplate:
    TEMPLATES[t.name] = t
    return t


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# The released SPHINX / SPHINX-X format (LLaMA2-Accessory's "### Human / ### Assistant").
register_template(ChatTemplate(
    name="sphinx",
    default_system=RELEASED_SYSTEM,
    system="{system}\n\n",
    first_user="### Human: {text}\n### Assistant:",
    user=" Human: {text}\n### Assistant:",   # the previous answer's trained "\n###" opens this turn
    assistant=" {text}",
    assistant_end="\n###",
    end_with_eos=False,
    stop_strings=("\n###",),
))

# For new training: turns end with the tokenizer's EOS token, which also stops generation.
register_template(ChatTemplate(
    name="sphinx-x",
    default_system=RELEASED_SYSTEM,
    system="{system}",
    first_user=" USER: {text} ASSISTANT:",
    user=" USER: {text} ASSISTANT:",
    assistant=" {text}",
    assistant_end="",
    end_with_eos=True,
    stop_strings=(),
))


def tokenize_segments(segments: list[Segment], tokenizer, num_visual_tokens: int | Sequence[int],
                      image_token_id: int) -> tuple[list[int], list[int]]:
    """BOS + image 0's placeholders + segments, tokenised turn by turn -> (input_ids, labels).

    `num_visual_tokens` gives each image's placeholder count in order (image 0 first); a
    plain int gives every image that count (0 measures the text alone).
    """
    later = [s.image for s in segments if s.image is not None]
    if isinstance(num_visual_tokens, int):
        counts = [num_visual_tokens] * (1 + len(later))
    else:
        counts = list(num_visual_tokens)
        if later != list(range(1, len(counts))):
            raise ValueError(f"{len(counts)} visual token counts for the {1 + len(later) if later else 'one or no'} "
                             "images of these segments")
    ids = [tokenizer.bos_token_id] + [image_token_id] * (counts[0] if counts else 0)
    labels = [IGNORE_INDEX] * len(ids)
    for i, seg in enumerate(segments):
        if seg.image is not None:
            piece = [image_token_id] * counts[seg.image]
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
            continue
        piece = encode_continuation(tokenizer, seg.text, at_start=i == 0) if seg.text else []
        if seg.eos:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if seg.train else [IGNORE_INDEX] * len(piece)
    return ids, labels


_ANCHOR = "\n"


def encode_continuation(tokenizer, text: str, at_start: bool = False) -> list[int]:
    """Token ids of `text` as they come out when it continues earlier text.

    SentencePiece tokenizers (Llama's) prepend a word-boundary marker to every encode call;
    mid-conversation that marker would be a token the released models never saw. Encoding
    behind a fixed anchor and dropping the anchor's tokens gives the ids a whole-string
    encode would give. Tokenizers without the marker get the plain encode. All of it is
    plain text (`tokenizer.encode_text`): a control token's string in `text` stays text.
    """
    plain = encode_text(tokenizer, text)
    if at_start:
        return plain
    anchor = encode_text(tokenizer, _ANCHOR)
    joined = encode_text(tokenizer, _ANCHOR + text)
    if joined[: len(anchor)] == anchor:
        return joined[len(anchor):]
    return plain
