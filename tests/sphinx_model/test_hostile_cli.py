"""`python -m sphinx_model` against hostile arguments and input: every foreseeable failure is one
`error:` line and exit 2; an unforeseen one is one line and exit 1, with a traceback under --debug."""
import io
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from sphinx_model import __main__ as cli
from sphinx_model.loading import save_pretrained

MODEL = ["chat", "--model", "sphinx-test-tiny"]


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    Image.new("RGB", (64, 32), (200, 30, 30)).save(root / "ok.png")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "text.png").write_text("not an image")
    os.mkfifo(root / "pipe.png")
    (root / "folder.png").mkdir()
    (root / "not_a_checkpoint").mkdir()
    bad = save_pretrained(*tiny, root / "bad_ckpt")
    (bad / "sphinx_config.json").write_text("[]")
    return root


def cases(root):
    return {
        "no command": ([], "required: command"),
        "unknown command": (["serve"], "invalid choice"),
        "unknown flag": (MODEL + ["--colour", "red"], "unrecognized arguments"),
        "max-new-tokens not a number": (MODEL + ["--max-new-tokens", "many"], "invalid int value"),
        "max-new-tokens zero": (MODEL + ["--max-new-tokens", "0", "--prompt", "x"], "max_new_tokens must be >= 1"),
        "temperature NaN": (MODEL + ["--temperature", "nan", "--prompt", "x"], "temperature must be a finite"),
        "temperature inf": (MODEL + ["--temperature", "inf", "--prompt", "x"], "temperature must be a finite"),
        "top-p above 1": (MODEL + ["--top-p", "2", "--prompt", "x"], "top_p in (0, 1]"),
        "seed negative": (MODEL + ["--seed", "-1", "--prompt", "x"], "seed must be an integer in"),
        "seed huge": (MODEL + ["--seed", str(2**70), "--prompt", "x"], "seed must be an integer in"),
        "device malformed": (MODEL + ["--device", "banana", "--prompt", "x"], "unknown device"),
        "device index malformed": (MODEL + ["--device", "cuda:x", "--prompt", "x"], "unknown device"),
        "device absent": (MODEL + ["--device", "cuda:99", "--prompt", "x"], "device 'cuda:99'"),
        "dtype unknown": (MODEL + ["--dtype", "int8"], "invalid choice"),
        "prompt empty": (MODEL + ["--prompt", "  "], "--prompt is empty"),
        "prompt invalid UTF-8 from argv": (MODEL + ["--prompt", b"caf\xe9 \xff".decode("utf-8", "surrogateescape")],
                                           "lone surrogate"),
        "prompt longer than the context": (MODEL + ["--prompt", "x" * 5000], "the model takes at most"),
        "model path missing": (["chat", "--model", str(root / "nope"), "--prompt", "x"], "neither a local folder"),
        "model repo not cached offline": (["chat", "--model", "someone/missing-model", "--prompt", "x"],
                                          "not in the Hugging Face cache"),
        "model is a file": (["chat", "--model", str(root / "ok.png"), "--prompt", "x"], "is a file"),
        "model folder without config": (["chat", "--model", str(root / "not_a_checkpoint"), "--prompt", "x"],
                                        "not a SPHINX checkpoint"),
        "model config is a list": (["chat", "--model", str(root / "bad_ckpt"), "--prompt", "x"],
                                   "must be a JSON object"),
        "model id malformed": (["chat", "--model", "a/b/c/d", "--prompt", "x"], "a/b/c/d"),
        "image missing": (MODEL + ["--image", str(root / "missing.png"), "--prompt", "x"], "cannot read image"),
        "image FIFO": (MODEL + ["--image", str(root / "pipe.png"), "--prompt", "x"], "FIFO"),
        "image device": (MODEL + ["--image", "/dev/zero", "--prompt", "x"], "character device"),
        "image folder": (MODEL + ["--image", str(root / "folder.png"), "--prompt", "x"], "folder"),
        "image not an image": (MODEL + ["--image", str(root / "text.png"), "--prompt", "x"], "not a recognised image"),
        "image truncated": (MODEL + ["--image", str(root / "truncated.png"), "--prompt", "x"], "truncated"),
        "convert no args": (["convert-accessory"], "required: src, dst"),
        "convert missing src": (["convert-accessory", str(root / "nope"), str(root / "out")], "not a folder"),
    }


CASE_NAMES = sorted(cases(__import__("pathlib").Path("/x")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_foreseeable_failures_are_one_error_line_exit_2(files, capsys, case):
    argv, message = cases(files)[case]
    try:
        code = cli.main(argv)
    except SystemExit as e:   # argparse's own exits go through our one-line error()
        code = e.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert message in lines[0], lines[0]
    assert "Traceback" not in out.err


@pytest.mark.skipif((Path(cli.__file__).resolve().parents[1] / "assets/demo/sphinx_config.json").is_file(),
                    reason="the demo model is present: chat without --model uses it")
def test_no_model_and_no_demo_model_is_one_line(capsys):
    assert cli.main(["chat", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no --model given and no demo model at")


def test_an_answer_still_works(files, capsys):
    assert cli.main(MODEL + ["--image", str(files / "ok.png"), "--prompt", "What is this?",
                             "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err == ""


def test_invalid_utf8_on_stdin_is_one_line(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8"))
    assert cli.main(MODEL) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


@pytest.mark.parametrize("debug", [False, True])
def test_an_unforeseen_failure_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch, debug):
    from sphinx_model.loading import checkpoint

    def boom(*args, **kwargs):
        raise RuntimeError("the tensor\nexploded")

    monkeypatch.setattr(checkpoint, "load_model", boom)
    code = cli.main((["--debug"] if debug else []) + MODEL + ["--prompt", "x"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: unexpected RuntimeError: the tensor exploded")
    assert ("Traceback" in err) == debug and (len(err.strip().splitlines()) == 1) != debug


def test_debug_after_the_command_works_too(capsys, monkeypatch):
    from sphinx_model.loading import checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: 1 / 0)
    assert cli.main(MODEL + ["--prompt", "x", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
