"""The shared-image-position option: one rotary position for all of an image's visual tokens
(issue 18, Gate A: the answer is equally far from every visual token). Off: every released
preset, and their logits are those of the plain sequential path. On: the demo preset, and
training, one-by-one generation and the batching engine all count positions the same way."""
import pytest
import torch

from sphinx_model.config import ConfigError, SphinxConfig, get_preset, list_presets
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import build_from_config, from_pretrained, save_pretrained
from sphinx_model.positions import position_shift, rotary_positions
from sphinx_model.processor import IMAGE_TOKEN_ID as I
from sphinx_model.serving import ContinuousBatcher, EngineConfig
from sphinx_model.serving.generation import GenerationSettings, Generator

GREEDY = GenerationSettings(max_new_tokens=10)


def test_an_images_tokens_share_the_position_of_its_first_and_the_text_goes_on_from_there():
    ids = torch.tensor([[0, 0, 1, I, I, I, 5, 6],          # left-padded row
                        [1, I, I, I, 5, 6, 7, 8]])
    mask = (torch.arange(8) >= torch.tensor([[2], [0]])).long()
    assert rotary_positions(ids, mask).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert rotary_positions(ids, mask, True).tolist() == [[0, 0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 2, 3, 4, 5]]
    two_images = torch.tensor([[1, I, I, 4, I, I, I, 9]])
    assert rotary_positions(two_images, None, True).tolist() == [[0, 1, 1, 2, 3, 3, 3, 4]]


def test_the_shift_is_how_far_the_last_position_falls_behind_its_index():
    for row in ([1, I, I, I, 5, 6], [1, I, I, 4, I, I, I, 9], [1, 2, 3], [I, I, 7]):
        last = rotary_positions(torch.tensor([row]), None, True)[0, -1].item()
        assert last == len(row) - 1 - position_shift(row, True)
        assert position_shift(row, False) == 0


@pytest.mark.parametrize("option", ["shared_image_position", "canvas_positions"])
def test_a_demo_option_is_validated_saved_and_loaded_and_off_in_every_released_preset(option, tmp_path):
    cfg = get_preset("sphinx-test-tiny").replace(**{option: True})
    assert getattr(SphinxConfig.from_json(cfg.to_json()), option) is True
    cfg.save(tmp_path)
    assert getattr(SphinxConfig.load(tmp_path), option) is True
    with pytest.raises(ConfigError, match=f"{option} must be true or false"):
        get_preset("sphinx-test-tiny").replace(**{option: 1})
    data = get_preset("sphinx-test-tiny").to_dict()
    del data[option]                                                   # a config written before the option
    assert getattr(SphinxConfig.from_dict(data), option) is False
    released = [n for n in list_presets() if n != "sphinx-demo"]
    assert released and not any(getattr(get_preset(n), option) for n in released)
    assert getattr(get_preset("sphinx-demo"), option)


@pytest.fixture(scope="module")
def pair():
    """The tiny preset twice, with the same weights: option off and option on. Queries and keys are
    scaled up: at init (std 0.02) attention is near uniform and the greedy tokens would not depend on
    positions at all, so a position counted wrong could not show."""
    torch.manual_seed(0)
    off, proc = build_from_config(get_preset("sphinx-test-tiny"))
    with torch.no_grad():
        for name, p in off.llm.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(16)
    on, proc_on = build_from_config(get_preset("sphinx-test-tiny").replace(shared_image_position=True))
    on.load_state_dict(off.state_dict())
    return off.eval(), on.eval(), proc, proc_on


def test_off_the_logits_are_the_sequential_paths_bit_for_bit(pair, make_image):
    off, _, proc, _ = pair
    batch = proc([Conversation([Message.user("Where is the box?", image=True)]),
                  Conversation([Message.user("And here?", image=True)])],
                 [make_image(120, 40), make_image(60, 90, seed=1)], padding_side="right")
    with torch.no_grad():
        ours = off(**batch).logits
        embeds = off.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        plain = off.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, plain)


def test_on_the_visual_tokens_share_a_position_which_changes_the_answer_and_survives_saving(pair, make_image,
                                                                                             tmp_path):
    off, on, proc, proc_on = pair
    conv = Conversation([Message.user("Where is the box?", image=True)])
    batch = proc_on(conv, make_image(120, 40))
    with torch.no_grad():
        ours = on(**batch).logits
        embeds = on.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["view_skip"])
        shared = rotary_positions(batch["input_ids"], batch["attention_mask"], True)
        assert torch.equal(ours, on.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                         position_ids=shared).logits)
        assert not torch.allclose(ours[0, -1], off(**batch).logits[0, -1], atol=1e-3)
    folder = save_pretrained(on, proc_on, tmp_path / "ckpt")
    loaded, lproc = from_pretrained(folder)
    assert loaded.config.shared_image_position
    with torch.no_grad():
        assert torch.equal(ours, loaded(**lproc(conv, make_image(120, 40))).logits)


def _greedy_by_forward(model, proc, conv, image, n: int) -> list[int]:
    """Greedy decoding by the full forward pass each step (no cache): the training path's positions."""
    batch = proc(conv, image, add_generation_prompt=True)
    ids = batch["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                           view_skip=batch["view_skip"]).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_on_generation_and_the_batching_engine_count_positions_as_training_does(pair, make_image):
    off, on, proc_off, proc = pair
    gen = Generator(on, proc)
    cases = [(Conversation([Message.user("Where is the box?", image=True)]), make_image(120, 40)),
             (Conversation([Message.user("What colour is it?", image=True)]), make_image(60, 90, seed=1)),
             (Conversation([Message.user("Hello")]), None)]
    settings = GenerationSettings(max_new_tokens=8)
    for conv, image in cases[:2]:                                      # transformers' generate, one by one
        ids = gen._generate_ids(proc(conv, image, add_generation_prompt=True), settings, None)[0].tolist()
        assert ids == _greedy_by_forward(on, proc, conv, image, len(ids))
    alone = [gen.generate([c], [im], GREEDY)[0] for c, im in cases]
    sequential = [Generator(off, proc_off).generate([c], [im], GREEDY)[0] for c, im in cases]
    assert alone[:2] != sequential[:2] and alone[2] == sequential[2]   # only images move positions
    engine = ContinuousBatcher(gen, EngineConfig(max_batch=4))
    try:
        jobs = [engine.prepare(c, [im] if im is not None else [], GREEDY) for c, im in cases]
        engine.submit(*jobs)
        assert ["".join(engine.read(j)) for j in jobs] == alone        # prefill and decode positions agree
        again = engine.prepare(cases[0][0], [cases[0][1]], GREEDY)     # its prompt's KV comes from the cache
        engine.submit(again)
        assert "".join(engine.read(again)) == alone[0]
    finally:
        engine.close()
