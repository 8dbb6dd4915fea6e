"""`python -m train` fed hostile and careless input: each case is one `error:` line, exit 2, and
nothing the run reads (data, mixture, config) or holds (checkpoints) changes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import pytest
import yaml
from synthetic import write_mixture, write_run

from train.__main__ import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and "cache" not in p.parts:
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def edit_run(key: str, value: object) -> Callable[[Path], list[str]]:
    """A case that sets run-config `section.key` to `value` in the YAML file itself."""
    def case(root: Path) -> list[str]:
        path = root / "run.yaml"
        cfg = yaml.safe_load(path.read_text())
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
        path.write_text(yaml.safe_dump(cfg))
        return ["--config", str(path)]
    return case


def edit_mixture(change: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def case(root: Path) -> list[str]:
        path = root / "m.yaml"
        body = yaml.safe_load(path.read_text())
        change(body)
        path.write_text(yaml.safe_dump(body))
        return ["--config", str(root / "run.yaml")]
    return case


def raw_config(text: str | bytes) -> Callable[[Path], list[str]]:
    def case(root: Path) -> list[str]:
        path = root / "raw.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(path)]
    return case


def args(*extra: str) -> Callable[[Path], list[str]]:
    return lambda root: ["--config", str(root / "run.yaml"), *[a.format(root=root) for a in extra]]


def fifo_dataset(root: Path) -> list[str]:
    os.mkfifo(root / "pipe.jsonl")
    return edit_mixture(lambda b: b["datasets"].append({"name": "pipe", "path": "pipe.jsonl"}))(root)


def output_under_a_file(root: Path) -> list[str]:
    (root / "plain_file").write_text("x")
    return edit_run("train.output_dir", str(root / "plain_file" / "out"))(root)


def all_bad_data(root: Path) -> list[str]:
    (root / "bad.jsonl").write_text('{"messages": [{"role": ["user"], "content": 5}]}\n[1, 2]\n'
                                    + "[" * 5000 + "]" * 5000 + "\n" + '{"messages": [], "meta": [1]}\n')
    return edit_mixture(lambda b: b.update(datasets=[{"name": "bad", "path": "bad.jsonl"}]))(root)


def alias_bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"{'abcdefghi'[i]}: &{'abcdefghi'[i]} [{', '.join(['*' + 'abcdefghi'[i - 1]] * 9)}]")
    lines.append("model: {overrides: {x: *i}}")
    return "\n".join(lines) + "\n"


CASES: dict[str, Callable[[Path], list[str]]] = {
    "config missing": lambda root: ["--config", str(root / "nope.yaml")],
    "config is a folder": lambda root: ["--config", str(root)],
    "config not UTF-8": raw_config(b"train:\n  seed: \xff\xfe\n"),
    "config is a list": raw_config("- 1\n- 2\n"),
    "config with python tags": raw_config("train: !!python/object/apply:os.system ['touch PWNED']\n"),
    "config alias bomb": raw_config(alias_bomb()),
    "config over 1 MB": raw_config("# " + "x" * (1 << 20) + "\n"),
    "config section not a mapping": raw_config("train: 5\n"),
    "unknown key": edit_run("train.batch_sise", 2),
    "seed negative": edit_run("train.seed", -1),
    "seed beyond 32 bits": edit_run("train.seed", 2**40),
    "log_every zero": edit_run("train.log_every", 0),
    "lr not a number": edit_run("optim.lr", float("nan")),
    "lr infinite": edit_run("optim.lr", float("inf")),
    "epochs absurd": edit_run("train.epochs", 1e300),
    "max_fallbacks absurd": edit_run("data.max_fallbacks", 10**9),
    "num_workers absurd": edit_run("data.num_workers", 10**6),
    "lora dropout above 1": edit_run("lora.dropout", 1.5),
    "mixture path NUL": edit_run("data.mixture", "m\0.yaml"),
    "output under a file": output_under_a_file,
    "output under unknown user": edit_run("train.output_dir", "~no_such_user_h3/out"),
    "unknown preset": edit_run("model.init", "sphinx-huge"),
    "init folder not a checkpoint": lambda root: (root / "empty").mkdir() or edit_run("model.init", str(root / "empty"))(root),
    "bad model override": edit_run("model.overrides", {"no_such_field": 1}),
    "--set without a dot": args("--set", "train=5"),
    "--set bad YAML": args("--set", "train.max_steps=[unclosed"),
    "--set huge number": args("--set", "train.seed=1e400"),
    "--resume missing": args("--resume", "{root}/gone"),
    "--resume a file": args("--resume", "{root}/m.yaml"),
    "--resume a folder without checkpoints": args("--resume", "{root}"),
    "samples_per_epoch absurd": edit_mixture(lambda b: b.update(samples_per_epoch=10**12)),
    "samples_per_epoch true": edit_mixture(lambda b: b.update(samples_per_epoch=True)),
    "dataset weight infinite": edit_mixture(lambda b: b["datasets"][0].update(weight=float("inf"))),
    "dataset path a list": edit_mixture(lambda b: b["datasets"][0].update(path=["a", "b"])),
    "dataset task a mapping": edit_mixture(lambda b: b["datasets"][0].update(task={"x": 1})),
    "dataset is a FIFO": fifo_dataset,
    "every record hostile": all_bad_data,
}


@pytest.fixture
def root(tmp_path, data_dir) -> Path:
    (tmp_path / "shapes.jsonl").write_bytes((data_dir / "shapes.jsonl").read_bytes())
    os.symlink(data_dir / "images", tmp_path / "images")
    write_mixture(tmp_path / "m.yaml", [("shapes", "shapes.jsonl", 1.0)])
    write_run(tmp_path, tmp_path / "m.yaml")
    return tmp_path


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(root, capsys, monkeypatch, name):
    monkeypatch.chdir(root)
    argv = CASES[name](root)
    before = digest(root)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (name, err)
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert not (root / "PWNED").exists()
    assert not list(root.rglob("step-*")) and not list(root.rglob("final"))
    assert digest(root) == before, name  # (the case's own edit happened before `before`)


def test_unforeseen_errors_are_one_line_and_debug_shows_the_traceback(root, capsys, monkeypatch):
    import train.__main__ as cli

    def boom(cfg, resume, allow=False):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr(cli, "_train", boom)
    assert main(["--config", str(root / "run.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: something nobody planned for (run with --debug for the traceback)"]
    assert main(["--config", str(root / "run.yaml"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_hostile_records_are_skipped_and_counted_not_fatal(root, processor):
    from train.records import REASONS, build_index
    from train.mixture import DatasetSpec

    rows = [{"messages": [{"role": "user", "content": [["nested"]]}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": 5, "content": "x"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "meta": "m"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": [1]},
            {"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": 7}]}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine"}]}]
    path = root / "h.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    with open(path, "ab") as f:
        f.write(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    index = build_index(DatasetSpec("h", path, root), processor, scan_images=True)
    assert index.bad_counts() == {"schema": len(rows) + 1} and set(index.bad_counts()) <= set(REASONS)
    assert (index.status == 0).sum() == 1
