"""`python -m train.gates.curves --out gate_a.png RUN_FOLDER [RUN_FOLDER ...]`: Gate A's learning curves.

One line per run: the teacher-forced coordinate accuracy ("near": the next coordinate token within
0.03 of the truth, `pointing.coordinate_accuracy`) against the run's own step, averaged over windows
of 50 steps; curriculum steps that start from an earlier run are drawn after it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WINDOW = 50


def near_curve(folder: Path) -> tuple[list[int], list[float]]:
    """(steps, windowed mean of coord_near) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl", encoding="utf-8") if line.strip()]
    rows = [r for r in rows if "coord_near" in r and r["coord_near"] == r["coord_near"]]   # NaN: no coordinate
    steps, values = [], []
    for i in range(0, len(rows) - WINDOW + 1, WINDOW):
        chunk = rows[i:i + WINDOW]
        steps.append(chunk[-1]["step"])
        values.append(sum(r["coord_near"] for r in chunk) / len(chunk))
    return steps, values


def start_step(folder: Path, ends: dict[str, int]) -> int:
    """Where a run's curve starts on the shared axis: after the run it was started from, if drawn."""
    record = folder / "run.json"
    if not record.exists():
        return 0
    init = json.loads(record.read_text()).get("init_weights")
    return ends.get(Path(init).parent.name, 0) if init else 0


def plot(folders: list[Path], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ends: dict[str, int] = {}
    for folder in folders:
        steps, values = near_curve(folder)
        if not steps:
            continue
        offset = start_step(folder, ends)
        ends[folder.name] = offset + steps[-1]
        ax.plot([offset + s for s in steps], values, label=folder.name)
    ax.set_xlabel("step (curriculum steps continue after the run they start from)")
    ax.set_ylabel("next coordinate within 0.03 (teacher-forced)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Gate A: oracle features, demo-sized LLM")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.gates.curves", description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="gate run folders, earlier curriculum steps first")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    missing = [str(r) for r in a.runs if not (r / "metrics.jsonl").exists()]
    if missing:
        print(f"no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 1
    print(plot(a.runs, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
