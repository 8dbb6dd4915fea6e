"""`convert-accessory` against hostile released folders: one `error:` line and exit 2 each, nothing
pickled ever runs, nothing is written."""
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from sphinx_model.__main__ import main
from sphinx_model.config import get_preset
from sphinx_model.loading import build_from_config
from sphinx_model.released.convert import find_shards
from sphinx_model.released.export import export_accessory

PRESET = "sphinx-test-released"   # hidden 64, 4 heads, 2 kv heads


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = build_from_config(get_preset(PRESET))
    return export_accessory(model, None, tmp_path_factory.mktemp("released") / "src")


class _Payload:
    """Unpickling this would create the file it names."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _set_json(name, value):
    def damage(src: Path) -> None:
        (src / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return damage


def _set_arg(key, value):
    def damage(src: Path) -> None:
        args = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**args, key: value}))
    return damage


def _shard_bytes(data_of):
    def damage(src: Path) -> None:
        shard = find_shards(src)[0]
        shard.write_bytes(data_of(shard))
    return damage


def _malicious(src: Path) -> None:
    shard = find_shards(src)[0]
    with open(shard, "wb") as f:
        pickle.dump({"model": {"llma.x": _Payload(str(src / "PWNED"))}}, f, protocol=2)


def _non_tensor_values(src: Path) -> None:
    torch.save({"model": {"llma.tok_embeddings.weight": 5, "llma.note": "hello"}}, find_shards(src)[0])


def _fifo_shard(src: Path) -> None:
    shard = find_shards(src)[0]
    shard.unlink()
    os.mkfifo(shard)


def _fifo_meta(src: Path) -> None:
    (src / "meta.json").unlink()
    os.mkfifo(src / "meta.json")


CASES = {
    "meta.json is a list": (_set_json("meta.json", []), "must hold a JSON object, got list"),
    "config.json is a string": (_set_json("config.json", '"just text"'), "must hold a JSON object, got str"),
    "meta.json is not JSON": (_set_json("meta.json", "{oops"), "not valid JSON"),
    "meta.json nests absurdly": (_set_json("meta.json", "[" * 100_000), "not valid JSON"),
    "meta.json llama_type a number": (_set_json("meta.json", {"llama_type": 5}), "llama_type must be a string"),
    "meta.json is a FIFO": (_fifo_meta, "FIFO"),
    "zero heads": (_set_arg("n_heads", 0), "head counts are impossible"),
    "negative heads": (_set_arg("n_heads", -4), "head counts are impossible"),
    "heads do not divide dim": (_set_arg("n_heads", 3), "head counts are impossible"),
    "odd head size": (_set_arg("n_heads", 64), "head counts are impossible"),
    "kv heads do not divide heads": (_set_arg("n_kv_heads", 3), "head counts are impossible"),
    "heads a string": (_set_arg("n_heads", "four"), "'n_heads' must be an integer"),
    "heads a fraction": (_set_arg("n_heads", 4.5), "'n_heads' must be an integer"),
    "heads astronomically many": (_set_arg("n_heads", 10**30), "'n_heads' must be an integer"),
    "heads true": (_set_arg("n_heads", True), "'n_heads' must be an integer"),
    "rope_theta a string": (_set_arg("rope_theta", "big"), "'rope_theta' must be a finite number"),
    "rope_theta NaN": (_set_arg("rope_theta", float("nan")), "'rope_theta' must be a finite number"),
    "norm_eps a list": (_set_arg("norm_eps", [1]), "'norm_eps' must be a finite number"),
    "max_seq_len a dict": (_set_arg("max_seq_len", {}), "'max_seq_len' must be an integer"),
    "a pickle that would run code": (_malicious, "was not loaded: refused for safety, since unpickling it could run"),
    "a pickle of plain values": (_non_tensor_values, "holds something other than tensors and was not loaded"),
    "a truncated shard": (_shard_bytes(lambda p: p.read_bytes()[:1000]), "not a readable PyTorch checkpoint"),
    "an empty shard": (_shard_bytes(lambda p: b""), "not a readable PyTorch checkpoint"),
    # noise (seeded: random bytes read either as a refused pickle or as a broken archive)
    "a shard of noise": (_shard_bytes(lambda p: random.Random(0).randbytes(5000)), "was not loaded"),
    "a shard of other noise": (_shard_bytes(lambda p: random.Random(2).randbytes(5000)),
                               "not a readable PyTorch checkpoint"),
    "a FIFO shard": (_fifo_shard, "FIFO"),
    "a garbage tokenizer.model": (_set_json("tokenizer.model", "not sentencepiece"), "not a usable SentencePiece"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_released_folder(released, tmp_path, capsys, case):
    damage, message = CASES[case]
    src = Path(shutil.copytree(released, tmp_path / "src"))
    damage(src)
    code = main(["convert-accessory", str(src), str(tmp_path / "out"), "--base-preset", PRESET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]
    assert not (src / "PWNED").exists() and not (tmp_path / "out").exists()


def test_the_untouched_folder_converts(released, tmp_path, capsys):
    assert main(["convert-accessory", str(released), str(tmp_path / "out"), "--base-preset", PRESET]) == 0
    assert "0 unmapped, 0 missing" in capsys.readouterr().out


def test_help_prints_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["convert-accessory", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--base-preset" in out and "src" in out
