"""`python -m train.split_tasks DATA.jsonl --tasks grounding,detection --out PART.jsonl`: the records of a
data file whose `task` names any of the tasks (and, with `--rest REST.jsonl`, the others).

The synthetic world writes one file whose records carry their turns' tasks (`"task":
"grounding+count_shape"`); a mixture weighs datasets, not tasks, so weighting a run toward the tasks
far from target starts by splitting the file (issue 18, Gate C). Lines are copied byte for byte:
image paths stay relative to the same folder, so the parts are written next to the source. A line
that is not a JSON object with a string `task` goes to the rest (it names no task), never lost.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def record_tasks(line: bytes) -> set[str]:
    """The tasks a JSONL line names in its `task` field ('+'-separated), empty where it names none."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return set()
    task = record.get("task") if isinstance(record, dict) else None
    return set(task.split("+")) if isinstance(task, str) else set()


def split_tasks(source: Path, tasks: set[str], out: Path, rest: Path | None = None) -> tuple[int, int]:
    """Write the lines of `source` that name any of `tasks` to `out` (the others to `rest`, if given);
    returns (lines kept, lines not kept)."""
    if not tasks:
        raise ValueError("--tasks names no task")
    if out.resolve() == source.resolve() or (rest is not None and rest.resolve() in (source.resolve(), out.resolve())):
        raise ValueError("the parts must be new files, not the source or each other")
    kept = other = 0
    with open(source, "rb") as f, open(out, "wb") as part, \
            (open(rest, "wb") if rest is not None else open("/dev/null", "wb")) as others:
        for line in f:
            if not line.strip():
                continue
            line = line if line.endswith(b"\n") else line + b"\n"
            if record_tasks(line) & tasks:
                part.write(line)
                kept += 1
            else:
                others.write(line)
                other += 1
    return kept, other


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.split_tasks", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a JSONL data file whose records have a 'task' field")
    ap.add_argument("--tasks", required=True, help="comma-separated task names, e.g. grounding,detection")
    ap.add_argument("--out", required=True, type=Path, help="where the records naming any of them go")
    ap.add_argument("--rest", type=Path, help="where the other records go (optional)")
    a = ap.parse_args(argv)
    try:
        kept, other = split_tasks(a.source, {t.strip() for t in a.tasks.split(",") if t.strip()}, a.out, a.rest)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{kept} records to {a.out}" + (f", {other} to {a.rest}" if a.rest else f" ({other} others left out)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
