"""The progress bar: loss, tokens/s and ETA (tqdm's), on the main process only."""
from __future__ import annotations


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.tokens_per_s: float | None = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        # a smoothed rate: one slow step (a checkpoint, an eval) should not make the bar jump
        self.tokens_per_s = tokens_per_s if self.tokens_per_s is None else 0.9 * self.tokens_per_s + 0.1 * tokens_per_s
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
