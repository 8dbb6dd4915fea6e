"""Gate B's step cost: one expert-pretraining step of the demo experts on this machine, by how much of
the ImageNet CNN stays fixed (`freeze_blocks`).

Issue 18's Gate B pretrains the `sphinx-demo` experts (EfficientNet-Lite0 from ImageNet, 256-px views,
and a small ViT at 128 px; 2 x 2 views + the global one per scene) with dense read-outs of the world's
truth (`python -m train.experts --config train/configs/demo_experts_v5.yaml`). Its configured 1,500
steps of 8 scenes were estimated at ~35 s a step on 2 CPU cores, ~15 hours. `freeze_blocks` keeps the
stem and the first N of the CNN's 7 stages as ImageNet left them (no gradients, batch norms fixed), so
the backward stops before the high-resolution layers. Measured here: seconds of one step (forward,
backward, AdamW) on the same rendered scenes, median of the timed repeats after one warm-up, and the
hours the configured run would then take.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/bench_experts.py [--quick] [--no-write]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_args, machine_line, md_table, median, publish, setup, timed  # noqa: E402

NAME = "bench_experts"
RUN_STEPS = 1500          # train/configs/demo_experts_v5.yaml


def step_seconds(freeze: int, scenes: int, repeats: int, preset: str, imagenet: bool) -> float:
    """Median wall seconds of one training step of the expert trainer with `freeze` stages fixed."""
    from train.experts import ExpertRun, ExpertTrainer, RenderedViews, collate

    with tempfile.TemporaryDirectory() as tmp:
        run = ExpertRun(preset=preset, world_seed=0, spell_heads=True, imagenet_init=imagenet, freeze_blocks=freeze,
                        output_dir=Path(tmp), batch_size=scenes, workers=0)
        trainer = ExpertTrainer(run)
        data = RenderedViews(0, scenes, trainer.config, trainer.token_grid)
        pixels, targets = collate([data[i] for i in range(scenes)])

        def one() -> None:
            loss, _, _ = trainer.forward(pixels, targets)
            trainer.optim.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optim.step()

        one()                                                    # warm-up
        return median([timed(one)[0] for _ in range(repeats)])


def main(argv: list[str] | None = None) -> int:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=8, help="scenes per step (the configured run's batch)")
    args = ap.parse_args(argv)
    setup(args.threads)
    quick = args.quick
    preset, imagenet = ("sphinx-test-tiny", False) if quick else ("sphinx-demo", True)
    repeats = args.repeats or (1 if quick else 2)
    scenes = 2 if quick else args.scenes
    freezes = (0,) if quick else (0, 3, 5)
    rows = []
    for freeze in freezes:
        seconds = step_seconds(freeze, scenes, repeats, preset, imagenet)
        rows.append([freeze, f"{seconds:.1f}", f"{seconds * RUN_STEPS / 3600:.1f}"])
        print(f"freeze_blocks {freeze}: {seconds:.1f} s a step", flush=True)
    base = float(rows[0][1])
    for row in rows:
        row.append(f"{base / float(row[1]):.2f}x")
    body = "\n".join([
        "### Gate B: one expert-pretraining step (issue 18)",
        "",
        machine_line(),
        f"Preset `{preset}` experts, {scenes} scenes a step (x 5 views), spell heads, "
        f"median of {repeats} timed steps after a warm-up.",
        "",
        md_table(["freeze_blocks (CNN stages fixed)", "s / step", f"hours for {RUN_STEPS} steps", "speed-up"], rows),
    ])
    publish(NAME, body, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
