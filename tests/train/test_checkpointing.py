"""Resume executes nothing a checkpoint folder holds, survives damage, and never mixes two runs."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from synthetic import write_mixture, write_run

from train.__main__ import main
from train.checkpointing import STATE_FILE, read_checkpoint
from train.config import load_run_config
from train.state_files import CheckpointDamaged, check_pickles
from train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class Payload:
    """Unpickling this creates `marker`: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, torch_format: bool = True) -> None:
    if torch_format:
        torch.save({"state": Payload(marker), "t": torch.ones(2)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def run(path: Path, resume: Path | None = None, **overrides):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Trainer(load_run_config(path, overrides), resume=resume).run()


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (and its final model)."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("base")
    mixture = write_mixture(root / "m.yaml", [("shapes", str(data_dir / "shapes.jsonl"), 1.0),
                                              ("text", str(data_dir / "text.jsonl"), 1.0)], samples_per_epoch=16)
    path = write_run(root, mixture, train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 3})
    run(path)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return path


def copy_run(base: Path, tmp_path: Path) -> Path:
    """A private copy of the base run (config + output) to damage."""
    shutil.copytree(base.parent, tmp_path / "run")
    path = tmp_path / "run" / "run.yaml"
    path.write_text(path.read_text().replace(str(base.parent), str(tmp_path / "run")))
    return path


def test_checkpoints_hold_no_pickles_and_list_every_file(base_run):
    ckpt = base_run.parent / "out" / "checkpoints" / "step-000004"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {STATE_FILE, "model.safetensors", "optimizer.safetensors", "rng-00000.safetensors",
                     "rank-00000.json"}
    assert read_checkpoint(ckpt).state.step == 4


def test_planted_pickles_never_run_on_resume(base_run, tmp_path):
    path = copy_run(base_run, tmp_path)
    ckpt = tmp_path / "run" / "out" / "checkpoints" / "step-000002"
    marker = tmp_path / "PWNED"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "pytorch_model.bin"):  # what accelerate's own loader would open
        plant(ckpt / name, marker)
    result = run(path, resume=ckpt)
    assert sorted(result.losses) == [3, 4] and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated weights", "missing optimizer", "half-written state",
                                    "pickle instead of weights", "broken rank file", "link out of the folder"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact(base_run, tmp_path, capsys, damage):
    path = copy_run(base_run, tmp_path)
    out = tmp_path / "run" / "out"
    newest = out / "checkpoints" / "step-000004"
    marker = tmp_path / "PWNED"
    if damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing optimizer":
        (newest / "optimizer.safetensors").unlink()
    elif damage == "half-written state":
        text = (newest / STATE_FILE).read_text()
        (newest / STATE_FILE).write_text(text[: len(text) // 2])
    elif damage == "pickle instead of weights":
        plant(newest / "model.safetensors", marker)
    elif damage == "broken rank file":
        (newest / "rank-00000.json").write_text("{}")
    else:
        (newest / "rng-00000.safetensors").unlink()
        (newest / "rng-00000.safetensors").symlink_to(out / "checkpoints" / "step-000002" / "rng-00000.safetensors")
    result = run(path, resume=out)
    assert sorted(result.losses) == [3, 4] and not marker.exists()
    printed = capsys.readouterr().out
    assert "step-000004" in printed and "resuming from the newest intact checkpoint, step-000002" in printed


def test_a_named_damaged_checkpoint_is_one_line_and_exit_2(base_run, tmp_path, capsys):
    path = copy_run(base_run, tmp_path)
    newest = tmp_path / "run" / "out" / "checkpoints" / "step-000004"
    (newest / "optimizer.safetensors").write_bytes(b"\0" * 10)
    before = folder_digest(tmp_path / "run" / "out" / "checkpoints")
    assert main(["--config", str(path), "--resume", str(newest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot resume:") and "optimizer.safetensors" in err[0]
    assert folder_digest(tmp_path / "run" / "out" / "checkpoints") == before


def test_a_new_run_refuses_a_folder_that_holds_a_run(base_run, tmp_path, capsys):
    path = copy_run(base_run, tmp_path)
    out = tmp_path / "run" / "out"
    before = folder_digest(out / "checkpoints")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and f"--resume {out}" in err[0]
    assert folder_digest(out / "checkpoints") == before


def test_resuming_another_runs_checkpoint_into_this_folder_is_refused(base_run, tmp_path, data_dir):
    path = copy_run(base_run, tmp_path)  # same config, another run id
    other = write_run(tmp_path / "other", data_dir / "mixture.yaml",
                      train={"max_steps": 2, "save_every": 2})
    run(other)
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="another run"):
        run(path, resume=tmp_path / "other" / "out" / "checkpoints" / "step-000002")


def test_check_pickles_refuses_code_and_passes_tensors(tmp_path):
    """The gate in front of third-party loaders (DeepSpeed, earlier checkpoint versions)."""
    marker = tmp_path / "PWNED"
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"w": torch.ones(3), "step": 5, "names": ["a", "b"]}, good / "mp_rank_00_model_states.pt")
    check_pickles(good)
    for torch_format in (True, False):
        bad = tmp_path / f"bad{torch_format}"
        bad.mkdir()
        plant(bad / "innocent.safetensors", marker, torch_format)  # told by content, not by name
        with pytest.raises(CheckpointDamaged, match="not loaded"):
            check_pickles(bad)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / STATE_FILE).write_text('{"step": 1}')
    plant(legacy / "custom_checkpoint_0.pkl", marker)
    with pytest.raises(CheckpointDamaged, match="custom_checkpoint_0.pkl"):
        read_checkpoint(legacy)
    assert not marker.exists()


# A resumed run keeps its config: each case changes what the checkpoint was written with.
CONFIG_CHANGES = {
    "learning rate and max_steps": (["--set", "optim.lr=0.5", "--set", "train.max_steps=6"],
                                    ["optim.lr 0.002 -> 0.5", "train.max_steps 4 -> 6"]),
    "batching": (["--set", "data.group_by_length=false"], ["data.group_by_length"]),
    "warm-up": (["--set", "optim.warmup_steps=3"], ["optim.warmup_steps"]),
    "freeze spec": (["--set", "freeze.freeze=[llm.lm_head]"], ["freeze.freeze"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CHANGES))
def test_resume_with_a_changed_config_is_refused_in_one_line(base_run, tmp_path, capsys, case):
    path = copy_run(base_run, tmp_path)
    out = tmp_path / "run" / "out"
    before = folder_digest(out / "checkpoints")
    sets, named = CONFIG_CHANGES[case]
    assert main(["--config", str(path), "--resume", str(out), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot resume: the config differs"), err
    assert all(n in err[0] for n in named) and "--allow-config-change" in err[0]
    assert folder_digest(out / "checkpoints") == before


def test_resume_with_a_changed_mixture_file_is_refused(base_run, tmp_path, capsys):
    path = copy_run(base_run, tmp_path)
    mixture = load_run_config(path).data.mixture
    mixture.write_text(mixture.read_text() + "\n# edited\n")
    assert main(["--config", str(path), "--resume", str(tmp_path / "run" / "out")]) == 2
    assert "data.mixture" in capsys.readouterr().err


def test_resume_may_change_what_is_only_logged_or_where_it_stops(base_run, tmp_path):
    path = copy_run(base_run, tmp_path)   # copied: the output folder and mixture path moved too
    result = run(path, resume=tmp_path / "run" / "out" / "checkpoints" / "step-000002",
                 **{"train.log_every": 2, "train.progress": False, "train.keep_checkpoints": 1})
    assert sorted(result.losses) == [3, 4]


def test_allow_config_change_resumes_with_the_new_config(base_run, tmp_path, capsys):
    path = copy_run(base_run, tmp_path)
    ckpt = tmp_path / "run" / "out" / "checkpoints" / "step-000002"
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert main(["--config", str(path), "--resume", str(ckpt), "--allow-config-change",
                 "--set", "train.max_steps=5"]) == 0
    assert "warning: resuming with a changed config (train.max_steps)" in capsys.readouterr().out
