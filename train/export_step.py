"""`python -m train.export_step --config RUN.yaml --checkpoint RUN_DIR/checkpoints/step-N --out DIR`: a
training checkpoint as a model folder, to score or chat with mid-run.

A checkpoint holds only what trains (`model.safetensors`: the trainable parameters, plus the
optimizer and RNG state to resume); the rest of the model is the run's `model.init`. This builds
that init as the run does, lays the checkpoint's weights over it, and writes a complete
`sphinx_model` checkpoint (`python -m train.evaluate --model DIR` reads it). A LoRA run's
checkpoint holds adapters, which this does not merge: its final export does.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ConfigError, load_run_config
from .model import build_model, load_processor, model_config


def export_step(config: Path, checkpoint: Path, out: Path) -> Path:
    """Write the model of `checkpoint` (a step folder of the run `config`) to `out`; returns `out`."""
    from sphinx_model.loading import save_pretrained

    cfg = load_run_config(config, {"data.feature_cache": None})   # the cache plays no part in the weights
    if cfg.lora.enabled:
        raise ConfigError("a LoRA run's checkpoint holds adapters; its final export merges them")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{checkpoint} holds no model.safetensors (a step folder of a run's checkpoints/)")
    try:
        trained = load_file(str(weights))
    except SafetensorError as e:
        raise ConfigError(f"{weights}: not a readable safetensors file ({e})") from None
    config_ = model_config(cfg.model)
    set_seed(cfg.train.seed)          # as the run did: an init built from a preset draws its weights
    model = build_model(config_, cfg.model)
    own = model.state_dict()
    unknown = sorted(k for k in trained if k not in own or own[k].shape != trained[k].shape)
    if unknown:
        raise ConfigError(f"{checkpoint} does not fit the run's model: {unknown[:5]}")
    model.load_state_dict(trained, strict=False)
    return save_pretrained(model.eval(), load_processor(config_, cfg.model), out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, type=Path, help="the run's config YAML")
    ap.add_argument("--checkpoint", required=True, type=Path, help="a step folder under the run's checkpoints/")
    ap.add_argument("--out", required=True, type=Path, help="the model folder to write")
    a = ap.parse_args(argv)
    try:
        folder = export_step(a.config, a.checkpoint, a.out)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
