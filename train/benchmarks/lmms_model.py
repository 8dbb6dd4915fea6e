"""`sphinx_x`: SPHINX-X as an lmms-eval model (lmms-eval 0.7.3, the "simple" model protocol).

    lmms-eval --model sphinx_x --model_args pretrained=PATH_OR_ID[,quantize=4bit,device=cuda,dtype=bfloat16]
              --tasks pope,refcoco_bbox_rec_val,... --batch_size 8

`pretrained` is anything `sphinx_model.loading.load_model` takes: a checkpoint folder of
ours, a hub repo id, a preset name, or `released:NAME`; `quantize=4bit|8bit` and `device_map=auto` go to that
loader too (refused in one line by a loader that does not take them). The chat template comes with the checkpoint (the
released "### Human / ### Assistant" one for released checkpoints, ours otherwise), as in
every other entry point.

* `generate_until`: requests grouped by their decoding settings, sorted by prompt length,
  decoded `batch_size` at a time through `sphinx_model.serving.generation.Generator` (left-padded
  batches); `until` stops decoding and is cut from the answer; `max_new_tokens`, `temperature`,
  `top_p`, `top_k`, `do_sample` are honoured. Boxes go where the task's metric reads them
  (`postprocess.map_answer`, profile from `prompts.resolve_profile`).
* `loglikelihood`: the task's context as the user turn, the continuation as the start of the
  assistant's answer; each result is (mean negative log-likelihood per continuation token,
  greedy?) — lmms-eval 0.7.3 picks a multiple-choice answer by `argmin` of that first value, as
  its built-in models return their loss there. The pair travels inside a `GenerationResult`:
  0.7.3's evaluator passes every response through `unwrap_generation_output`, which turns a
  bare (float, bool) tuple into its `str()` and breaks `multiple_choice` scoring; only a
  `GenerationResult`'s `.text` goes through as it is. `loglikelihood_pairs` gives the bare pairs.
* `generate_until_multi_round`: each round a fresh prompt from the task's `doc_to_text`.

A document that cannot be answered (see `requests.prepare`) is reported in one warning line and
answered with "" (or an infinite loss); the run goes on. `bad_documents` lists them.
"""
from __future__ import annotations

import inspect
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from loguru import logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

import sphinx_model.released  # noqa: F401  (registers released:NAME with the loader)
from sphinx_model.conversation import Conversation, Message
from sphinx_model.loading import load_model
from sphinx_model.processor import Encoded
from sphinx_model.serving.generation import GenerationSettings, Generator
from sphinx_model.templates import IGNORE_INDEX, encode_continuation

from .postprocess import cut_at_stops, map_answer
from .prompts import TaskProfile, resolve_profile, split_kwargs
from .requests import BadDocument, Prepared, prepare

IGNORED_OPTIONS = {"num_beams", "image_aspect_ratio", "modalities"}  # other models' knobs, harmless to skip
QUANTIZE = (None, "4bit", "8bit")
MAX_ROUNDS = 32


class SphinxX(lmms):
    """See the module docstring. Arguments come from `--model_args` (and `--batch_size`, `--device`)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, quantize: str | None = None,
                 device_map: str | None = None, prompts: str = "sphinx", max_new_tokens: int = 128,
                 seed: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"sphinx_x: unknown model_args {sorted(unknown)}; known: pretrained, device, dtype, "
                             "batch_size, quantize, device_map, prompts, max_new_tokens, seed")
        if not pretrained:
            raise ValueError("sphinx_x needs pretrained=PATH_OR_ID (a checkpoint folder, a hub id or a preset name)")
        if prompts not in ("sphinx", "task"):
            raise ValueError(f"sphinx_x: prompts must be 'sphinx' or 'task', got {prompts!r}")
        if quantize not in QUANTIZE:
            raise ValueError(f"sphinx_x: quantize must be 4bit or 8bit, got {quantize!r}")
        self._batch_size = _positive_int(batch_size, "batch_size")
        self.default_max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.use_sphinx_prompts = prompts == "sphinx"
        self.seed = seed
        self.bad_documents: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self.model, self.processor = _load(str(pretrained), _device(device), dtype,
                                           {"quantize": quantize, "device_map": device_map})
        self._generators: dict[tuple[str, ...], Generator] = {}
        self._keep_logits = "logits_to_keep" in inspect.signature(self.model.llm.forward).parameters

    # --- lmms-eval's properties -----------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def context_length(self) -> int:
        return self._generator(()).context_length

    # --- generate_until ---------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order. Requests are grouped by decoding settings and sorted by prompt
        length first (text only); images are read and processed batch by batch, so memory holds
        one batch of pictures whatever the benchmark's size."""
        answers, reported = [""] * len(requests), len(self.bad_documents)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            settings, until = self._settings(split_kwargs(req.args[1] or {})[1])
            groups[(tuple(sorted(settings.to_dict().items())), until)].append(i)
        batches = []
        for key, idx in groups.items():
            idx.sort(key=lambda i: -len(str(requests[i].args[0])))  # similar lengths share a batch: little padding
            batches += [(key, idx[s:s + self.batch_size]) for s in range(0, len(idx), self.batch_size)]
        for (settings_items, until), idx in tqdm(batches, desc="sphinx_x generate", disable=self.rank != 0):
            batch = [(i, p) for i in idx if (p := self._prepare_generation(requests[i])) is not None]
            if not batch:
                continue
            outs = self._generator(until).generate([p.conversation for _, p in batch], [p.images for _, p in batch],
                                                   GenerationSettings(**dict(settings_items)))
            for (i, p), text in zip(batch, outs):
                answers[i] = self._finish(text, p, until)
        self._summarise(reported, len(requests))
        return answers

    def _prepare_generation(self, req: Instance) -> Prepared | None:
        ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        return self._prepare(task, split, doc_id, ctx, doc_to_visual, gen_kwargs)

    def _finish(self, text: str, prepared: Prepared, until: Sequence[str]) -> str:
        text = cut_at_stops(text, until)
        canvas = prepared.canvas
        return map_answer(text, canvas, prepared.profile.boxes) if canvas is not None else text

    def _settings(self, options: dict[str, Any]) -> tuple[GenerationSettings, tuple[str, ...]]:
        """lmms-eval's generation kwargs -> our settings and the stop strings (`until`)."""
        options = dict(options)
        until = options.pop("until", None)
        until = (until,) if isinstance(until, str) else tuple(until or ())
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"sphinx_x: generation_kwargs.until must be text or a list of texts, got {until!r}")
        temperature = float(options.pop("temperature", 0.0) or 0.0)
        if options.pop("do_sample", None) is False:
            temperature = 0.0
        if int(options.get("num_beams", 1) or 1) > 1:
            self._warn_once("num_beams", "sphinx_x decodes greedily or by sampling; num_beams > 1 is ignored")
        settings = GenerationSettings(
            max_new_tokens=int(options.pop("max_new_tokens", self.default_max_new_tokens)),
            temperature=temperature, top_p=float(options.pop("top_p", 1.0) or 1.0),
            top_k=int(options.pop("top_k", 0) or 0),
            repetition_penalty=float(options.pop("repetition_penalty", 1.0) or 1.0), seed=self.seed)
        unused = sorted(set(options) - IGNORED_OPTIONS)
        if unused:
            self._warn_once("options:" + ",".join(unused), f"sphinx_x ignores generation kwargs {unused}")
        return settings, until

    def _generator(self, until: tuple[str, ...]) -> Generator:
        """A Generator that also stops on the task's `until` strings (it reads its stops from `.stops`)."""
        if until not in self._generators:
            gen = Generator(self.model, self.processor)
            gen.stops = tuple(dict.fromkeys(gen.stops + until))
            self._generators[until] = gen
        return self._generators[until]

    # --- loglikelihood ----------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """`loglikelihood_pairs`, each pair wrapped so lmms-eval 0.7.3 hands it to the task intact."""
        return [GenerationResult(text=pair) for pair in self.loglikelihood_pairs(requests)]  # type: ignore[arg-type]

    def loglikelihood_pairs(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean NLL of the continuation, whether greedy decoding would produce it) per request.

        A document's choices share one prepared context (its images processed once); documents
        go in order of context length and are scored `batch_size` sequences at a time, so memory
        holds one batch. lmms-eval's unconditional requests (`acc_mutual_info`: a bare
        (context, continuation) pair) score the continuation after an empty user turn.
        """
        results: list[tuple[float, bool]] = [(math.inf, False)] * len(requests)
        reported = len(self.bad_documents)
        by_context: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            args = req.args
            by_context[(None, None, None, args[0]) if len(args) == 2 else (args[4], args[5], args[3], args[0])].append(i)
        pending: list[tuple[int, Encoded, int]] = []

        def flush() -> None:
            for (i, _, _), scored in zip(pending, self._score([e for _, e, _ in pending], max(n for *_, n in pending))):
                results[i] = scored
            pending.clear()

        for key in tqdm(sorted(by_context, key=lambda k: -len(str(k[3]))), desc="sphinx_x loglikelihood",
                        disable=self.rank != 0):
            task, split, doc_id, ctx = key
            first = requests[by_context[key][0]].args
            prepared = (self._unconditional() if task is None
                        else self._prepare(task, split, doc_id, ctx, first[2], {}, generation=False))
            if prepared is None:
                continue
            for i in by_context[key]:
                target = requests[i].args[1]
                cont_ids = self._continuation_ids(target(self._doc(task, split, doc_id)) if callable(target) else target)
                if not cont_ids:
                    self._report(task or "unconditional", doc_id, "its continuation is empty")
                    continue
                labels = [IGNORE_INDEX] * prepared.prompt_length + cont_ids
                pending.append((i, Encoded(prepared.input_ids + cont_ids, labels, prepared.images), len(cont_ids)))
                if len(pending) >= self.batch_size:
                    flush()
        if pending:
            flush()
        self._summarise(reported, len(requests))
        return results

    def _unconditional(self) -> Prepared:
        """An empty user turn (no image, no text) and the generation prompt: the context of P(continuation)."""
        conv = Conversation([Message("user", ())])
        encoded = self.processor.encode(conv, [], add_generation_prompt=True)
        return Prepared(conv, [], list(encoded.input_ids), TaskProfile())

    def _continuation_ids(self, continuation: Any) -> list[int]:
        """The continuation tokenised as the assistant's answer begins (the template's " {text}")."""
        text = str(continuation).strip()
        if not text:
            return []
        return encode_continuation(self.tokenizer, self.processor.template.assistant.format(text=text))

    def _score(self, samples: list[Encoded], longest: int) -> list[tuple[float, bool]]:
        """(mean NLL, greedy) per sample; left-padded, positions from the mask, logits of the tail only."""
        batch = self.processor.collate(samples, padding_side="left")
        device = self.model.device
        mask = batch["attention_mask"].to(device)
        ids = batch["input_ids"].to(device)
        kwargs: dict[str, Any] = {"position_ids": self.model.position_ids(ids, mask)}
        if self._keep_logits:
            kwargs["logits_to_keep"] = longest + 1
        with torch.inference_mode():
            out = self.model(ids, attention_mask=mask,
                             pixel_values=batch.get("pixel_values"), view_skip=batch.get("view_skip"), **kwargs)
        logits = out.logits.float()                                   # (B, K, V), K = longest + 1 or L
        labels = batch["labels"].to(device)
        results = []
        for row in range(len(samples)):
            n = int((labels[row] != IGNORE_INDEX).sum())
            targets = labels[row, -n:]                                # (n,) the continuation
            pred = logits[row, -n - 1:-1]                              # (n, V) logits that predict it
            logp = torch.log_softmax(pred, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            results.append((float(-logp.mean()), bool((pred.argmax(-1) == targets).all())))
        return results

    # --- generate_until_multi_round ---------------------------------------------------------------
    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds until the task's `doc_to_text` says stop; each round is a fresh one-turn prompt."""
        out: list[list[str]] = []
        for req in requests:
            ctx, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc, visual_fn, rounds, info = self._doc(task, split, doc_id), doc_to_visual, [], None
            for round_idx in range(MAX_ROUNDS):
                if round_idx:
                    step = doc_to_text(doc, previous_output=rounds, round_idx=round_idx, previous_round_info=info)
                    if not (isinstance(step, tuple) and len(step) == 5):
                        break
                    visuals, ctx, terminal, updated, info = step
                    rounds = list(updated) if updated is not None else rounds
                    if terminal:
                        break
                    if visuals is not None:
                        visual_fn = lambda _doc, v=visuals: v  # noqa: E731 - this round's images
                prepared = self._prepare(task, split, doc_id, ctx, visual_fn, gen_kwargs)
                if prepared is None:
                    break
                settings, until = self._settings(prepared.options)
                text = self._generator(until).generate([prepared.conversation], [prepared.images], settings)[0]
                rounds.append(self._finish(text, prepared, until))
            out.append(rounds)
        return out

    # --- shared -----------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _prepare(self, task: str, split: str, doc_id: int, ctx: Any, doc_to_visual: Callable | None,
                 gen_kwargs: dict[str, Any] | None, generation: bool = True) -> Prepared | None:
        """The request's model input, or None after reporting why its document cannot be asked."""
        declared, options = split_kwargs(gen_kwargs or {})
        profile = resolve_profile(task, declared, self.use_sphinx_prompts) if generation else TaskProfile()
        try:
            doc = self._doc(task, split, doc_id)
            return prepare(self.processor, doc, ctx, doc_to_visual, profile, self.context_length, options)
        except BadDocument as e:
            self._report(task, doc_id, str(e))
            return None

    def _report(self, task: str, doc_id: Any, reason: str) -> None:
        self.bad_documents.append({"task": task, "doc_id": doc_id, "reason": reason})
        logger.warning(f"sphinx_x: {task} document {doc_id} not answered: {reason}")

    def _summarise(self, reported_before: int, total: int) -> None:
        new = len(self.bad_documents) - reported_before
        if new:
            logger.warning(f"sphinx_x: {new} of {total} request(s) not answered (see the warnings above); "
                           "they score as wrong answers")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"sphinx_x: {name} must be a whole number >= 1, got {value!r}") from None
    if n < 1 or str(value).strip() not in (str(n), f"{n}.0"):
        raise ValueError(f"sphinx_x: {name} must be a whole number >= 1, got {value!r}")
    return n


def _device(device: str | None) -> str:
    """The device asked for, else CUDA when present; one GPU per process under a launcher."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def _load(pretrained: str, device: str, dtype: str | None, options: dict[str, Any]):
    """(model, processor) through sphinx_model's one loader; `quantize` / `device_map` are passed
    only when given, and refused in one line where this sphinx_model's loader does not take them."""
    dtype = None if dtype in (None, "auto") else str(dtype)
    given = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(load_model).parameters
    for name, value in given.items():
        if name not in accepted:
            raise ValueError(f"sphinx_x: {name}={value} needs sphinx_model.loading.load_model(..., {name}=), "
                             "which this version of sphinx_model does not offer")
    return load_model(pretrained, device=device, dtype=dtype, **given)
