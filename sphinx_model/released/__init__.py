"""The authors' release format (LLaMA2-Accessory SPHINX folders) and `released:NAME`.

    shards.py    reading a released folder: weights-only shards, their merge, its JSON
    convert.py   released folder -> our checkpoint (convert_accessory)
    export.py    our model -> the released layout (export_accessory)
    hub.py       `released:NAME`: download once, convert once, cache; push a folder to the hub
    cli.py       `python -m sphinx_model convert-accessory`

Depends on `loading` (it writes and reads our format), never imported by it: importing this
package registers the `released:` scheme with the loader (loading/schemes.py), so
`from_pretrained("released:SPHINX-Tiny")` and `--model released:NAME` resolve here.
"""
from ..loading.schemes import register_scheme
from .hub import SCHEME, RELEASED_MEMBERS, is_released, push_to_hub, resolve_released

register_scheme(SCHEME, resolve_released)

__all__ = ["RELEASED_MEMBERS", "SCHEME", "is_released", "push_to_hub", "resolve_released"]
