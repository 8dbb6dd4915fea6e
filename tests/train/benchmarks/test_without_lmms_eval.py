"""Without lmms-eval (the README's app command does not install the eval extra) the benchmark tests
collect and skip with the reason, instead of failing at collection."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

# `sys.modules[name] = None` makes find_spec answer None and `import lmms_eval` fail, as on a machine
# where it was never installed.
HIDE = ("import sys; sys.modules['lmms_eval'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', {files}]))")


def test_lmms_tests_skip_cleanly_when_lmms_eval_is_absent():
    files = ", ".join(repr(str(HERE / f)) for f in ("test_lmms_model.py", "test_lmms_cli.py"))
    done = subprocess.run([sys.executable, "-c", HIDE.format(files=files)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "error" not in out.lower().replace("errors=", ""), out
    assert "lmms-eval is not installed" in out
    assert " skipped" in out and " passed" not in out, out
