"""Fixtures of the lmms-eval tests: a tiny random checkpoint on disk, local task folders in the
formats of four benchmark families (documents and images written here), the demo world as
tasks, and one end-to-end run of lmms-eval's CLI over all of them.

Everything is skipped, with the reason, when lmms-eval or the project's entry point is not
installed (`pip install -e .[eval]`, which the README's test command does through .ci/install.sh).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_helpers import FORMAT_TASKS, lmms_eval_ready, write_format_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset at a fixed random init, saved in our checkpoint format."""
    from sphinx_model.config import get_preset
    from sphinx_model.loading import build_from_config, save_pretrained

    torch.manual_seed(0)
    model, processor = build_from_config(get_preset("sphinx-test-tiny"))
    return save_pretrained(model.eval(), processor, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from train.synthetic import write_world

    return write_world(tmp_path_factory.mktemp("world"), 4, seed=11, renderer="heldout", progress=False)


@pytest.fixture(scope="session")
def task_root(tmp_path_factory, world) -> Path:
    """formats/ (the four benchmark forms) and world/ (the demo world's tasks), one --include_path."""
    from train.benchmarks.world_tasks import write_tasks

    root = tmp_path_factory.mktemp("tasks")
    write_format_tasks(root / "formats")
    write_tasks(world, root / "world")
    return root


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, tiny_checkpoint, task_root) -> dict:
    """One `python -m lmms_eval` run over every local task: results, samples per task, output, seconds."""
    reason = lmms_eval_ready()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("lmms_out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(out / "datasets"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "sphinx_x",
           "--model_args", f"pretrained={tiny_checkpoint},device=cpu", "--tasks", ",".join(FORMAT_TASKS + ["sphinx_world"]),
           "--include_path", str(task_root), "--batch_size", "3", "--output_path", str(out), "--log_samples",
           "--process-docs-parallel", "1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    results_files = list(out.rglob("*_results.json"))
    assert len(results_files) == 1, text[-2000:]
    samples = {}
    for f in out.rglob("*_samples_*.jsonl"):
        task = f.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    return {"results": json.loads(results_files[0].read_text())["results"], "samples": samples, "output": text,
            "seconds": seconds}
