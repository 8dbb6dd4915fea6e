"""Names with a scheme reach the loader through resolvers that other rooms register: `loading`
alone never imports `released`, and every public way in (the package's API, the CLI, the app,
training) has `released:NAME` registered."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sphinx_model.loading import CheckpointError, from_pretrained, register_scheme, resolve_checkpoint, save_pretrained
from sphinx_model.loading import schemes

ROOT = Path(__file__).resolve().parents[3]

ALONE = """
import sys
from sphinx_model.loading import CheckpointError, from_pretrained, registered_schemes
import sphinx_model.serving
assert registered_schemes() == (), registered_schemes()
assert not [m for m in sys.modules if m.startswith("sphinx_model.released")], "loading imported released"
try:
    from_pretrained("released:SPHINX-Tiny")
except CheckpointError as e:
    print("ERROR", e)
import sphinx_model
sphinx_model.from_pretrained
print("AFTER", registered_schemes())
"""


def test_loading_alone_never_imports_released_and_says_what_registers_it():
    out = subprocess.run([sys.executable, "-c", ALONE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR"))
    assert "'released:'" in error and "import sphinx_model.released" in error
    assert "AFTER ('released:',)" in out.stdout     # sphinx_model.from_pretrained registers it


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(schemes, "_RESOLVERS", dict(schemes._RESOLVERS))
    return schemes


def test_a_registered_scheme_resolves_to_its_folder(tiny, tmp_path, registry):
    folder = save_pretrained(*tiny, tmp_path / "ckpt")
    asked = []
    register_scheme("mine:", lambda name: asked.append(name) or folder)
    assert resolve_checkpoint("mine:tiny") == folder
    model, processor = from_pretrained("mine:tiny")
    assert asked == ["mine:tiny", "mine:tiny"]
    saved = tiny[0].state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_an_unregistered_scheme_is_one_line(registry):
    with pytest.raises(CheckpointError, match="no resolver is registered for 'nope:'") as err:
        from_pretrained("nope:thing")
    assert "\n" not in str(err.value)


def test_a_local_folder_whose_name_holds_a_colon_is_a_folder(tiny, tmp_path, registry):
    register_scheme("run:", lambda name: pytest.fail("a folder is not a scheme"))
    folder = save_pretrained(*tiny, tmp_path / "run:7")
    assert resolve_checkpoint(str(folder)) == folder


@pytest.mark.parametrize("bad", ["released", ":", "1x:", "a b:"])
def test_a_scheme_is_a_word_and_a_colon(bad, registry):
    with pytest.raises(ValueError, match="scheme"):
        register_scheme(bad, lambda name: Path(name))
