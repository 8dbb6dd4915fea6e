"""Frozen visual experts: the base class every encoder implements, and the registry that finds
them by `ExpertConfig.kind`.

The model never names an encoder: it calls `build_expert(cfg)` for each `ExpertConfig` and
concatenates the `(N, num_tokens, out_dim)` outputs of the *fused* experts on channels (they
all give the same global + grid tokens). An expert whose tokens are something else (the
Q-Former's learned queries) sets `fused = False`: it gets its own projector `{key}_proj` and
its tokens come first in each view. A new encoder is one module with a
`@register_expert("my_kind")` class; no model code changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, TypeVar

import torch
from torch import nn

from ..config import ExpertConfig

T = TypeVar("T", bound="VisualExpert")


class ExpertWeightsUnavailable(FileNotFoundError):
    """Pretrained expert weights were asked for but cannot be found (offline and not cached)."""


def offline_note() -> str:
    """' (HF_HUB_OFFLINE is set)' when downloads are disabled, for error messages."""
    from huggingface_hub import constants

    return " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""


class VisualExpert(nn.Module, ABC):
    """A frozen image encoder that turns one square view into a global token plus a token grid.

    Contract:
      * input: pixels (N, 3, image_size, image_size) normalised with the CLIP mean/std
        (the released models feed every expert the same CLIP-normalised tensor; an expert
        whose native normalisation differs re-normalises inside `forward`);
      * output: (N, num_tokens, out_dim). A fused expert (the default) gives
        1 + grid_size**2 tokens: token 0 is the global token, tokens 1.. the grid in row-major
        order; an expert with `fused = False` gives `num_tokens` tokens of its own kind;
      * frozen: `build_expert` turns off gradients, and `train()` never leaves eval mode,
        so a parent's `.train()` cannot switch on dropout / drop-path inside it.
    """

    kind: ClassVar[str] = ""                          # set by @register_expert
    mean: ClassVar[tuple[float, float, float]]        # native input normalisation of the encoder
    std: ClassVar[tuple[float, float, float]]
    unused_released_keys: ClassVar[tuple[str, ...]] = ()  # released keys known to have no use here
    fused: ClassVar[bool] = True  # tokens concatenated on channels with the other fused experts'

    def __init__(self, image_size: int, out_dim: int, grid_size: int) -> None:
        super().__init__()
        self.image_size = image_size  # side of the square view it sees
        self.out_dim = out_dim        # channels of each output token
        self.grid_size = grid_size    # output tokens per side

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid_size ** 2

    @classmethod
    @abstractmethod
    def from_config(cls: type[T], cfg: ExpertConfig, load_weights: bool = False) -> T:
        """Build from config; random init (no download) unless `load_weights`."""

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, T, C)
        """CLIP-normalised views -> global token + row-major grid tokens."""

    @classmethod
    def is_unused_released_key(cls, key: str) -> bool:
        """A released key (prefix stripped) that this expert knows it has no use for."""
        return key in cls.unused_released_keys

    @staticmethod
    def map_released_state_dict(
        sd: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Released (LLaMA2-Accessory) keys of this expert, prefix stripped -> own state_dict keys.

        Returns (mapped, unmapped_released_keys). The default is the identity.
        """
        return dict(sd), []

    # --- frozen behaviour ----------------------------------------------------------------
    def train(self: T, mode: bool = True) -> T:
        return super().train(False)

    def freeze(self: T) -> T:
        self.requires_grad_(False)
        return self.eval()

    def check_pixels(self, pixels: torch.Tensor) -> None:
        want = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(
                f"{type(self).__name__} expects pixels (N, {', '.join(map(str, want))}), "
                f"got {tuple(pixels.shape)}"
            )


_EXPERTS: dict[str, type[VisualExpert]] = {}


def register_expert(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make `cls` buildable from an `ExpertConfig` whose `kind` is `kind`."""

    def decorate(cls: type[T]) -> type[T]:
        if not (isinstance(cls, type) and issubclass(cls, VisualExpert)):
            raise TypeError(f"@register_expert({kind!r}) needs a VisualExpert subclass, got {cls!r}")
        existing = _EXPERTS.get(kind)
        if existing is not None and _qualified(existing) != _qualified(cls):  # re-import is fine
            raise ValueError(f"expert kind {kind!r} already registered by {_qualified(existing)}")
        cls.kind = kind
        _EXPERTS[kind] = cls
        return cls

    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def list_experts() -> list[str]:
    return sorted(_EXPERTS)


def get_expert_class(kind: str) -> type[VisualExpert]:
    cls = _EXPERTS.get(kind)
    if cls is None:
        raise KeyError(f"unknown visual expert kind {kind!r}; registered: {', '.join(list_experts())}")
    return cls


def build_expert(cfg: ExpertConfig, load_weights: bool = False) -> VisualExpert:
    """Build the expert `cfg.kind` names, frozen and in eval mode.

    `load_weights=False` gives random init and never touches the network; `load_weights=True`
    loads `cfg.pretrained` and raises `ExpertWeightsUnavailable` when it cannot be had.
    """
    expert = get_expert_class(cfg.kind).from_config(cfg, load_weights=load_weights)
    return expert.freeze()
