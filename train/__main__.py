"""`python -m train --config FILE [--resume DIR] [--set section.key=value ...]`.

The same command runs a tiny config on one CPU and a real one on many GPUs:

    python -m train --config train/configs/tiny_cpu.yaml
    accelerate launch --config_file train/configs/accelerate_fsdp.yaml -m train --config RUN.yaml
    torchrun --nproc_per_node 2 -m train --config RUN.yaml          # CPU: gloo; add --set train.fsdp=true

The config and the mixture are checked before torch is imported, so a typo costs a second,
not a model load. Mistakes a user can make print one `error:` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .config import ConfigError, load_run_config
from .mixture import DataError, load_mixture
from .model import check_init


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: python -m train --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m train", description="One-stage SPHINX-X training on accelerate.")
    p.add_argument("--config", required=True, type=Path, help="run config YAML (see train/configs/)")
    p.add_argument("--resume", type=Path, help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set train.max_steps=10; repeatable")
    return p.parse_args(argv)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, parse_overrides(args.overrides))
        check_init(cfg.model)           # fail fast on an unknown preset
        load_mixture(cfg.data.mixture)  # ... or a missing dataset
        if args.resume is not None and not args.resume.exists():
            raise ConfigError(f"--resume {args.resume} does not exist")
        return _train(cfg, args.resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(cfg, resume: Path | None) -> int:
    from sphinx_model.checkpoint import CheckpointError
    from sphinx_model.experts import ExpertWeightsUnavailable

    from .trainer import Trainer

    try:
        result = Trainer(cfg, resume).run()
    except (CheckpointError, ExpertWeightsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (resume with --resume OUTPUT_DIR from the last checkpoint)", file=sys.stderr)
        return 130
    except OSError as e:  # e.g. a hub model that is not in the cache while offline
        if e.__class__.__module__.startswith(("huggingface_hub", "transformers")) or "offline" in str(e).lower():
            print(f"error: {e}".splitlines()[0], file=sys.stderr)
            return 2
        raise
    return 0 if result.final_dir is not None or result.stopped_early else 1


if __name__ == "__main__":
    sys.exit(main())
