"""`from_pretrained` against hostile and damaged checkpoint folders: one CheckpointError line each,
and nothing outside the folder is ever opened."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sphinx_model.config import CONFIG_FILE
from sphinx_model.loading import CheckpointError, from_pretrained, save_pretrained

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """One sharded and one single-file checkpoint of the tiny model."""
    model, proc = tiny
    root = tmp_path_factory.mktemp("saved")
    return (save_pretrained(model, proc, root / "single"),
            save_pretrained(model, proc, root / "sharded", max_shard_size="200KB"))


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, symlinks=True))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def secret(tmp_path: Path) -> Path:
    """A file outside every checkpoint, standing in for /etc/passwd."""
    p = tmp_path / "outside" / "passwd"
    p.parent.mkdir(exist_ok=True)
    p.write_text("root:x:0:0\n")
    return p


def shard_names(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))


def point_index_at(folder: Path, target: str) -> None:
    first = shard_names(folder)[0]
    edit_json(folder / INDEX, lambda d: {**d, "weight_map": {k: target if v == first else v
                                                             for k, v in d["weight_map"].items()}})


def _index_escapes(folder, tmp_path):
    point_index_at(folder, os.path.relpath(secret(tmp_path), folder))     # ../../outside/passwd


def _index_absolute(folder, tmp_path):
    point_index_at(folder, str(secret(tmp_path)))


def _index_dotdot_back_inside(folder, tmp_path):
    point_index_at(folder, f"../{folder.name}/{shard_names(folder)[0]}")


def _shard_symlink_out(folder, tmp_path):
    name = shard_names(folder)[0]
    (folder / name).unlink()
    (folder / name).symlink_to(secret(tmp_path))


def _tokenizer_symlink_out(folder, tmp_path):
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(secret(tmp_path))


def _index_not_an_object(folder, tmp_path):
    (folder / INDEX).write_text("[1, 2]")


def _index_map_not_strings(folder, tmp_path):
    edit_json(folder / INDEX, lambda d: {**d, "weight_map": {"a": 3}})


def _index_not_json(folder, tmp_path):
    (folder / INDEX).write_text("{oops")


def _index_names_missing_file(folder, tmp_path):
    point_index_at(folder, "model-99999-of-99999.safetensors")


def _shard_fifo(folder, tmp_path):
    name = shard_names(folder)[0]
    (folder / name).unlink()
    os.mkfifo(folder / name)


SHARDED_CASES = {
    "index names ../ outside": (_index_escapes, "outside the checkpoint"),
    "index names an absolute path": (_index_absolute, "outside the checkpoint"),
    "index climbs out and back": (_index_dotdot_back_inside, "outside the checkpoint"),
    "shard is a link out": (_shard_symlink_out, "leads outside"),
    "tokenizer file is a link out": (_tokenizer_symlink_out, "leads outside"),
    "index is a list": (_index_not_an_object, "weight_map"),
    "index maps to numbers": (_index_map_not_strings, "weight_map"),
    "index is not JSON": (_index_not_json, "not a valid shard index"),
    "index names a missing shard": (_index_names_missing_file, "does not exist"),
    "shard is a FIFO": (_shard_fifo, "FIFO"),
}


def _weights_empty(folder, tmp_path):
    (folder / "model.safetensors").write_bytes(b"")


def _weights_truncated(folder, tmp_path):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _weights_garbage(folder, tmp_path):
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


def _weights_header_lies(folder, tmp_path):
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")


def _weights_symlink_out(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret(tmp_path))


def _weights_dir(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def _config_list(folder, tmp_path):
    (folder / CONFIG_FILE).write_text("[]")


def _config_wrong_type(folder, tmp_path):
    edit_json(folder / CONFIG_FILE, lambda d: {**d, "grid": "two"})


def _config_unknown_nested(folder, tmp_path):
    edit_json(folder / CONFIG_FILE, lambda d: {**d, "projector": {**d["projector"], "dropout": 0.1}})


def _config_negative_canvas(folder, tmp_path):
    edit_json(folder / CONFIG_FILE, lambda d: {**d, "canvas_size": -128})


def _config_not_json(folder, tmp_path):
    (folder / CONFIG_FILE).write_bytes(b"\xff\xfe{")


def _config_fifo(folder, tmp_path):
    (folder / CONFIG_FILE).unlink()
    os.mkfifo(folder / CONFIG_FILE)


def _config_llm_shape_absurd(folder, tmp_path):
    edit_json(folder / CONFIG_FILE, lambda d: {**d, "llm": {**d["llm"], "config": {**d["llm"]["config"],
                                                                                    "hidden_size": -5}}})


def _tokenizer_corrupt(folder, tmp_path):
    (folder / "tokenizer.json").write_text("{not a tokenizer")


SINGLE_CASES = {
    "weights empty": (_weights_empty, "not a readable safetensors"),
    "weights truncated": (_weights_truncated, "not a readable safetensors"),
    "weights garbage": (_weights_garbage, "not a readable safetensors"),
    "weights header claims a terabyte": (_weights_header_lies, "not a readable safetensors"),
    "weights are a link out": (_weights_symlink_out, "leads outside"),
    "weights are a folder": (_weights_dir, "not a regular file"),
    "config is a list": (_config_list, "must be a JSON object"),
    "config field of the wrong type": (_config_wrong_type, "grid must be an integer"),
    "config with an unknown nested field": (_config_unknown_nested, r"projector: unknown field.*dropout"),
    "config with a negative canvas": (_config_negative_canvas, "canvas_size"),
    "config not UTF-8": (_config_not_json, "not UTF-8"),
    "config is a FIFO": (_config_fifo, "FIFO"),
    "config builds no model": (_config_llm_shape_absurd, "does not build a model"),
    "tokenizer corrupt": (_tokenizer_corrupt, "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_hostile_sharded_checkpoint(saved, tmp_path, case, monkeypatch):
    from sphinx_model.loading import checkpoint

    damage, message = SHARDED_CASES[case]
    folder = copy(saved[1], tmp_path / "ckpt")
    damage(folder, tmp_path)
    opened = []
    real = checkpoint.load_file
    monkeypatch.setattr(checkpoint, "load_file", lambda f: opened.append(f) or real(f))
    with pytest.raises(CheckpointError, match=message) as err:
        from_pretrained(folder)
    assert "\n" not in str(err.value)
    assert not opened   # refused before any weight file was read


@pytest.mark.parametrize("case", sorted(SINGLE_CASES))
def test_hostile_single_file_checkpoint(saved, tmp_path, case):
    damage, message = SINGLE_CASES[case]
    folder = copy(saved[0], tmp_path / "ckpt")
    damage(folder, tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        from_pretrained(folder)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_links_inside_the_checkpoint_and_hub_snapshots_load(saved, tmp_path, tiny, make_image):
    """Links that stay inside are fine: a hub snapshot's files are links into the repo's blobs/."""
    repo = tmp_path / "models--me--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(saved[1].iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    from sphinx_model.loading import checkpoint

    monkey = pytest.MonkeyPatch()
    monkey.setattr(checkpoint, "snapshot_download", lambda repo_id: str(snapshot))
    try:
        model, proc = from_pretrained("me/tiny")
    finally:
        monkey.undo()
    batch = proc(checkpoint_conv(), make_image(48, 32))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny[0](**tiny[1](checkpoint_conv(), make_image(48, 32))).logits)
    with pytest.raises(CheckpointError, match="leads outside"):
        from_pretrained(snapshot)   # the same folder given as a local path: its root is itself


def checkpoint_conv():
    from sphinx_model.conversation import Conversation, Message
    return Conversation([Message.user("What?", image=True)])


def test_old_config_without_new_fields_loads_with_defaults(saved, tmp_path):
    folder = copy(saved[0], tmp_path / "ckpt")
    edit_json(folder / CONFIG_FILE, lambda d: {k: v for k, v in d.items() if k != "max_images"})
    _, proc = from_pretrained(folder)
    assert proc.max_images == 1
