"""Flags, their environment twins, and the entry point's one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.main import main
from app.settings import FALLBACK_PRESET, SettingsError, parse_settings


def test_flags_win_over_environment_which_wins_over_defaults():
    env = {"SPHINX_MODEL": "env-model", "SPHINX_PORT": "9000", "SPHINX_DATA_DIR": "/tmp/envdata",
           "SPHINX_SHARE": "true", "SPHINX_DTYPE": "bfloat16"}
    s = parse_settings(["--model", "flag-model", "--host", "0.0.0.0"], env)
    assert (s.model, s.port, s.data_dir, s.share, s.dtype, s.host) == (
        "flag-model", 9000, Path("/tmp/envdata"), True, "bfloat16", "0.0.0.0")
    d = parse_settings([], {})
    assert (d.model, d.host, d.port, d.share, d.db_url, d.device) == (None, "127.0.0.1", 7860, False, None, None)
    assert d.storage.database_url.database.endswith("data/sphinx.db")
    space = parse_settings([], {"SYSTEM": "spaces", "GRADIO_SERVER_NAME": "0.0.0.0"})
    assert space.on_space and space.host == "0.0.0.0"


def test_the_default_model_is_the_demo_folder_or_the_tiny_preset(monkeypatch, tmp_path):
    import app.settings as settings_mod

    monkeypatch.setattr(settings_mod, "DEMO_MODEL_DIR", tmp_path / "demo")
    assert parse_settings([], {}).model_spec == FALLBACK_PRESET
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "sphinx_config.json").write_text("{}")
    assert parse_settings([], {}).model_spec == str(tmp_path / "demo")


def test_quantize_flag_and_its_twin():
    assert parse_settings(["--quantize", "8bit"], {}).quantize == "8bit"
    assert parse_settings([], {"SPHINX_QUANTIZE": "4bit"}).quantize == "4bit"
    assert parse_settings([], {}).quantize is None


@pytest.mark.parametrize("argv, env", [(["--port", "http"], {}), ([], {"SPHINX_PORT": "70000"}),
                                      (["--dtype", "int3"], {}), ([], {"SPHINX_SHARE": "maybe"}),
                                      (["--quantize", "3bit"], {}), ([], {"SPHINX_QUANTIZE": "fp4"})])
def test_bad_values_are_refused(argv, env):
    with pytest.raises(SettingsError):
        parse_settings(argv, env)


def test_the_browser_secret_is_kept_across_restarts(tmp_path):
    s = parse_settings(["--data-dir", str(tmp_path)], {})
    first = s.secret()
    assert first == parse_settings(["--data-dir", str(tmp_path)], {}).secret() and len(first) > 20
    assert (tmp_path / "browser_secret").stat().st_mode & 0o777 == 0o600


def test_main_prints_one_error_line_and_exits_2(capsys, tmp_path):
    assert main(["--port", "0x"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --port must be an integer")
    assert main(["--model", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load model") and "\n" not in err


def test_a_store_that_cannot_be_opened_is_one_line_without_the_password(capsys, tmp_path):
    assert main(["--db", "postgresql+psycopg2://user:hunter2@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot open the store at postgresql+psycopg2://user:***@") and "hunter2" not in err
    assert "\n" not in err


def test_feedback_repo_interval_admin_token_and_space_author():
    s = parse_settings(["--feedback-every", "5"], {"SPHINX_FEEDBACK_REPO": "host/feedback",
                                                   "SPHINX_ADMIN_TOKEN": "t0ken", "SPACE_AUTHOR_NAME": "host"})
    assert (s.feedback_repo, s.feedback_every, s.admin_token) == ("host/feedback", 5.0, "t0ken")
    assert s.space_author is None                               # only a Space names its owner
    assert parse_settings([], {"SYSTEM": "spaces", "SPACE_AUTHOR_NAME": "host"}).space_author == "host"
    d = parse_settings([], {})
    assert (d.feedback_repo, d.feedback_every, d.admin_token) == (None, 10.0, None)
    with pytest.raises(SettingsError, match="--feedback-every"):
        parse_settings(["--feedback-every", "0"], {})
