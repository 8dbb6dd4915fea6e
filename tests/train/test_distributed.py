"""Real 2-process runs on CPU (gloo): DDP through torchrun, FSDP2 through the shipped accelerate
config; both train, write a checkpoint and a final model that `from_pretrained` loads, and agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import write_run

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 3


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    out = {}
    train = {"max_steps": STEPS, "grad_accum": 2, "save_every": 2, "gradient_checkpointing": True}
    ddp = write_run(tmp_path_factory.mktemp("ddp"), data_dir / "mixture.yaml", train=train)
    res = launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "train", "--config", str(ddp)])
    assert res.returncode == 0, res.stderr[-3000:]
    out["ddp"] = ddp.parent / "out"
    fsdp = write_run(tmp_path_factory.mktemp("fsdp"), data_dir / "mixture.yaml", train=train)
    res = launch([str(BIN / "accelerate"), "launch", "--config_file", "train/configs/accelerate_fsdp.yaml",
                  "--num_processes", "2", "-m", "train", "--config", str(fsdp)])
    assert res.returncode == 0, res.stderr[-3000:]
    out["fsdp"] = fsdp.parent / "out"
    out["fsdp_losses"] = losses(out["fsdp"])
    # resume the sharded run from its step-2 checkpoint: every process restores its own shards
    res = launch([str(BIN / "accelerate"), "launch", "--config_file", "train/configs/accelerate_fsdp.yaml",
                  "--num_processes", "2", "-m", "train", "--config", str(fsdp),
                  "--resume", str(out["fsdp"] / "checkpoints" / "step-000002"),
                  "--set", f"train.stop_after_steps={STEPS}"])  # (no second export of the final model)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_train_checkpoint_and_export(runs, kind):
    from sphinx_model.loading import from_pretrained

    out = runs[kind]
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["state"]
    assert state["world_size"] == 2 and state["step"] == 2
    files = {p.name for p in (out / "checkpoints" / "step-000002").iterdir()}
    shards = {"model-00000.safetensors", "model-00001.safetensors", "optimizer-00001.safetensors"}
    assert (shards <= files) == (kind == "fsdp") and ("model.safetensors" in files) == (kind == "ddp")
    assert not [f for f in files if f.endswith((".pkl", ".bin", ".pt"))]  # nothing pickled
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    model, processor = from_pretrained(out / "final")
    assert processor.config.name == "sphinx-test-tiny" and model.llm.config.num_hidden_layers == 2


def test_fsdp_and_ddp_compute_the_same_losses(runs):
    a, b = losses(runs["ddp"]), runs["fsdp_losses"]
    assert a == pytest.approx(b, abs=1e-4)


def test_sharded_resume_repeats_the_last_step(runs):
    resumed = losses(runs["fsdp"])  # steps 1-2 kept from the first run, step 3 trained again after the resume
    assert sorted(resumed) == [1, 2, 3]
    assert resumed[3] == pytest.approx(runs["fsdp_losses"][3], abs=1e-6)


def test_deepspeed_configs_are_accepted(data_dir):
    """DeepSpeed needs GPUs under accelerate; this checks the shipped JSONs + our fill-ins parse."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    from train.config import RunConfig
    from train.parallel import fill_deepspeed_config

    class Llm:
        config = type("C", (), {"hidden_size": 64})

    class Model:
        llm = Llm

    cfg = RunConfig()
    for stage in (2, 3):
        plugin = DeepSpeedPlugin(hf_ds_config=str(REPO / f"train/configs/deepspeed_zero{stage}.json"))
        fill_deepspeed_config(plugin.deepspeed_config, Model, cfg)
        plugin.set_mixed_precision("bf16")
        plugin.deepspeed_config_process(must_match=False, gradient_accumulation_steps=cfg.train.grad_accum,
                                        train_batch_size=cfg.train.batch_size * cfg.train.grad_accum)
        ds = DeepSpeedConfig(plugin.deepspeed_config)
        assert ds.zero_optimization_stage == stage and ds.gradient_clipping == 8.0 and ds.bfloat16_config.enabled
