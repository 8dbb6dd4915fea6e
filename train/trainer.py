"""The one training loop, on accelerate, for every stage, task and scale.

    cfg = load_run_config("train/configs/tiny_cpu.yaml")
    result = Trainer(cfg).run()                # or Trainer(cfg, resume=Path("runs/x")).run()

Setup order matters and is fixed: seed -> processor -> data index, split and the epoch plan
(a pure function of seed and epoch) -> model (after the seed, so frozen random weights are
reproducible) -> freeze spec / LoRA -> shard or wrap + optimiser -> scheduler -> resume.
A step is `grad_accum` micro-batches; losses, token counts and skip counts are reduced over
processes once per step. The data position is (epoch, micro-batch): with the plan, the
accelerate state (weights, optimiser, scheduler, RNG) and `trainer_state.json`, a resumed run
repeats the uninterrupted one step for step.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from sphinx_model.processor import IMAGE_TOKEN_ID
from sphinx_model.templates import IGNORE_INDEX

from .checkpointing import (CHECKPOINTS, Checkpoint, TrainerState, check_compatible, check_output_dir,
                            find_checkpoint, frozen_fingerprint, load_checkpoint, prune_checkpoints, save_checkpoint,
                            write_run_file)
from .config import ConfigError, RunConfig
from .data import Batch, Collator, ConversationDataset, make_loader
from .feature_files import FeatureCache
from .final import export_final
from .freeze import apply_freeze, apply_lora, check_lr_scale, lr_scale_of
from .losses import answer_mean_loss
from .mixture import DataError, EpochPlan, epoch_samples, load_mixture, plan_batches, rank_plan
from .model import build_model, cast_frozen_experts, load_processor, model_config
from .parallel import deepspeed_requested, prepare
from .progress import Progress
from .records import REASONS, open_records, split
from .resume_config import check_same_config, run_settings
from .world_supervision import HeadSpec, WorldBoxTargets, build_supervision

FINAL = "final"
METRICS = "metrics.jsonl"


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    losses: dict[int, float] = field(default_factory=dict)   # step -> mean train loss of that step
    eval_losses: dict[int, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)    # at indexing + while training
    stopped_early: bool = False
    memory: dict[str, list[float]] = field(default_factory=dict)  # per process, see Trainer._memory


def _local_bytes(t: torch.Tensor | None) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard
    return local.numel() * local.element_size()


class Trainer:
    def __init__(self, cfg: RunConfig, resume: Path | None = None, allow_config_change: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.allow_config_change = allow_config_change  # resume even if the config differs from the checkpoint's
        t = cfg.train
        t.output_dir.mkdir(parents=True, exist_ok=True)
        cpu = t.cpu or not torch.cuda.is_available()  # accelerate needs cpu=True for several CPU processes
        if cpu and deepspeed_requested():
            raise ConfigError("DeepSpeed runs on GPUs only here (accelerate has no DeepSpeed on CPU); "
                              "on CPU use DDP (torchrun) or FSDP (train.fsdp: true)")
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
            log_with="tensorboard" if t.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(t.output_dir), logging_dir=str(t.output_dir / "tb")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.ddp_find_unused_parameters)])
        self.result = RunResult(t.output_dir, None, 0)

    # --- setup ---------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.train.seed)
        saved = self._claim_output_dir()  # before anything heavy: a refused folder costs nothing
        config = model_config(cfg.model)
        if cfg.train.loss_per == "answer" and config.llm.router_aux_loss_coef:
            raise ConfigError("train.loss_per: answer leaves out the MoE load-balancing loss; "
                              "use loss_per: token with llm.router_aux_loss_coef")
        self.processor = load_processor(config, cfg.model)
        self._setup_data()  # before any weights load: a hopeless mixture fails in seconds
        model = build_model(config, cfg.model, cast_frozen=False)
        if self.dataset.features is not None:  # the cache must hold what these experts make of the images
            self.dataset.features.check(model)
        cast_frozen_experts(model, cfg.model)
        self.params = apply_freeze(model, cfg.freeze)
        if cfg.train.gradient_checkpointing:  # per decoder layer, recomputed in backward
            model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora)
        model.llm.config.use_cache = False
        self.fingerprint = frozen_fingerprint(model)
        model.to(acc.device)
        model.train()
        self.model, self.optimizer, self.mode = prepare(acc, model, cfg, self._make_optimizer)
        self.scheduler = self._make_scheduler()  # its state travels in trainer_state.json, not a pickle
        self.supervision, self.last_supervision = None, {}
        if cfg.supervision.enabled:              # hooks on the LLM's own attention layers (training only)
            sv = cfg.supervision
            try:
                self.supervision = build_supervision(acc.unwrap_model(self.model).llm, *(
                    HeadSpec(int(x[0]), int(x[1]), float(x[2])) for x in (sv.attend, sv.gather, sv.name)))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.coord_ids = torch.tensor(sorted(self.dataset.box_targets.values), device=acc.device)
        self.state = TrainerState(world_size=acc.num_processes, batch_size=cfg.train.batch_size,
                                  grad_accum=cfg.train.grad_accum, seed=cfg.train.seed,
                                  frozen_fingerprint=self.fingerprint)
        if saved is not None:
            check_compatible(saved.state, self.state)
            self.state = load_checkpoint(acc, self.model, self.optimizer, self.scheduler, self.mode, saved)
            self._print(f"resumed from {saved.folder} at step {self.state.step}")
        self.state.run_id = self.state.run_id or self._new_run_id()
        if acc.is_main_process:
            write_run_file(cfg.train.output_dir, self.state.run_id)
            self._trim_metrics(self.state.step)
        if cfg.train.tensorboard:
            acc.init_trackers("train")

    def _claim_output_dir(self) -> Checkpoint | None:
        """The verified checkpoint to resume (None for a new run), once the output folder is ours."""
        saved = find_checkpoint(self.resume, self.accelerator) if self.resume is not None else None
        check_output_dir(self.cfg.train.output_dir, saved.state if saved is not None else None)
        if saved is not None:      # the same run (checked above), continued with the same settings
            changed = check_same_config(saved.manifest.get("config"), run_settings(self.cfg), saved.folder,
                                        self.allow_config_change)
            if changed:
                self._print(f"warning: resuming with a changed config ({', '.join(changed)})")
        return saved

    def _new_run_id(self) -> str:
        """A random id, drawn by the main process (never from the seeded RNG streams) and shared."""
        from accelerate.utils import broadcast

        value = int.from_bytes(os.urandom(7), "big") if self.accelerator.is_main_process else 0
        shared = broadcast(torch.tensor([value], dtype=torch.int64, device=self.accelerator.device))
        return f"{int(shared[0]):014x}"

    def _trim_metrics(self, step: int) -> None:
        """Drop logged steps after `step`: a new run starts its log afresh, a resumed one repeats them."""
        path = self.cfg.train.output_dir / METRICS
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
        path.write_text("".join(kept), encoding="utf-8")

    def _setup_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        mixture = load_mixture(cfg.data.mixture)
        cache = cfg.data.cache_dir or cfg.train.output_dir / "cache"
        with acc.main_process_first():  # the main process indexes, the others read its cache
            store = open_records(mixture.datasets, self.processor, cfg.data.scan_images, cache)
        self.store = store
        self.index_skipped = store.bad_counts()
        parts = split(store, cfg.data.eval_per_dataset, cfg.train.seed)
        self.pools = parts.train
        self.eval_ids = parts.eval
        self.weights = mixture.weights
        self.samples_per_epoch = mixture.samples_per_epoch or int(sum(len(p) for p in self.pools))
        d = cfg.data
        features = FeatureCache(d.feature_cache) if d.feature_cache is not None else None
        try:
            targets = WorldBoxTargets(self.processor) if cfg.supervision.enabled else None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dataset = ConversationDataset(store, self.processor, d.max_text_tokens, d.truncate,
                                           pool=parts.train_pool, max_fallbacks=d.max_fallbacks, features=features,
                                           box_targets=targets)
        self.eval_dataset = ConversationDataset(store, self.processor, d.max_text_tokens, d.truncate,
                                                pool=self.eval_ids, max_fallbacks=d.max_fallbacks, features=features)
        self.collate = Collator(self.processor)
        self._plans: dict[int, EpochPlan] = {}
        self.steps_per_epoch = self.plan(0).steps
        if self.steps_per_epoch == 0:
            need = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
            raise DataError(f"the mixture has {self.samples_per_epoch} usable samples per epoch, fewer than one "
                            f"optimiser step takes (batch_size x grad_accum x processes = {need})")
        t = cfg.train
        self.total_steps = t.max_steps or max(1, math.floor(t.epochs * self.steps_per_epoch))
        self._print(f"data: {len(store)} records in {len(mixture.datasets)} datasets, "
                    f"{sum(len(p) for p in self.pools)} train / {len(self.eval_ids)} eval, "
                    f"skipped at indexing: {dict(self.index_skipped) or 'none'}; "
                    f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps"
                    + (f"; expert features of {len(features)} images from {d.feature_cache}" if features is not None else ""))

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            t, d, acc = self.cfg.train, self.cfg.data, self.accelerator
            ids = epoch_samples(self.pools, self.weights, self.samples_per_epoch, t.seed, epoch)
            batches = plan_batches(ids, self.store.lengths, t.batch_size, t.seed, epoch,
                                   d.group_by_length, d.megabatch_mult)
            self._plans = {epoch: rank_plan(batches, acc.process_index, acc.num_processes, t.grad_accum)}
        return self._plans[epoch]

    def base_lr(self) -> float:
        """optim.lr as the schedule has it now (groups scaled by optim.lr_scale move in proportion)."""
        group = self.optimizer.param_groups[0]
        return self.scheduler.get_last_lr()[0] * self.cfg.optim.lr / group.get("initial_lr", group["lr"])

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        check_lr_scale(model, o.lr_scale)
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                decay = 0.0 if p.ndim < 2 or name.endswith("_img") else o.weight_decay
                groups.setdefault((lr_scale_of(name, o.lr_scale), decay), []).append(p)
        return torch.optim.AdamW([{"params": ps, "lr": o.lr * scale, "weight_decay": decay}
                                  for (scale, decay), ps in groups.items()],
                                 lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        from transformers import get_cosine_schedule_with_warmup

        o = self.cfg.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else math.ceil(o.warmup_ratio * self.total_steps)
        return get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._setup()
        cfg, st = self.cfg.train, self.state
        progress = Progress(self.total_steps, st.step, enabled=cfg.progress and self.accelerator.is_main_process)
        try:
            while st.step < self.total_steps:
                plan = self.plan(st.epoch)
                if st.micro >= len(plan.batches):
                    st.epoch, st.micro = st.epoch + 1, 0
                    continue
                batches = iter(self._loader(plan.batches[st.micro:], st.epoch))
                while st.micro < len(plan.batches) and st.step < self.total_steps:
                    stats = self._train_step(batches)
                    st.micro += cfg.grad_accum
                    st.step += 1
                    self._after_step(stats, progress)
                    if cfg.stop_after_steps is not None and st.step >= cfg.stop_after_steps:
                        self.result.stopped_early = True
                        return self._finish(export=False)
        finally:
            progress.close()
        if self.eval_ids.size and (cfg.eval_every == 0 or st.step % cfg.eval_every):
            self._evaluate()
        if cfg.save_every and st.step % cfg.save_every:
            self._save()
        return self._finish(export=True)

    def _loader(self, batches: list[np.ndarray], epoch: int):
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)  # never touch the global RNG
        return make_loader(self.dataset, batches, self.cfg.data.num_workers, self.collate, generator=gen)

    def _train_step(self, batches) -> dict[str, Any]:
        acc, model = self.accelerator, self.model
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        counts = torch.zeros(3 + len(REASONS), dtype=torch.float64, device=acc.device)  # tokens, slots, samples, skips
        grad_norm = None
        for _ in range(self.cfg.train.grad_accum):
            batch: Batch = next(batches).to(acc.device)
            counts += torch.tensor([batch.tokens, batch.slots, batch.samples,
                                    *[batch.skipped.get(r, 0) for r in REASONS]], dtype=torch.float64, device=acc.device)
            if batch.inputs is None:
                raise DataError(f"every record of a batch was unusable ({dict(batch.skipped)}); "
                                "check the data (see the skip counts)")
            with acc.accumulate(model):
                with acc.autocast():
                    loss = self._loss(batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = self._optimizer_step()
            loss_sum += loss.detach().double()
        totals = acc.reduce(torch.cat([loss_sum.reshape(1), counts]), reduction="sum")
        n_micro = self.cfg.train.grad_accum * acc.num_processes
        tokens, slots, samples = (int(x) for x in totals[1:4].tolist())
        return {"loss": float(totals[0]) / n_micro, "tokens": tokens, "slots": slots, "samples": samples,
                "skipped": {r: int(n) for r, n in zip(REASONS, totals[4:].tolist()) if n},
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "lr": self.base_lr(), "seconds": time.perf_counter() - started}

    def _loss(self, batch: Batch) -> torch.Tensor:
        """The training loss of one micro-batch: per token (the LLM's own) or per answer (`train.loss_per`),
        plus the attention supervision's (`supervision`) where the batch has box targets."""
        inputs = batch.inputs
        if self.cfg.train.loss_per == "token":
            loss = self.model(**inputs).loss
        else:
            out = self.model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = answer_mean_loss(out.logits, inputs["labels"])
        if self.supervision is not None and batch.targets is not None:
            aux = self.supervision.losses({**inputs, "targets": batch.targets}, self.coord_ids, IMAGE_TOKEN_ID)
            self.last_supervision = {k: float(v.detach()) for k, v in aux.items() if v is not None}
            loss = loss + self.supervision.total(aux)
        return loss

    def _optimizer_step(self) -> torch.Tensor | None:
        max_norm = self.cfg.optim.max_grad_norm
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm) if max_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _after_step(self, stats: dict[str, Any], progress: Progress) -> None:
        cfg, st = self.cfg.train, self.state
        st.tokens += stats["tokens"]
        st.samples += stats["samples"]
        st.skipped = dict(Counter(st.skipped) + Counter(stats["skipped"]))
        self.result.losses[st.step] = stats["loss"]
        tok_s = stats["tokens"] / max(stats["seconds"], 1e-9)
        progress.update(st.step, loss=stats["loss"], tokens_per_s=tok_s, lr=stats["lr"])
        if st.step % cfg.log_every == 0 or st.step == self.total_steps:
            padding = 1 - stats["tokens"] / stats["slots"] if stats["slots"] else 0.0
            self._log({"train/loss": stats["loss"], "train/lr": stats["lr"], "train/tokens_per_s": tok_s,
                       "train/tokens": stats["tokens"], "train/step_seconds": stats["seconds"],
                       "train/padding": padding, "train/grad_norm": stats["grad_norm"],
                       **{f"data/skipped/{r}": n for r, n in st.skipped.items()},
                       **{f"train/supervision/{k}": v for k, v in self.last_supervision.items()}}, st.step)
        if cfg.eval_every and st.step % cfg.eval_every == 0 and self.eval_ids.size:
            self._evaluate()
        if cfg.save_every and st.step % cfg.save_every == 0:
            self._save()

    # --- eval, logs, checkpoints ---------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self) -> float:
        acc, bs = self.accelerator, self.cfg.train.batch_size
        ids = self.eval_ids[np.argsort(-self.store.lengths[self.eval_ids], kind="stable")]
        batches = [ids[i:i + bs] for i in range(0, len(ids), bs)]
        rounds = -(-len(batches) // acc.num_processes)
        mine = [(batches[i], 1.0) if i < len(batches) else (batches[0], 0.0)  # equal forwards on every rank
                for i in range(acc.process_index, rounds * acc.num_processes, acc.num_processes)]
        loader = make_loader(self.eval_dataset, [b for b, _ in mine], 0, self.collate)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for (_, weight), batch in zip(mine, loader):
            if batch.inputs is None:
                continue
            batch.to(acc.device)
            with acc.autocast():
                loss = self.model(**batch.inputs).loss
            n = float((batch.inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) * weight
            total += torch.stack([loss.detach().double() * n, torch.tensor(n, dtype=torch.float64, device=acc.device)])
        self.model.train()
        total = acc.reduce(total, reduction="sum")
        value = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        self.result.eval_losses[self.state.step] = value
        self._log({"eval/loss": value}, self.state.step)
        self._print(f"step {self.state.step}: eval loss {value:.4f}")
        return value

    def _log(self, values: dict[str, Any], step: int, tensorboard: bool = True) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if self.cfg.train.tensorboard and tensorboard:
            self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.cfg.train.output_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def _save(self) -> None:
        root = self.cfg.train.output_dir / CHECKPOINTS
        folder = root / f"step-{self.state.step:06d}"
        save_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, self.mode, self.state, folder,
                        run_settings(self.cfg))
        if self.accelerator.is_main_process:
            prune_checkpoints(root, self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def _finish(self, export: bool) -> RunResult:
        acc, res = self.accelerator, self.result
        res.steps = self.state.step
        res.memory = self._memory()
        res.skipped = dict(Counter(dict(self.index_skipped)) + Counter(self.state.skipped))
        if export:
            final = self.cfg.train.output_dir / FINAL
            export_final(acc, self.model, self.processor, self.mode, self.cfg.lora, final)
            if acc.is_main_process:
                self.cfg.dump(final / "run_config.yaml")
                self._print(f"saved {final}  (chat: python -m sphinx_model chat --model {final})")
            res.final_dir = final
        self._print(f"skipped records: {res.skipped or 'none'}")
        acc.end_training()
        return res

    def _memory(self) -> dict[str, list[float]]:
        """Per process: peak memory (GPU allocator, else resident set) and the bytes of model state
        it holds (parameters, gradients, optimiser states; local shards only)."""
        acc = self.accelerator
        if torch.cuda.is_available() and acc.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(acc.device) / 2**20
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        state = sum(_local_bytes(p) + _local_bytes(p.grad) for p in self.model.parameters())
        state += sum(_local_bytes(v) for s in self.optimizer.state.values() for v in s.values())
        values = acc.gather(torch.tensor([[peak, state / 2**20]], dtype=torch.float64, device=acc.device))
        report = {"peak_mb": values[:, 0].tolist(), "model_state_mb": values[:, 1].tolist()}
        self._log({f"memory/{k}": v for k, v in report.items()}, self.state.step, tensorboard=False)
        return report

    def _print(self, message: str) -> None:
        self.accelerator.print(message)
