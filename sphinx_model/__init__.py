"""SPHINX-X: a family of multimodal LLMs (mixture of visual experts + skip tokens + any HF causal LM).

Light parts (config, conversation schema, boxes, tiling geometry) import without torch.
Heavy parts (model, processor, generation) load lazily on first attribute access, so
`storage` and other torch-free consumers can `import sphinx_model.conversation` cheaply.
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
    "from_pretrained": "sphinx_model.checkpoint",
    "save_pretrained": "sphinx_model.checkpoint",
    "Generator": "sphinx_model.generation",
    "GenerationSettings": "sphinx_model.generation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sphinx_model' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
