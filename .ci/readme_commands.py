"""Print one of the README's two opening commands (the first two fenced ```bash blocks): `app`
(install and serve) or `test` (install everything the tests need and run them). `.ci/run` executes
what this prints, so CI runs exactly what the README tells a newcomer to run."""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NAMES = ("app", "test")


def opening_commands(text: str) -> dict[str, str]:
    """The first two ```bash blocks of the README, each one command line."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    if len(blocks) < 2:
        raise SystemExit("error: README.md has fewer than two ```bash blocks")
    out = {}
    for name, block in zip(NAMES, blocks):
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) != 1:
            raise SystemExit(f"error: the README's {name} command must be one line, found {len(lines)}")
        out[name] = lines[0].strip()
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in NAMES:
        raise SystemExit(f"usage: python3 .ci/readme_commands.py {'|'.join(NAMES)}")
    print(opening_commands(README.read_text(encoding="utf-8"))[sys.argv[1]])
