"""The canvas-position option: each visual token's slot on the canvas, as an embedding (issue: the LLM must point)."""
import pytest
import torch

from sphinx_model.canvas_positions import box_features, coordinate_features, init_coordinate_embeddings
from sphinx_model.loading import build_from_config, from_pretrained, save_pretrained
from sphinx_model.config import ConfigError, get_preset
from sphinx_model.conversation import Conversation, Message
from sphinx_model.tiling import token_cells, view_boxes


def test_token_cells_put_the_pooled_token_on_its_view_and_tile_the_view_row_major():
    cells = token_cells(grid=2, tokens_per_view=5)                 # 5 views x (1 pooled + 2x2 map)
    assert len(cells) == 25
    for v, view in enumerate(view_boxes(2)):
        assert cells[5 * v] == view
    assert cells[1:5] == [(0, 0, 0.5, 0.5), (0.5, 0, 1, 0.5), (0, 0.5, 0.5, 1), (0.5, 0.5, 1, 1)]
    assert cells[5 * 4 + 4] == (0.75, 0.75, 1.0, 1.0)              # last cell of the bottom-right view
    with pytest.raises(ValueError, match="1 \\+ g\\*g"):
        token_cells(2, 6)


def test_the_option_needs_a_square_map_per_view_and_released_models_have_no_table():
    # saving, loading and being off in every released preset: test_positions.py, for both options
    with pytest.raises(ConfigError, match="canvas_positions needs tokens_per_view"):
        get_preset("sphinx-test-tiny").replace(canvas_positions=True, tokens_per_view=6)
    model, _ = build_from_config(get_preset("sphinx-test-released"))
    assert model.canvas_pos is None and not any(k.startswith("canvas_pos") for k in model.state_dict())


def test_positions_on_add_each_slots_row_and_survive_save_and_load(make_image, tmp_path):
    torch.manual_seed(0)
    on, proc = build_from_config(get_preset("sphinx-test-tiny").replace(canvas_positions=True))
    off, _ = build_from_config(get_preset("sphinx-test-tiny"))
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("canvas_pos")})
    on.eval(), off.eval()
    conv = Conversation([Message.user("Where is the box?", image=True)])
    batch = proc(conv, make_image(120, 40))                        # wide: the bottom views are skipped
    skip = batch["view_skip"]
    assert skip[0].tolist() == [False, False, False, True, True]
    with torch.no_grad():
        a = on.image_embeddings(batch["pixel_values"], skip)[0]
        b = off.image_embeddings(batch["pixel_values"], skip)[0]
    table = on.canvas_pos.table.detach()                           # (25, d)
    t = on.config.tokens_per_view
    # [start, 5 tokens, end] for views 0..2, then two skip tokens
    for v in range(3):
        block = slice(v * (t + 2) + 1, v * (t + 2) + 1 + t)
        assert torch.allclose(a[block] - b[block], table[v * t:(v + 1) * t], atol=1e-5)
    outside = torch.ones(a.shape[0], dtype=torch.bool)
    for v in range(3):
        outside[v * (t + 2) + 1: v * (t + 2) + 1 + t] = False
    assert torch.equal(a[outside], b[outside])                     # start/end/skip untouched
    folder = save_pretrained(on, proc, tmp_path / "ckpt")
    loaded, lproc = from_pretrained(folder)
    assert loaded.config.canvas_positions and torch.equal(loaded.canvas_pos.table, on.canvas_pos.table)
    with torch.no_grad():
        assert torch.equal(on(**batch).logits, loaded(**lproc(conv, make_image(120, 40))).logits)


def test_a_coordinate_row_lines_up_with_the_slot_edge_of_its_value():
    values = torch.arange(101) / 100
    coords = coordinate_features(values, 256)                      # (101, 256)
    for edge in (0.0, 0.13, 0.5, 0.87):
        slot = box_features(torch.tensor([[edge, 0.3, 0.6, 0.9]]), 256)[0]
        x0_group = slice(0, 64)
        best = (coords[:, x0_group] @ slot[x0_group]).argmax().item()
        assert best == round(edge * 100)


def test_coordinate_rows_are_rewritten_at_the_rows_scale():
    weight = torch.randn(50, 64) * 0.02
    before = weight.clone()
    init_coordinate_embeddings(weight, [3, 7, 9], [0.0, 0.5, 1.0])
    assert torch.equal(weight[:3], before[:3]) and not torch.equal(weight[7], before[7])
    assert weight[[3, 7, 9]].norm(dim=1).mean().item() == pytest.approx(before[[3, 7, 9]].norm(dim=1).mean().item(), rel=1e-4)


def test_box_positions_place_the_read_out_box_in_its_cell_and_need_canvas_positions():
    from sphinx_model.canvas_positions import CanvasPositions

    with pytest.raises(ConfigError, match="box_positions needs canvas_positions"):
        get_preset("sphinx-test-tiny").replace(box_positions=True)
    pos = CanvasPositions(grid=2, tokens_per_view=5, dim=64, readout_dim=3)
    feats = torch.zeros(1, 5, 3)
    views = torch.tensor([1])                                      # the top-left sub-view: cells of 1/4 canvas
    assert torch.allclose(pos.boxes(views, feats)[0, 1], torch.tensor([0.0, 0.0, 0.25, 0.25]))  # starts at the cell
    with torch.no_grad():
        pos.readout.weight.zero_()
        pos.readout.weight[:, 0] = torch.tensor([0.5, 0.5, 1.5, 1.0])   # channel 0 says "this box, in cell units"
        pos.readout.bias.zero_()
    feats[0, 4, 0] = 1.0                                           # token 4: the cell (0.25, 0.25)-(0.5, 0.5)
    box = pos.boxes(views, feats)[0, 4]
    assert torch.allclose(box, torch.tensor([0.375, 0.375, 0.625, 0.5]))
    out = pos(views, feats)
    assert torch.allclose(out[0, 4], pos.table[9] + box_features(box, 64), atol=1e-5)
    with pytest.raises(ValueError, match="need the tokens' expert features"):
        pos(views)


def test_a_demo_sized_model_with_box_positions_builds_saves_and_loads(make_image, tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("sphinx-test-tiny").replace(canvas_positions=True, box_positions=True)
    model, proc = build_from_config(cfg)
    with torch.no_grad():
        model.canvas_pos.readout.weight.normal_(std=0.01)
    conv = Conversation([Message.user("Where is the box?", image=True)])
    folder = save_pretrained(model.eval(), proc, tmp_path / "ckpt")
    loaded, lproc = from_pretrained(folder)
    assert loaded.config.box_positions
    with torch.no_grad():
        assert torch.equal(model(**proc(conv, make_image(60, 90))).logits, loaded(**lproc(conv, make_image(60, 90))).logits)


def test_box_codes_keep_float32_precision_under_bf16_autocast():
    from sphinx_model.canvas_positions import CanvasPositions

    torch.manual_seed(0)
    pos = CanvasPositions(grid=2, tokens_per_view=5, dim=64, readout_dim=3)
    with torch.no_grad():
        pos.readout.weight.normal_()
    feats = torch.rand(2, 5, 3)
    views = torch.tensor([0, 3])
    exact = pos(views, feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pos(views, feats)
    assert under.dtype == torch.float32
    assert torch.allclose(under, exact, atol=1e-5)   # a bf16 read-out would be ~0.5 off at the top frequency


def test_an_mlp_projector_and_read_out_build_save_load_and_are_refused_half_set(make_image, tmp_path):
    from sphinx_model.config import ProjectorConfig

    with pytest.raises(ConfigError, match="projector.hidden"):
        ProjectorConfig(type="mlp_ln")
    with pytest.raises(ConfigError, match="projector.hidden"):
        ProjectorConfig(type="linear_ln", hidden=64)
    with pytest.raises(ConfigError, match="box_readout_hidden"):
        get_preset("sphinx-test-tiny").replace(canvas_positions=True, box_readout_hidden=16)
    torch.manual_seed(0)
    cfg = get_preset("sphinx-test-tiny").replace(canvas_positions=True, box_positions=True, box_readout_hidden=16,
                                                 projector=ProjectorConfig(type="mlp_ln", hidden=48))
    model, proc = build_from_config(cfg)
    assert [type(m).__name__ for m in model.visual_proj] == ["Linear", "GELU", "Linear", "LayerNorm"]
    assert model.visual_proj[0].out_features == 48 and model.canvas_pos.readout[0].out_features == 16
    feats = torch.randn(1, cfg.tokens_per_view, model.canvas_pos.readout[0].in_features)
    cells = model.canvas_pos.boxes(torch.tensor([0]), feats)
    assert torch.allclose(cells, model.canvas_pos.cells[[0]])        # an untrained read-out starts at each cell
    with torch.no_grad():
        model.canvas_pos.readout[-1].weight.normal_(std=0.01)
    conv = Conversation([Message.user("Where is the box?", image=True)])
    folder = save_pretrained(model.eval(), proc, tmp_path / "ckpt")
    loaded, lproc = from_pretrained(folder)
    assert loaded.config.projector.type == "mlp_ln" and loaded.config.box_readout_hidden == 16
    with torch.no_grad():
        assert torch.equal(model(**proc(conv, make_image(60, 90))).logits, loaded(**lproc(conv, make_image(60, 90))).logits)
