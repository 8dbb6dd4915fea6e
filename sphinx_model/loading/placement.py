"""Where a model's parts live: one device, or an accelerate device map over the GPUs and the CPU.

`device_map="auto"` (or "balanced", "sequential") plans on the meta-device model before any
weight is read, with `max_memory` as the cap per device ("0=20GiB,cpu=64GiB" on the command
line) and the quantised weights counted at their 4 or 8 bits, so a layer is placed once, where
it will run. Blocks that do not fit on the GPUs go to the CPU and *run* there (accelerate's
`main_device="cpu"`): for one token at a time a CPU pass over a layer costs less than copying
its weights over PCIe, and bitsandbytes layers stay where they were quantised. A plan that
would need the disk is refused: give the CPU a larger share.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)$", re.IGNORECASE)

DevicePlan = dict[str, Any]


def parse_max_memory(text: str | dict[Any, Any] | None) -> dict[Any, str] | None:
    """'0=20GiB,cpu=64GiB' -> {0: '20GiB', 'cpu': '64GiB'} (a dict passes through, checked)."""
    if text is None or text == "":
        return None
    items = text.items() if isinstance(text, dict) else \
        [part.split("=", 1) if "=" in part else (part, "") for part in str(text).split(",")]
    out: dict[Any, str] = {}
    for key, size in items:
        key, size = str(key).strip(), str(size).strip()
        if not (key.isdigit() or key in ("cpu", "mps")):
            raise ValueError(f"max_memory: device {key!r} must be a GPU index (0, 1, ...) or 'cpu'")
        if not _SIZE.match(size):
            raise ValueError(f"max_memory: size {size!r} for device {key} must look like 20GiB or 512MB")
        out[int(key) if key.isdigit() else key] = size.replace(" ", "")
    return out


def plan_device_map(model: nn.Module, device_map: str | dict[str, Any], max_memory: dict[Any, str] | None = None,
                    special_dtypes: dict[str, Any] | None = None) -> DevicePlan:
    """A module name -> device map for `model` (best on the meta device: nothing is moved)."""
    if isinstance(device_map, dict):
        return dict(device_map)
    if device_map not in AUTO_MAPS:
        raise ValueError(f"device_map must be one of {list(AUTO_MAPS)} or a dict, got {device_map!r}")
    from accelerate import infer_auto_device_map

    llm = getattr(model, "llm", model)
    no_split = list(getattr(llm, "_no_split_modules", None) or [])
    no_split += sorted({type(e).__name__ for e in getattr(model, "experts", [])})
    plan = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                 special_dtypes=special_dtypes)
    if "disk" in plan.values():
        raise ValueError(f"the model does not fit in max_memory {max_memory or 'of this machine'}: "
                         f"{sum(d == 'disk' for d in plan.values())} blocks would go to the disk, which is not "
                         "supported; give the CPU (or the GPUs) a larger share")
    return plan


def device_lookup(plan: DevicePlan | None, device: torch.device | None, prefix: str = "") -> Callable[[str], torch.device]:
    """`name -> device` for module names under `prefix` (e.g. 'llm.'): the plan's longest match."""
    default = device or torch.device("cpu")

    def of(name: str) -> torch.device:
        if plan is None:
            return default
        full = prefix + name
        best = max((k for k in plan if k == "" or full == k or full.startswith(k + ".")), key=len, default=None)
        target = plan[best] if best is not None else default
        return torch.device(f"cuda:{target}" if isinstance(target, int) else target)

    return of


def place(model: nn.Module, device: torch.device | None, plan: DevicePlan | None) -> nn.Module:
    """Move `model` to `device`, or its parts to their planned devices with accelerate's hooks."""
    if plan is None:
        return model.to(device) if device is not None else model
    from accelerate import dispatch_model

    lookup = device_lookup(plan, None)
    for name in sorted(plan, key=len):
        target = lookup(name)
        module = model.get_submodule(name) if name else model
        module.to(target)
    if len({str(lookup(n)) for n in plan}) == 1:
        return model
    return dispatch_model(model, device_map=plan, main_device="cpu")
