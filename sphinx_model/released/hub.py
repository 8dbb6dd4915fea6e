"""`released:NAME`: the authors' released SPHINX checkpoints, downloaded once, converted once, cached.

    from_pretrained("released:SPHINX-Tiny")        # also --model in the CLI and the app

NAME is a folder of the hub repo `Alpha-VLLM/LLaMA2-Accessory` under `finetune/mm/SPHINX/`
(`RELEASED_MEMBERS`). The `released:` scheme cannot be mistaken for a hub repo id (a colon is
not allowed there), a preset name or, in practice, a local folder.

The first use downloads only that folder through huggingface_hub (`snapshot_download` with
`allow_patterns`: its progress bars, its resumable downloads, its cache under HF_HOME), converts
it with `convert_accessory` into `<cache>/released/NAME` — written to a temporary folder beside
it and renamed when complete, so an interrupted conversion leaves nothing half-written — and
loads it from there; every later use, offline too, loads the converted folder without asking
the hub. `<cache>` is `$SPHINX_CACHE`, else `$XDG_CACHE_HOME/sphinx_model`, else
`~/.cache/sphinx_model`. A converted folder is an ordinary checkpoint: `push_to_hub` publishes it
as a hub repo in our format, which `from_pretrained("user/repo")` loads.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from ..loading.checkpoint import CheckpointError

SCHEME = "released:"
RELEASED_REPO = "Alpha-VLLM/LLaMA2-Accessory"
RELEASED_ROOT = "finetune/mm/SPHINX"
STAMP = "sphinx_released.json"     # written last: a converted folder is complete when it holds this


@dataclass(frozen=True)
class ReleasedMember:
    """One released folder: its `llama_type` (which picks the preset) and its LLM."""

    llama_type: str
    llm: str


RELEASED_MEMBERS: dict[str, ReleasedMember] = {
    "SPHINX-Tiny": ReleasedMember("llama_ens_light", "TinyLlama-1.1B"),
    "SPHINX-Tiny-1k": ReleasedMember("llama_ens5_light", "TinyLlama-1.1B"),
    "SPHINX": ReleasedMember("llama_ens", "LLaMA2-13B"),
    "SPHINX-1k": ReleasedMember("llama_ens5", "LLaMA2-13B"),
    "SPHINX-v2-1k": ReleasedMember("llama_ens5", "LLaMA2-13B"),
    "SPHINX-MoE": ReleasedMember("mixtral_sparse_ens", "Mixtral-8x7B"),
    "SPHINX-MoE-1k": ReleasedMember("mixtral_sparse_ens5", "Mixtral-8x7B"),
}


def is_released(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEME)


def released_name(spec: str) -> str:
    """NAME of `released:NAME`, checked against the released folders."""
    name = spec[len(SCHEME):] if is_released(spec) else spec
    if name not in RELEASED_MEMBERS:
        raise CheckpointError(f"unknown released checkpoint {spec!r}; known: "
                              f"{', '.join(SCHEME + n for n in RELEASED_MEMBERS)}")
    return name


def cache_root() -> Path:
    """Where converted released checkpoints live (see the module docstring)."""
    if os.environ.get("SPHINX_CACHE"):
        return Path(os.environ["SPHINX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sphinx_model"


def converted_folder(spec: str, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "released" / released_name(spec)


def hub_folder(name: str) -> str:
    return f"{RELEASED_ROOT}/{name}"


def download_released(spec: str) -> Path:
    """The released folder, from the Hugging Face cache or downloaded into it (only that folder)."""
    name = released_name(spec)
    try:
        snapshot = huggingface_hub.snapshot_download(RELEASED_REPO, allow_patterns=[f"{hub_folder(name)}/*"])
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        raise CheckpointError(_unavailable(name, e)) from e
    folder = Path(snapshot) / hub_folder(name)
    if not folder.is_dir():
        raise CheckpointError(f"the hub repo {RELEASED_REPO} has no folder {hub_folder(name)}")
    return folder


def resolve_released(spec: str, cache: Path | None = None, progress: bool = True) -> Path:
    """The converted checkpoint folder of `released:NAME`, downloading and converting on first use."""
    target = converted_folder(spec, cache)
    if (target / STAMP).is_file():
        return target
    name = released_name(spec)
    source = download_released(spec)
    if progress and sys.stderr.isatty():
        print(f"converting {name} into {target} (once)", file=sys.stderr, flush=True)
    convert_into(source, target, progress=progress, stamp={"repo": RELEASED_REPO, "folder": hub_folder(name),
                                                           "revision": _revision(source, name)})
    return target


def convert_into(source: Path, target: Path, progress: bool = False, stamp: dict | None = None) -> None:
    """Convert `source` into `target` through a temporary sibling folder renamed at the end."""
    from .convert import convert_accessory

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        report = convert_accessory(source, tmp / "ckpt", progress=progress)
        (tmp / "ckpt" / STAMP).write_text(json.dumps({**(stamp or {}), "report": report.lines()}, indent=2) + "\n",
                                          encoding="utf-8")
        if target.exists():  # an older, unfinished attempt (no stamp)
            shutil.rmtree(target)
        os.replace(tmp / "ckpt", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Publish a checkpoint folder (ours: `sphinx_config.json` + safetensors + tokenizer) as the
    hub repo `repo_id`; returns the commit URL. `from_pretrained(repo_id)` loads it back."""
    folder = Path(folder)
    if not (folder / "sphinx_config.json").is_file():
        raise CheckpointError(f"{folder} is not a SPHINX checkpoint (no sphinx_config.json)")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=[STAMP],
                             commit_message="SPHINX checkpoint (sphinx_model format)")
    return str(getattr(info, "commit_url", info))


def _revision(source: Path, name: str) -> str | None:
    """The hub commit of a snapshot folder (`.../snapshots/<commit>/finetune/mm/SPHINX/NAME`)."""
    snapshot = source
    for _ in hub_folder(name).split("/"):
        snapshot = snapshot.parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def _unavailable(name: str, error: Exception) -> str:
    offline = isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or \
        huggingface_hub.constants.HF_HUB_OFFLINE
    why = "downloads are off (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else \
        "the hub cannot be reached" if offline else f"the download failed ({' '.join(str(error).split())[:160]})"
    return (f"released:{name} is not converted yet ({converted_folder(name)} is missing) and its files are not "
            f"in the Hugging Face cache; {why}. With network access, run `python -m sphinx_model convert-accessory "
            f"released:{name} OUT` or any command with --model released:{name} once: it downloads "
            f"{hub_folder(name)}/* of {RELEASED_REPO} (several GB) into "
            f"{huggingface_hub.constants.HF_HUB_CACHE} and converts it into {converted_folder(name)}; or fetch "
            f"the folder yourself: hf download {RELEASED_REPO} --include '{hub_folder(name)}/*'")
