"""The loop on one CPU process: learning, exact resume, bad data, freeze spec, LoRA, export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import synthetic
import torch
from safetensors.torch import load_file
from synthetic import write_mixture, write_run

from train.__main__ import main
from train.config import load_run_config
from train.trainer import METRICS, Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(path, **overrides):
    reset_accelerate()
    return Trainer(load_run_config(path, overrides)).run()


def test_loss_falls_over_30_steps_and_the_final_model_loads(tmp_path, data_dir):
    from sphinx_model.loading import from_pretrained

    path = write_run(tmp_path, data_dir / "mixture.yaml",
                     train={"max_steps": 30, "eval_every": 15, "tensorboard": True},
                     data={"eval_per_dataset": 2})
    result = run(path)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert set(result.eval_losses) == {15, 30} and result.eval_losses[30] < result.eval_losses[15]
    assert list((result.output_dir / "tb").rglob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (result.output_dir / METRICS).read_text().splitlines()]
    assert {"train/loss", "train/tokens_per_s", "train/padding", "train/lr"} <= set(logged[0])
    model, processor = from_pretrained(result.final_dir)
    assert processor.config.name == "sphinx-test-tiny"
    assert all(not p.requires_grad for k in model.expert_keys for p in getattr(model, k).parameters())


def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path, data_dir):
    # 12 samples an epoch, batch 2 x accum 2: 3 steps an epoch, so the run crosses epochs
    mixture = write_mixture(tmp_path / "m.yaml", [("shapes", str(data_dir / "shapes.jsonl"), 1.0),
                                                  ("text", str(data_dir / "text.jsonl"), 1.0)],
                            samples_per_epoch=12)
    common = {"max_steps": 8, "grad_accum": 2, "save_every": 3, "keep_checkpoints": 3}
    whole = run(write_run(tmp_path / "whole", mixture, train=common))
    cut = run(write_run(tmp_path / "cut", mixture, train={**common, "stop_after_steps": 5}))
    assert cut.stopped_early and cut.final_dir is None and max(cut.losses) == 5  # steps 4-5 are lost
    cfg = load_run_config(tmp_path / "cut" / "run.yaml", {"train.stop_after_steps": None})
    reset_accelerate()
    resumed = Trainer(cfg, resume=cfg.train.output_dir / "checkpoints" / "step-000003").run()
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], abs=1e-6), step
    for step in range(1, 6):
        assert cut.losses[step] == pytest.approx(whole.losses[step], abs=1e-6)
    a = load_file(str(whole.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bad_samples_are_skipped_and_counted_and_the_run_goes_on(tmp_path, data_dir):
    synthetic.make_bad(tmp_path / "bad")
    mixture = write_mixture(tmp_path / "m.yaml", [("shapes", str(data_dir / "shapes.jsonl"), 1.0),
                                                  ("bad", "bad/bad.jsonl", 1.0)], samples_per_epoch=8)
    path = write_run(tmp_path, mixture, train={"max_steps": 6, "gradient_checkpointing": True},
                     data={"max_text_tokens": 300})
    result = run(path)
    assert result.steps == 6 and result.final_dir is not None
    assert set(result.skipped) == {"schema", "empty_dialogue", "missing_image", "unreadable_image", "too_long"}
    assert all(np.isfinite(list(result.losses.values())))


def test_all_samples_bad_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{"conversations": [{"from": "alien", "value": 1}]}\n')
    mixture = write_mixture(tmp_path / "m.yaml", [("bad", "bad.jsonl", 1.0)])
    assert main(["--config", str(write_run(tmp_path, mixture))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no usable training samples") and "empty_dialogue" in err[-1]


def test_freeze_spec_and_lora(tmp_path, data_dir):
    from sphinx_model.loading import from_pretrained

    path = write_run(tmp_path, data_dir / "mixture.yaml", train={"max_steps": 2},
                     freeze={"train": ["visual_proj", "start_img", "end_img", "skip_img"]},
                     lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainer = Trainer(load_run_config(path))
    result = trainer.run()
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or not n.startswith("llm.") for n in names)
    assert not any(n.startswith(("openclip", "dinov2")) for n in names)
    model, _ = from_pretrained(result.final_dir)  # adapters merged: a plain checkpoint
    assert not any("lora" in k for k in model.state_dict())


def test_unknown_freeze_pattern_is_a_config_error(tmp_path, data_dir):
    from train.config import ConfigError

    path = write_run(tmp_path, data_dir / "mixture.yaml", freeze={"train": ["llm", "projector"]})
    with pytest.raises(ConfigError, match="projector"):
        run(path)


def test_a_run_can_weigh_every_answer_the_same_and_still_learns(tmp_path, data_dir):
    from train.config import ConfigError

    path = write_run(tmp_path, data_dir / "mixture.yaml", train={"max_steps": 20, "loss_per": "answer"})
    result = run(path)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    with pytest.raises(ConfigError, match="loss_per"):
        load_run_config(write_run(tmp_path / "bad", data_dir / "mixture.yaml", train={"loss_per": "sentence"}), {})


def test_lr_scale_moves_the_llm_slower_than_the_projector(tmp_path, data_dir):
    from train.config import ConfigError

    path = write_run(tmp_path, data_dir / "mixture.yaml", train={"max_steps": 3},
                     optim={"lr": 1e-3, "warmup_steps": 0, "lr_scale": {"llm": 0.01}})
    before: dict[str, torch.Tensor] = {}

    class Watched(Trainer):
        def _make_optimizer(self, model):   # the weights as they are before the first step
            before.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            return super()._make_optimizer(model)

    trainer = Watched(load_run_config(path))
    trainer.run()
    lrs = {round(g["initial_lr"] / 1e-3, 6) for g in trainer.optimizer.param_groups}
    assert lrs == {1.0, 0.01}
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters() if n in before}
    llm = max(v for n, v in moved.items() if n.startswith("llm."))
    proj = max(v for n, v in moved.items() if n.startswith("visual_proj."))
    assert 0 < llm < proj / 5, (llm, proj)
    with pytest.raises(ConfigError, match="lr_scale"):
        Trainer(load_run_config(write_run(tmp_path / "typo", data_dir / "mixture.yaml",
                                          optim={"lr_scale": {"projector": 0.5}}))).run()
    with pytest.raises(ConfigError, match="lr_scale"):
        load_run_config(write_run(tmp_path / "neg", data_dir / "mixture.yaml", optim={"lr_scale": {"llm": -1}}))
