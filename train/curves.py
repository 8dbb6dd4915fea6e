"""`python -m train.curves --out curves.png RUN_DIR [RUN_DIR ...]`: draw the loss curves of runs.

Reads each run's metrics.jsonl (the expert stage's and `python -m train`'s) and plots train
and eval loss against the step, one panel per run, so a model card shows how it was trained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{'train': (steps, losses), 'eval': (...)} from either metrics layout."""
    out: dict[str, tuple[list[int], list[float]]] = {"train": ([], []), "eval": ([], [])}
    for r in rows:
        if "split" in r and "loss" in r:              # expert stage
            split, value = r["split"], r["loss"]
        elif "train/loss" in r:
            split, value = "train", r["train/loss"]
        elif "eval/loss" in r:
            split, value = "eval", r["eval/loss"]
        else:
            continue
        out[split][0].append(int(r["step"]))
        out[split][1].append(float(value))
    return out


def plot(runs: list[Path], out: Path, titles: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.6), squeeze=False)
    for k, (run, ax) in enumerate(zip(runs, axes[0])):
        s = series(read_metrics(run))
        ax.plot(*s["train"], label="train", lw=1)
        if s["eval"][0]:
            ax.plot(*s["eval"], "o-", label="eval (held out)", lw=1.5, ms=4)
        ax.set_title(titles[k] if titles else run.name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.curves", description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--titles", nargs="*")
    args = ap.parse_args(argv)
    try:
        plot(args.runs, args.out, args.titles)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
