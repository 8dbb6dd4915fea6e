"""bench/RESULTS.md: one section per benchmark script (torch-free, so any bench may use it)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = "# Benchmark results\n\nEach section is written by the script it is named after (see bench/README.md).\n"


def write_section(name: str, body: str, path: Path = RESULTS) -> Path:
    """Put `body` between `<!-- name -->` and `<!-- /name -->` in `path`, replacing only that
    section (appended if absent; file created if missing). The file is re-read right before
    writing and replaced atomically, so other benchmarks' sections are kept."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else RESULTS_HEADER
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a results file is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
