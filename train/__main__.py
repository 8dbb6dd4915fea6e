"""`python -m train --config FILE [--resume DIR [--allow-config-change]] [--set section.key=value ...] [--debug]`.

The same command runs a tiny config on one CPU and a real one on many GPUs:

    python -m train --config train/configs/tiny_cpu.yaml
    accelerate launch --config_file train/configs/accelerate_fsdp.yaml -m train --config RUN.yaml
    torchrun --nproc_per_node 2 -m train --config RUN.yaml          # CPU: gloo; add --set train.fsdp=true

The config, the mixture and the output folder are checked before torch is imported, so a
typo costs a second, not a model load. Every mistake a user can make (config, data, a
damaged or foreign checkpoint, an output folder that cannot be written) prints one
`error:` line and exits with status 2; anything unforeseen prints one line and exits 1
(`--debug` shows its traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .config import ConfigError, RunConfig, load_run_config
from .mixture import DataError, load_mixture
from .model import check_init


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: python -m train --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m train", description="One-stage SPHINX-X training on accelerate.")
    p.add_argument("--config", required=True, type=Path, help="run config YAML (see train/configs/)")
    p.add_argument("--resume", type=Path, help="a checkpoint folder, or a run folder (its newest intact checkpoint)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the one the checkpoint was written with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set train.max_steps=10; repeatable")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p.parse_args(argv)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def prepare_output_dir(cfg: RunConfig) -> None:
    """Create the output folder now, so a path that cannot be written is one line, not a traceback later."""
    out = cfg.train.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir {out} cannot be created: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir {out} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, parse_overrides(args.overrides))
        check_init(cfg.model)           # fail fast on an unknown preset
        load_mixture(cfg.data.mixture)  # ... or a missing dataset
        if args.resume is not None and not args.resume.exists():
            raise ConfigError(f"--resume {args.resume} does not exist")
        prepare_output_dir(cfg)
        return _train(cfg, args.resume, args.allow_config_change)
    except (ConfigError, DataError) as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("interrupted (resume with --resume OUTPUT_DIR from the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last word: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {_first_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _fail(e: BaseException) -> int:
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return 2


def _train(cfg: RunConfig, resume: Path | None, allow_config_change: bool = False) -> int:
    from sphinx_model.experts import ExpertWeightsUnavailable
    from sphinx_model.loading import CheckpointError

    from .trainer import Trainer

    try:
        result = Trainer(cfg, resume, allow_config_change).run()
    except (CheckpointError, ExpertWeightsUnavailable) as e:
        return _fail(e)
    except OSError as e:  # a full disk, a vanished folder, a hub model not in the cache while offline
        return _fail(OSError(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}"))
    return 0 if result.final_dir is not None or result.stopped_early else 1


if __name__ == "__main__":
    sys.exit(main())
