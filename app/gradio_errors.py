"""The one place where Gradio's own input failures become one-line messages.

Before a handler runs, Gradio checks the number of inputs, validates file payloads against its
pydantic `FileData` model and runs each component's `preprocess` (a Number parses its value).
A hostile or mistaken client (a string where a file goes, "abc" for a number, two of six
inputs) fails there, and Gradio would answer with a multi-line text (its "Could not
preprocess input component at index 5 ..." or a pydantic "1 validation error for FileData
... errors.pydantic.dev" block). `AppBlocks` catches those failures of its events and raises
one `gr.Error` line that names the endpoint and the input instead; the handlers' own checks
(`validation.py`) run after it.
"""
from __future__ import annotations

import re
from typing import Any

import gradio as gr

_WHAT = {"Number": "a number", "File": "a file (upload it, e.g. with gradio_client's handle_file)",
         "Image": "an image file", "Textbox": "text", "MultimodalTextbox": "text and files",
         "JSON": "JSON", "Radio": "one of its choices", "Slider": "a number", "Dropdown": "one of its choices"}
_INDEX = re.compile(r"at index (\d+)")


class AppBlocks(gr.Blocks):
    """gr.Blocks whose events answer a malformed input with one line (see the module doc)."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False):
        where = _where(block_fn)
        wanted = list(getattr(block_fn, "inputs", []) or [])
        if not isinstance(inputs, list) or len(inputs) < len(wanted):
            got = len(inputs) if isinstance(inputs, list) else 0
            names = ", ".join(_label(b, i) for i, b in enumerate(wanted))
            raise gr.Error(f"{where} takes {len(wanted)} inputs ({names}), got {got}", print_exception=False)
        for i, block in enumerate(wanted):      # Gradio would turn any value into text: {"a": 1} -> "{'a': 1}"
            if isinstance(block, gr.Textbox) and inputs[i] is not None and not isinstance(inputs[i], str):
                raise gr.Error(f"{where}: {_label(block, i)} must be text", print_exception=False)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - whatever Gradio raised, the caller gets one line
            raise gr.Error(_message(where, wanted, inputs, e), print_exception=False) from None


def _where(block_fn: Any) -> str:
    name = getattr(block_fn, "api_name", None)
    return f"/{name}" if isinstance(name, str) and name else "this event"


def _label(block: Any, i: int) -> str:
    label = getattr(block, "label", None)
    return str(label) if label else f"input {i + 1}"


def _message(where: str, wanted: list[Any], inputs: list[Any], error: BaseException) -> str:
    """`<endpoint>: <input label> must be <kind>`; the input is found from Gradio's message
    (its "at index N") or, for a payload its FileData model refuses, by checking each one."""
    if type(error).__name__ == "InvalidPathError":     # a file payload naming a path the client never uploaded
        index = next((i for i, v in enumerate(inputs[:len(wanted)]) if _names_a_path(v)), None)
        if index is not None:
            return f"{where}: {_label(wanted[index], index)} must be a file uploaded to this app"
    index = _failed_index(wanted, inputs, error)
    if index is None:
        return f"{where}: an input could not be read ({type(error).__name__})"
    block = wanted[index]
    kind = _WHAT.get(type(block).__name__, f"a value for a {type(block).__name__}")
    return f"{where}: {_label(block, index)} must be {kind}"


def _names_a_path(value: Any) -> bool:
    if isinstance(value, dict):
        return "path" in value
    return isinstance(value, list) and any(isinstance(v, dict) and "path" in v for v in value)


def _failed_index(wanted: list[Any], inputs: list[Any], error: BaseException) -> int | None:
    match = _INDEX.search(str(error))
    if match and int(match.group(1)) < len(wanted):
        return int(match.group(1))
    for i, block in enumerate(wanted):
        model = getattr(block, "data_model", None)
        if model is None or i >= len(inputs) or inputs[i] is None:
            continue
        try:
            model.model_validate(inputs[i], context={"validate_meta": True})
        except Exception:  # noqa: BLE001 - the payload this model refuses
            return i
    return None
