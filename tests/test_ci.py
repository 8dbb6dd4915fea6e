"""CI runs the README's test command, nothing else: a newcomer's command and CI cannot drift apart."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks() -> list[str]:
    """The README's fenced bash blocks, read here independently of .ci/readme_commands.py."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_executes_exactly_the_readmes_test_command():
    test_command = readme_blocks()[1]
    printed = subprocess.run(["bash", str(ROOT / ".ci/run"), "--print"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.strip()
    assert printed == test_command
    assert "python -m pytest -q tests" in test_command


def test_ci_installs_and_tests_nothing_of_its_own():
    """Every install and test step lives behind the README's command, so CI cannot do more than it."""
    steps = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert not [s for s in steps if re.search(r"\bpip\b|pytest|apt-get|\.ci/\w+\.sh", s)], steps


def test_the_readmes_test_command_installs_what_the_tests_need():
    """The README's test command installs the eval extra (the lmms-eval tests), the app's requirements,
    the Debian packages and PostgreSQL; the app command's requirements are a part of it."""
    app_command, test_command = readme_blocks()[:2]
    assert "bash .ci/install.sh" in test_command
    install = (ROOT / ".ci/install.sh").read_text()
    for step in ('pip install -q -e ".[eval]"', "pip install -q -r requirements.txt", "bash .ci/debian.sh",
                 "bash .ci/postgres.sh"):
        assert step in install, step
    assert "pip install -r requirements.txt" in app_command and app_command.endswith("python app.py")
