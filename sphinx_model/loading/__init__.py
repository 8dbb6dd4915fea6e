"""Loading: weights in and out of our checkpoint format.

    checkpoint.py   the one checkpoint loader: folder or hub repo id -> (model, processor);
                    save_pretrained, build_from_config, load_model (a preset name too)
    schemes.py      names with a scheme (`released:NAME`), resolved by the room that registers them
    placement.py    device maps over GPUs and the CPU (accelerate)
    quantize.py     bitsandbytes 8/4-bit LLM layers

Depends on the model (the package's top) only; `released` and `serving` depend on it, never
the reverse. `released:NAME` resolves once `sphinx_model.released` is imported (the CLI, the
app and `sphinx_model.from_pretrained` import it).
"""
from .checkpoint import (
    CheckpointError,
    DeviceError,
    build_from_config,
    from_pretrained,
    load_model,
    load_weights_into,
    quantize_model,
    read_weights,
    resolve_checkpoint,
    resolve_device,
    save_pretrained,
)
from .schemes import register_scheme, registered_schemes

__all__ = ["CheckpointError", "DeviceError", "build_from_config", "from_pretrained", "load_model",
           "load_weights_into", "quantize_model", "read_weights", "register_scheme", "registered_schemes",
           "resolve_checkpoint", "resolve_device", "save_pretrained"]
