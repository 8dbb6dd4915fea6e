"""The typed run config of `python -m train`, loaded from YAML.

One file describes a run: which model to start from, which data mixture, what trains,
the optimiser, and the loop. Stages and tasks differ only in these files, never in code.
Relative paths are resolved against the folder of the YAML file, so a config and its
mixture travel together. Torch-free: the CLI validates a config before anything heavy
is imported, and every mistake a user can make becomes one `ConfigError` line.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION = ("no", "bf16", "fp16")
LOSS_PER = ("token", "answer")
DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**32 - 1          # numpy's and accelerate's set_seed take 32-bit seeds
MAX_CONFIG_BYTES = 1 << 20    # a run or mixture YAML is a page of settings, not data
FEATURE_MANIFEST = "manifest.json"  # of a feature cache (train/feature_files.py)


class ConfigError(ValueError):
    """A mistake in a run or mixture config; reported as one line, exit status 2."""


@dataclass
class ModelSection:
    init: str = "sphinx-test-tiny"         # preset name or checkpoint folder (ours) to start from
    load_weights: bool = False             # presets only: pull the pretrained LLM and expert weights
    dtype: str = "float32"                 # dtype of trainable (master) weights; compute dtype comes from mixed_precision
    frozen_dtype: str | None = None        # cast the frozen experts (e.g. bfloat16) to halve their memory
    experts_from: str | None = None        # checkpoint folder (ours) whose visual experts replace init's
    overrides: dict[str, Any] = field(default_factory=dict)  # SphinxConfig fields to change, e.g. {max_length: 2048}


@dataclass
class DataSection:
    mixture: Path = Path("mixture.yaml")   # mixture YAML (see train/mixture.py)
    max_text_tokens: int | None = None     # text tokens per sample (release: 512); visual tokens come on top
    truncate: bool = False                 # cut over-long samples to fit instead of skipping them
    eval_per_dataset: int = 0              # records held out of each dataset for the eval loss
    group_by_length: bool = True           # length-grouped batches (low padding) instead of random ones
    megabatch_mult: int = 32               # a mega-batch is this many micro-batches, sorted by length inside
    scan_images: bool = True               # read image headers while indexing: exact lengths, missing files found early
    num_workers: int = 0                   # DataLoader worker processes (images decode there)
    cache_dir: Path | None = None          # index cache; default OUTPUT_DIR/cache
    max_fallbacks: int = 8                 # a bad record is replaced by up to this many following ones
    feature_cache: Path | None = None      # the experts' outputs cached per image (python -m train.feature_cache):
                                           # read instead of decoding images and running the frozen experts


@dataclass
class FreezeSection:
    """Parameter-name prefixes; a parameter trains iff it matches `train` and not `freeze`."""

    train: list[str] = field(default_factory=lambda: ["llm", "visual_proj", "start_img", "end_img", "skip_img"])
    freeze: list[str] = field(default_factory=list)


@dataclass
class LoraSection:
    enabled: bool = False                  # LoRA adapters on the LLM (peft); the LLM's own weights freeze
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"  # peft's names, or "all-linear"


@dataclass
class OptimSection:
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_ratio: float = 0.03             # share of the steps spent warming up (cosine afterwards)
    warmup_steps: int | None = None        # wins over warmup_ratio
    max_grad_norm: float = 8.0             # 0 = no clipping
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> multiplier of lr, e.g.
                                           # {llm: 0.2}: a pretrained LLM moves slower than a fresh projector
                                           # (the longest matching prefix wins; unlisted parameters get lr)


@dataclass
class TrainSection:
    output_dir: Path = Path("runs/default")
    seed: int = 0
    batch_size: int = 4                    # micro-batch per process
    grad_accum: int = 4                    # micro-batches per optimiser step
    max_steps: int | None = None           # optimiser steps; None = `epochs` over the mixture
    epochs: float = 1.0
    mixed_precision: str = "bf16"          # "no", "bf16" (fp32 master weights, bf16 autocast) or "fp16"
    loss_per: str = "token"                # "token": the LLM's own mean over answer tokens; "answer": each
                                           # assistant turn's mean, then their mean (train/losses.py)
    gradient_checkpointing: bool = True    # recompute decoder-layer activations in backward
    fsdp: bool = False                     # FSDP2 without an accelerate FSDP config (e.g. torchrun on CPU)
    ddp_find_unused_parameters: bool = False  # not needed: every glue parameter joins every loss (parallel.py)
    cpu: bool = False                      # force CPU even where a GPU is present
    log_every: int = 1
    eval_every: int = 0                    # 0 = eval only at the end (if there is an eval split)
    save_every: int = 0                    # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    stop_after_steps: int | None = None    # end the process after this step as if killed (resume tests)
    progress: bool = True
    tensorboard: bool = True


@dataclass
class SupervisionSection:
    """Attention supervision on the synthetic world (train/world_supervision.py): [layer, head, weight]
    of the head that looks at a box's object while its coordinates are written (attend), at the words
    naming it (gather), and at the objects a detection group's name is about (name). Weight 0 = off;
    all off by default (a run on other data has no scene truth to supervise with)."""

    attend: list[float] = field(default_factory=lambda: [2, 2, 0.0])
    gather: list[float] = field(default_factory=lambda: [1, 1, 0.0])
    name: list[float] = field(default_factory=lambda: [3, 1, 0.0])

    @property
    def enabled(self) -> bool:
        return any(spec[2] > 0 for spec in (self.attend, self.gather, self.name))


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    supervision: SupervisionSection = field(default_factory=SupervisionSection)

    def validate(self) -> "RunConfig":
        """Every value the loop relies on, in range: a mistake is one ConfigError here, never a
        traceback (or an exhausted machine) later."""
        t, o, d, m, lo = self.train, self.optim, self.data, self.model, self.lora
        _check(all(math.isfinite(x) for x in (o.lr, o.weight_decay, o.eps, o.warmup_ratio, o.max_grad_norm,
                                               t.epochs, lo.dropout, *o.betas)),
               "optim.* and train.epochs must be finite numbers")
        _check(0 <= t.seed <= MAX_SEED, f"train.seed must be in [0, {MAX_SEED}]")
        _check(t.log_every >= 1 and t.eval_every >= 0 and t.save_every >= 0,
               "train.log_every must be >= 1, train.eval_every and train.save_every >= 0")
        _check(t.stop_after_steps is None or t.stop_after_steps >= 1, "train.stop_after_steps must be >= 1")
        _check(t.epochs <= 1e6, "train.epochs must be at most 1e6")
        _check(o.weight_decay >= 0 and o.eps > 0 and o.max_grad_norm >= 0,
               "optim.weight_decay >= 0, optim.eps > 0 and optim.max_grad_norm >= 0")
        _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(lo.r >= 1 and lo.alpha > 0 and 0 <= lo.dropout < 1, "lora.r >= 1, lora.alpha > 0, lora.dropout in [0, 1)")
        _check(0 <= d.max_fallbacks <= 1024, "data.max_fallbacks must be in [0, 1024]")
        _check(d.eval_per_dataset >= 0, "data.eval_per_dataset must be >= 0")
        _check(d.num_workers <= 256 and d.megabatch_mult <= 100_000, "data.num_workers <= 256, data.megabatch_mult <= 100000")
        _check(t.mixed_precision in MIXED_PRECISION, f"train.mixed_precision must be one of {MIXED_PRECISION}")
        _check(t.loss_per in LOSS_PER, f"train.loss_per must be one of {LOSS_PER}")
        _check(m.dtype in DTYPES, f"model.dtype must be one of {DTYPES}")
        _check(m.frozen_dtype in (None, *DTYPES), f"model.frozen_dtype must be null or one of {DTYPES}")
        _check(m.frozen_dtype in (None, m.dtype) or t.mixed_precision != "no",
               "model.frozen_dtype different from model.dtype needs train.mixed_precision bf16 or fp16")
        _check(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
        _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1")
        _check(t.max_steps is not None or t.epochs > 0, "train.epochs must be > 0")
        _check(o.lr > 0 and 0 <= o.warmup_ratio < 1, "optim.lr must be > 0 and optim.warmup_ratio in [0, 1)")
        _check(all(isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) and v > 0 for k, v in o.lr_scale.items()),
               "optim.lr_scale must map parameter-name prefixes to numbers > 0")
        sv = self.supervision
        _check(all(isinstance(spec, list) and len(spec) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                      for x in spec)
                   and spec[0] == int(spec[0]) >= 0 and spec[1] == int(spec[1]) >= 0 and 0 <= spec[2] < 100
                   for spec in (sv.attend, sv.gather, sv.name)),
               "supervision.attend / gather / name must each be [layer >= 0, head >= 0, weight in [0, 100)]")
        _check(not sv.enabled or not (t.fsdp or self.lora.enabled),
               "supervision reads the LLM's own attention heads: not with train.fsdp or LoRA")
        _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)")
        _check(d.max_text_tokens is None or d.max_text_tokens >= 1, "data.max_text_tokens must be >= 1")
        _check(d.megabatch_mult >= 1 and d.num_workers >= 0, "data.megabatch_mult >= 1, data.num_workers >= 0")
        _check(bool(self.freeze.train) or self.lora.enabled, "nothing trains: freeze.train is empty and LoRA is off")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


class _Loader(yaml.SafeLoader):
    """Safe YAML without aliases: `*name` references let a few lines expand into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*name) are not allowed{self.peek_event().start_mark}")
        return super().compose_node(parent, index)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content, or a one-line ConfigError naming `what` is wrong with it."""
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES} bytes; is it really a config?")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0] if str(e) else 'too deeply nested'}") from None


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run YAML; `overrides` ({"train.max_steps": 3}) win over the file."""
    path = Path(path)
    raw = read_yaml(path, "run config")
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path} must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if raw.setdefault(section, {}) is None:
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"run config {path}: section {section!r} is not a mapping")
        raw[section][key] = value
    cfg = build(RunConfig, raw, where=str(path))
    base = path.resolve().parent
    cfg.data.mixture = resolve_path(base, cfg.data.mixture)
    cfg.train.output_dir = resolve_path(base, cfg.train.output_dir)
    if cfg.data.cache_dir is not None:
        cfg.data.cache_dir = resolve_path(base, cfg.data.cache_dir)
    if cfg.data.feature_cache is not None:
        cfg.data.feature_cache = resolve_path(base, cfg.data.feature_cache)
        check_feature_cache(cfg.data.feature_cache)
    init = Path(cfg.model.init)
    if not init.is_absolute() and (base / init).is_dir():  # a checkpoint folder next to the config
        cfg.model.init = str(base / init)
    if cfg.model.experts_from is not None:
        source = Path(cfg.model.experts_from)
        if not source.is_absolute() and (base / source).is_dir():
            cfg.model.experts_from = str(base / source)
    return cfg.validate()


def check_feature_cache(folder: Path) -> None:
    """Torch-free: the folder is there and holds a manifest (whether its features are this model's
    experts' is checked once the model is built: `train.feature_files.FeatureCache.check`)."""
    if not folder.is_dir():
        raise ConfigError(f"data.feature_cache {folder} is not a folder (write it with python -m train.feature_cache)")
    if not (folder / FEATURE_MANIFEST).is_file():
        raise ConfigError(f"data.feature_cache {folder} holds no {FEATURE_MANIFEST}: not a feature cache, "
                          "or its first shard was never finished")


def expand_path(p: str | Path) -> Path:
    """`~` and `~user` expanded; an unknown user is a ConfigError, not a RuntimeError."""
    try:
        return Path(p).expanduser()
    except RuntimeError as e:
        raise ConfigError(f"path {str(p)!r}: {e}") from None


def resolve_path(base: Path, p: Path) -> Path:
    p = expand_path(p)
    try:
        return (p if p.is_absolute() else base / p).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop, a name too long
        raise ConfigError(f"path {str(p)!r} cannot be resolved: {e}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --- a small typed builder: YAML mapping -> dataclass, with one-line errors -----------------
def build(cls: type, data: Any, where: str) -> Any:
    """Dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}: {k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML reads "2e-5" as a string
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r:.60}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r:.60}")
        if hint is int:
            if number != int(number):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if hint is Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ConfigError(f"{where}: expected a path, got {value!r:.60}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {hint}")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
