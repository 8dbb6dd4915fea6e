"""Chat templates and turn-by-turn tokenisation with labels.

A template renders a conversation as a list of *segments*, each either prompt (no loss) or
assistant text (loss). Segments are tokenised one by one and concatenated, so labels line
up with tokens by construction — never by splitting a rendered string and hoping the
pieces tokenise the same way (LLaVA's "tokenization mismatch").

Layout of one sample: `[BOS] [visual tokens...] segment tokens...`; the image always sits
right after BOS (as in the released models), whichever turn mentioned it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .conversation import Conversation

IGNORE_INDEX = -100

RELEASED_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool = False   # labels on these tokens
    eos: bool = False     # append the tokenizer's EOS id (trained when `train`)


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
        system = msgs[0].text if msgs and msgs[0].role == "system" else self.default_system
        turns = [m for m in msgs if m.role != "system"]
        if add_generation_prompt and turns[-1].role != "user":
            raise ValueError("a prompt for generation must end with a user turn")
        out = [Segment(self.system.format(system=system))] if system else []
        for i, m in enumerate(turns):
            if m.role == "user":
                fmt = self.first_user if i == 0 else self.user
                out.append(Segment(fmt.format(text=m.text.strip())))
            else:
                out.append(Segment(self.assistant.format(text=m.text.strip()) + self.assistant_end,
                                   train=True, eos=self.end_with_eos))
        return out

    def clean_output(self, text: str) -> str:
        """Cut generated text at the first stop string and trim it."""
        for stop in self.stop_strings:
            idx = text.find(stop)
            if idx >= 0:
                text = text[:idx]
        return text.strip()


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


def tokenize_segments(segments: list[Segment], tokenizer, num_visual_tokens: int,
                      image_token_id: int) -> tuple[list[int], list[int]]:
    """BOS + visual placeholders + segments, tokenised turn by turn -> (input_ids, labels)."""
    ids = [tokenizer.bos_token_id] + [image_token_id] * num_visual_tokens
    labels = [IGNORE_INDEX] * len(ids)
    for i, seg in enumerate(segments):
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
    encode would give. Tokenizers without the marker get the plain encode.
    """
    plain = tokenizer.encode(text, add_special_tokens=False)
    if at_start:
        return plain
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    joined = tokenizer.encode(_ANCHOR + text, add_special_tokens=False)
    if joined[: len(anchor)] == anchor:
        return joined[len(anchor):]
    return plain
