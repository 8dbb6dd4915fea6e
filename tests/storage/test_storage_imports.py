"""`storage` stays light: no torch, no app, no train (checked in a fresh interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "app", "train", "transformers", "gradio")


def test_import_storage_does_not_import_torch_app_or_train() -> None:
    code = (
        "import json, sys\n"
        "import storage, storage.db, storage.models, storage.repository, storage.images\n"
        "import storage.export, storage.stats, storage.__main__\n"
        f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
