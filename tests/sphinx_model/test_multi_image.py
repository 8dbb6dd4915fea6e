"""Several images per conversation: image 0 right after BOS (the released layout), each later
image at its own image part; processor and model agree on every count and position."""
import pytest
import torch

from sphinx_model.conversation import Conversation, Message, Part
from sphinx_model.modeling import _check_placeholders
from sphinx_model.processor import IMAGE_TOKEN_ID, SphinxProcessor, TooManyImagesError
from sphinx_model.serving.generation import GenerationSettings, Generator
from sphinx_model.templates import get_template
from sphinx_model.tiling import visual_token_count


def runs(ids):
    """(start, length) of each run of image placeholders."""
    out, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == IMAGE_TOKEN_ID and start is None:
            start = i
        elif t != IMAGE_TOKEN_ID and start is not None:
            out.append((start, i - start))
            start = None
    return out


def two_images(second_after_text=False):
    later = (Part.of_text("And this one?"), Part.of_image()) if second_after_text else \
        (Part.of_image(), Part.of_text("And this one?"))
    return Conversation([Message.user("What is it?", image=True), Message.assistant("A red square."),
                         Message("user", later)])


def count(proc, img):
    return visual_token_count(proc.config.tokens_per_view, proc.process_image(img).skipped)


@pytest.mark.parametrize("second_after_text", [False, True])
def test_later_image_sits_at_its_own_part(tiny, make_image, second_after_text):
    _, proc = tiny
    a, b = make_image(64, 64, 1), make_image(160, 80, 2)          # b: 2:1, so its count differs from a's
    enc = proc.encode(two_images(second_after_text), [a, b])
    tok, t = proc.tokenizer, get_template("sphinx")
    (s0, n0), (s1, n1) = runs(enc.input_ids)
    assert (s0, n0) == (1, count(proc, a)) and n1 == count(proc, b) and n0 != n1
    before = tok.decode(enc.input_ids[s0 + n0:s1])
    after = tok.decode(enc.input_ids[s1 + n1:])
    head = t.system.format(system=t.default_system) + t.first_user.format(text="What is it?") + \
        t.assistant.format(text="A red square.") + t.assistant_end
    turn = t.user.format(text="And this one?")
    if second_after_text:
        cut = turn.index("\n###")
        assert (before, after) == (head + turn[:cut], turn[cut:])
    else:
        cut = turn.index("And")
        assert (before, after) == (head + turn[:cut], turn[cut:])
    assert all(label == -100 for label, i in zip(enc.labels, enc.input_ids) if i == IMAGE_TOKEN_ID)


def test_one_image_layout_is_exactly_the_released_one(tiny, make_image):
    """Pinned by construction: BOS, the image's placeholders, then the whole rendered text."""
    _, proc = tiny
    released = SphinxProcessor(proc.config.replace(max_images=1), proc.tokenizer)
    t, tok = get_template("sphinx"), proc.tokenizer
    img = make_image(96, 48)
    n = count(proc, img)
    for where in (0, 2):   # the image in the first turn, or in a later one: it always sits after BOS
        msgs = [Message.user("What is it?", image=where == 0), Message.assistant("A car."),
                Message.user(" Where? ", image=where == 2)]
        text = t.system.format(system=t.default_system) + t.first_user.format(text="What is it?") + \
            t.assistant.format(text="A car.") + t.assistant_end + t.user.format(text="Where?")
        expected = [tok.bos_token_id] + [IMAGE_TOKEN_ID] * n + tok.encode(text, add_special_tokens=False)
        for p in (proc, released):
            assert p.encode(Conversation(msgs), img).input_ids == expected
            assert p.encode(Conversation(msgs), [img]).input_ids == expected


def test_model_fills_each_image_at_its_positions(tiny, make_image):
    model, proc = tiny
    a, b = make_image(64, 64, 1), make_image(80, 160, 2)
    batch = proc([two_images(), Conversation([Message.user("Hi")])], [[a, b], None])
    assert batch["pixel_values"].shape[0] == 2 and batch["view_skip"].shape[0] == 2
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        visual = model.image_embeddings(batch["pixel_values"], batch["view_skip"])
    (s0, n0), (s1, n1) = runs(batch["input_ids"][0].tolist())
    assert torch.equal(embeds[0, s0:s0 + n0], visual[0]) and torch.equal(embeds[0, s1:s1 + n1], visual[1])
    assert not (batch["input_ids"][1] == IMAGE_TOKEN_ID).any()


def test_batched_rows_with_0_1_2_images_equal_one_by_one(tiny, make_image):
    gen = Generator(*tiny)
    a, b, c = make_image(64, 64, 1), make_image(160, 80, 2), make_image(40, 120, 3)
    convs = [two_images(), Conversation([Message.user("Hi there")]),
             Conversation([Message.user("Describe it.", image=True)]), two_images(second_after_text=True)]
    images = [[a, b], None, c, [c, a]]
    s = GenerationSettings(max_new_tokens=8)
    batched = gen.generate(convs, images, s)
    assert batched == [gen.generate([cv], [im], s)[0] for cv, im in zip(convs, images)]
    assert "".join(gen.stream(convs[0], images[0], s)) == batched[0]


def test_too_many_images_names_the_limit(tiny, make_image):
    _, proc = tiny
    assert proc.max_images == 4
    img = make_image(32, 32)
    five = Conversation([Message("user", tuple([Part.of_image()] * 5 + [Part.of_text("Compare.")]))])
    with pytest.raises(TooManyImagesError, match="at most 4"):
        proc.encode(five, [img] * 5)
    released = SphinxProcessor(proc.config.replace(max_images=1), proc.tokenizer)
    with pytest.raises(TooManyImagesError, match="at most 1 .max_images"):
        released.encode(two_images(), [img, img])
    with pytest.raises(TooManyImagesError):   # counted before any image is decoded
        released.encode(two_images(), None)
    assert issubclass(TooManyImagesError, ValueError)


def test_images_must_match_the_image_parts(tiny, make_image):
    _, proc = tiny
    img = make_image(32, 32)
    with pytest.raises(ValueError, match="2 image part"):
        proc.encode(two_images(), [img])
    with pytest.raises(ValueError, match="0 image part"):
        proc.encode(Conversation([Message.user("Hi")]), img)


def test_placeholder_check_hands_whole_images_to_rows():
    _check_placeholders([10, 0, 7, 3], [4, 6, 7, 3])            # row 0 takes two adjacent images
    _check_placeholders([0, 0], [])
    for rows, images in (([10, 7], [4, 7, 6]), ([9], [4, 6]), ([10], [4, 6, 1]), ([3], [])):
        with pytest.raises(ValueError, match="do not match"):
            _check_placeholders(rows, images)


def test_training_labels_with_two_images(tiny, make_image):
    model, proc = tiny
    conv = two_images()
    conv.append(Message.assistant("A blue one."))
    batch = proc(conv, [make_image(64, 64), make_image(64, 128)], add_generation_prompt=False,
                 padding_side="right")
    trained = [i for i, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if lab != -100]
    assert proc.tokenizer.decode(trained) == " A red square.\n### A blue one.\n###"
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
