"""Serving: requests in, tokens out, on a loaded model.

    generation.py      one request at a time: GenerationSettings, Generator (stream / generate),
                       the token budget and stop strings every path shares
    jobs.py            a request inside the engine (Job) and the callers' side that makes one
                       (JobMaker: images processed once, tokenised, checked); EngineConfig, Signal
    batcher.py         the continuous-batching engine: admit, step, leave on one scheduler thread
    batch_cache.py     the batch's KV cache layer (room for the next positions, left padding)
    caches.py          the image cache (visual tokens, canvases) and the prefix cache (prompt KV)
    engine_process.py  the same engine in a process of its own, behind the same interface

Depends on the model (the package's top) only: it takes a loaded (model, processor) and never
loads one (`loading`) or knows the authors' releases (`released`).
"""
from .batcher import ContinuousBatcher
from .engine_process import EngineProcess, EngineProcessError, seeded
from .generation import GenerationSettings, Generator
from .jobs import MIB, EngineConfig, Job, JobMaker, Signal

__all__ = ["MIB", "ContinuousBatcher", "EngineConfig", "EngineProcess", "EngineProcessError", "GenerationSettings",
           "Generator", "Job", "JobMaker", "Signal", "seeded"]
