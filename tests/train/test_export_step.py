"""A mid-run checkpoint written out as a model folder that scores and chats like the run's own export."""
from __future__ import annotations

import pytest
import torch
from synthetic import write_run

from train.config import load_run_config
from train.export_step import main
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_the_last_step_exported_is_the_runs_final_model(tmp_path, data_dir, capsys):
    from sphinx_model.loading import from_pretrained

    path = write_run(tmp_path, data_dir / "mixture.yaml", train={"max_steps": 2, "save_every": 2})
    result = Trainer(load_run_config(path)).run()
    step = tmp_path / "out" / "checkpoints" / "step-000002"
    assert main(["--config", str(path), "--checkpoint", str(step), "--out", str(tmp_path / "exported")]) == 0
    final, _ = from_pretrained(result.final_dir)
    exported, _ = from_pretrained(tmp_path / "exported")
    a, b = final.state_dict(), exported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["--config", str(path), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x").exists()
