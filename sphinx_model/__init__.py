"""SPHINX-X: a family of multimodal LLMs (mixture of visual experts + skip tokens + any HF causal LM).

The package's top is the model itself (config and presets, tiling, image processing, processor,
experts, modeling, templates, conversation schema, text and boxes). Beside it, rooms that depend
on it and never the reverse (ARCHITECTURE.md):

    loading/    our checkpoint format in and out, hub ids, placement, quantisation
    released/   the authors' release format: shards, convert, export, `released:NAME`
    serving/    one-request generation, the continuous-batching engine, its caches and process

Light parts (config, conversation schema, boxes, tiling geometry) import without torch.
Heavy parts (model, processor, loading, generation) load lazily on first attribute access, so
`storage` and other torch-free consumers can `import sphinx_model.conversation` cheaply.
`sphinx_model.from_pretrained` / `load_model` resolve every registered name, `released:NAME` too.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SphinxConfig": "sphinx_model.config",
    "get_preset": "sphinx_model.config",
    "list_presets": "sphinx_model.config",
    "Conversation": "sphinx_model.conversation",
    "Message": "sphinx_model.conversation",
    "Part": "sphinx_model.conversation",
    "SphinxProcessor": "sphinx_model.processor",
    "SphinxForCausalLM": "sphinx_model.modeling",
    "from_pretrained": "sphinx_model.loading",
    "save_pretrained": "sphinx_model.loading",
    "load_model": "sphinx_model.loading",
    "Generator": "sphinx_model.serving.generation",
    "GenerationSettings": "sphinx_model.serving.generation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sphinx_model' has no attribute {name!r}")
    if module == "sphinx_model.loading":
        importlib.import_module("sphinx_model.released")  # registers released:NAME with the loader
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
