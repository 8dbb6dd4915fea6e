"""Batched serving through the app: 1 vs 8 users, and a follow-up turn's time to first token.

One run, one server: the app (`app.ui.build_demo` + `app.launch`, the app's default model unless
`--model`) in a process of its own, the users in this one, exactly as bench_app.py (whose
server, users, TTFT and token counting this script imports):

  1. levels of 1 and 8 concurrent users (bench_app's workload: each request a new `/chat`
     conversation with an example scene and a prompt, greedy, back to back per user);
  2. follow-ups: one user, `--pairs` conversations of two turns per picture: turn 1 asks about
     a fresh picture (an example scene with one pixel changed, then a 1600x1200 JPEG the size of
     a phone photo; neither the image cache nor the prefix cache knows it), turn 2 asks a
     follow-up in the same conversation (`conversation_id`); TTFT of each turn, measured the
     same way (submit -> first streamed text);
  3. the transport floor (an endpoint that does nothing), and the same levels on the model
     service alone (no Gradio, HTTP, store or clients), after the server has stopped.

Targets (issue 9), against bench_app's serialised baseline in RESULTS.md (one request on the
model at a time; its figures are quoted, not re-measured):
  * aggregate generated tokens/s at 8 users >= 3x one user alone (same run);
  * p95 TTFT at 8 users <= the baseline's p50 at 8 users (3.40 s);
  * median second-turn TTFT <= 40% of the median first-turn TTFT (each picture reported).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/bench_serving.py [--quick] [--model SPEC]
"""
from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "20000")   # see bench/README.md "Timing on a shared machine"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_app import (EXAMPLES, IMAGES, LEVEL_HEADER, POLL_S, PROMPTS, Sample, _client, _q,  # noqa: E402
                             level_row, measure_levels, pctl, run_facts, timed_chat)
from bench.common import base_args, cpu_name, md_table, publish  # noqa: E402

NAME = "bench_serving"
BASELINE = {1: (0.26, 41.1), 8: (3.40, 41.5)}   # bench_app, serialised: users -> (TTFT p50 s, tokens/s)
FIRST = "Describe the image briefly."
FOLLOW_UP = "How many objects are there?"


def fresh_image(k: int, folder: Path) -> Path:
    """Example scene k % 4 with pixel (0, 0) set from k: new content, the same picture."""
    from PIL import Image

    img = Image.open(EXAMPLES / IMAGES[k % len(IMAGES)]).convert("RGB")
    img.putpixel((0, 0), (k % 256, (k // 256) % 256, 255 - k % 256))
    path = folder / f"fresh-{k}.png"
    img.save(path)
    return path


def fresh_photo(k: int, folder: Path) -> Path:
    """A 1600x1200 JPEG (quality 90) the size of a phone photo: a noisy gradient with a red block
    whose place depends on k, so every conversation has a picture no cache knows."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(k)
    pixels = (rng.random((1200, 1600, 3)) * 40 + np.linspace(0, 200, 1600)[None, :, None]).astype(np.uint8)
    pixels[300:600, 400 + 7 * k:800 + 7 * k] = (200, 30, 30)
    path = folder / f"photo-{k}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path


WORKLOADS = {"example scene": fresh_image, "1600x1200 photo": fresh_photo}


def follow_ups(url: str, pairs: int, new_tokens: int, folder: Path, picture: Any = fresh_image
               ) -> list[tuple[Sample, Sample]]:
    client = _client(url)
    out = []
    for k in range(pairs):
        first, conversation = timed_chat(client, FIRST, [picture(k, folder)], "", new_tokens)
        second = timed_chat(client, FOLLOW_UP, [], conversation, new_tokens)[0] if conversation \
            else Sample(None, 0.0, "no first turn to follow up")
        out.append((first, second))
    client.close()
    return out


def main(argv: list[str] | None = None) -> str:
    ap = base_args(__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="folder, hub id or preset (default: the app's default)")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 8], help="concurrency levels (default 1 8)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level, split over its users (default 64: 8 each at 8 users, each "
                    "user asking every prompt/picture pair twice, so the users' work is equal and the batch "
                    "runs full most of the level instead of draining while the last users finish)")
    ap.add_argument("--pairs", type=int, default=None, help="two-turn conversations (default 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="max new tokens per reply (default 128)")
    ap.add_argument("--engine", choices=("process", "thread"), default="process",
                    help="the app's --engine (default process, the app's default)")
    ap.add_argument("--engine-threads", type=int, default=0,
                    help="the app's --engine-threads (default 0: all cores but one)")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the same levels with the engine in the server's process (--engine thread)")
    args = ap.parse_args(argv)
    if 1 not in args.users or any(u < 1 for u in args.users):
        ap.error("--users must be positive and include 1 (the reference level)")
    requests = args.requests or (8 if args.quick else 64)
    pairs = args.pairs or (2 if args.quick else 8)
    new_tokens = args.new_tokens or (16 if args.quick else 128)

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        def then(server: Any) -> dict[str, list[tuple[Sample, Sample]]]:
            out = {}
            for name, picture in WORKLOADS.items():
                out[name] = follow_ups(server.url, pairs, new_tokens, Path(tmp), picture)
                print(f"follow-ups about a fresh {name}: {len(out[name])} conversations of two turns", file=sys.stderr)
            return out

        server, levels, turns, served = measure_levels(args.model, Path(tmp), args.threads, args.users, requests,
                                                       new_tokens, then, args.engine, args.engine_threads)
        other = None
        if args.engine == "process" and not args.no_compare:
            other = measure_levels(args.model, Path(tmp) / "thread", args.threads, args.users, requests, new_tokens,
                                   engine="thread")
    floor = transport_floor()
    inside = {name: _inside(served, pairs, len(WORKLOADS) - 1 - i) for i, name in enumerate(WORKLOADS)}
    alone = service_alone(args.model, args.threads, args.users, requests, new_tokens, args.engine, args.engine_threads)
    compare = {users: tokens / wall for users, _, _, wall, tokens in other[1]} if other else {}
    return publish(NAME, _body(server, new_tokens, levels, turns, inside, floor, alone, compare), args)


def service_alone(spec: str | None, threads: int, levels_of: list[int], requests: int,
                  new_tokens: int, engine: str = "process", engine_threads: int = 0) -> dict[int, float]:
    """The same levels on the app's model service in this process, without Gradio, HTTP or the
    store: users -> aggregate tokens/s. What batching gives on this machine before the app's
    per-request costs (run after the server has stopped, so the two do not share the CPU)."""
    import threading

    import torch
    from PIL import Image

    from app.service import GenerationRequest, ModelService, ServingLimits
    from app.settings import AppSettings
    from sphinx_model.conversation import Conversation, Message
    from sphinx_model.serving.generation import GenerationSettings

    torch.set_num_threads(threads)
    service = ModelService.load(AppSettings(model=spec).model_spec, device="cpu",
                                limits=ServingLimits(engine_mode=engine, engine_threads=engine_threads))
    images = [Image.open(EXAMPLES / name).convert("RGB") for name in IMAGES]

    def level(users: int, per_user: int) -> float:
        def user(u: int) -> None:
            for r in range(per_user):
                k = u + r                                                  # as bench_app.run_level
                req = GenerationRequest(Conversation([Message.user(PROMPTS[k % len(PROMPTS)], image=True)]),
                                        [images[k % len(images)]], GenerationSettings(max_new_tokens=new_tokens))
                service.generate(req)

        before = service.engine.stats["tokens"]
        threads_ = [threading.Thread(target=user, args=(u,)) for u in range(users)]
        t0 = time.perf_counter()
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        wall = time.perf_counter() - t0
        return (service.engine.stats["tokens"] - before) / wall

    try:
        level(1, len(PROMPTS))                                             # warm-up: each pair once
        return {users: level(users, max(1, requests // users)) for users in levels_of}
    finally:
        service.close()


def transport_floor(calls: int = 15) -> list[float]:
    """TTFT of an endpoint that does nothing (a generator yielding two strings), through
    gradio_client, timed as `timed_chat` times a turn: the HTTP + queue + streaming + client cost
    that every turn pays whatever the model does. The first 3 calls are warm-up."""
    import gradio as gr
    def echo(text: str):
        yield text
        yield text + "."

    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        box.submit(echo, box, out, api_name="echo")
    demo.queue().launch(prevent_thread_lock=True, quiet=True)
    try:
        client = _client(demo.local_url)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            job = client.submit("hi", api_name="/echo")
            first = None
            while not job.done():
                if first is None and job.outputs():
                    first = time.perf_counter() - t0
                time.sleep(POLL_S)
            times.append(first if first is not None else time.perf_counter() - t0)
        client.close()
    finally:
        demo.close()
    return times[3:]


def _inside(served: list[tuple[str, float | None]], pairs: int, later: int = 0) -> tuple[list[float], list[float]]:
    """One workload's follow-ups' TTFT inside the service (2 x pairs requests served one after another,
    followed by `later` such workloads): (turn 1 TTFTs, turn 2 TTFTs); empty when the record does not match."""
    end = len(served) - 2 * pairs * later
    last = served[end - 2 * pairs:end] if pairs else []
    if len(last) != 2 * pairs or any(q != (FIRST, FOLLOW_UP)[i % 2] or t is None for i, (q, t) in enumerate(last)):
        return [], []
    return [t for _, t in last[0::2]], [t for _, t in last[1::2]]


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _follow_up_rows(name: str, turns: list[tuple[Sample, Sample]], inside: tuple[list[float], list[float]],
                    floor: list[float]) -> tuple[list[list[Any]], str, int]:
    """Rows of one workload's follow-up table, its verdict line, and how many conversations failed."""
    good = [(a, b) for a, b in turns if a.error is None and b.error is None and a.ttft_s and b.ttft_s]
    if not good:
        return [], f"second-turn TTFT ({name}): no complete follow-ups (**NOT met**)", len(turns)
    first = [a.ttft_s for a, _ in good]
    second = [b.ttft_s for _, b in good]
    share = statistics.median(second) / statistics.median(first)
    paired = statistics.median(b / a for a, b in zip(first, second))
    in1, in2 = inside
    in_share = statistics.median(in2) / statistics.median(in1) if in1 else float("nan")
    rows = [[f"{name}: through gradio_client (submit -> first text)", len(turns), len(turns) - len(good),
             _q(first, 0.5), _q(second, 0.5), _q(first, 0.95), _q(second, 0.95), f"{share:.0%}", f"{paired:.0%}"],
            [f"{name}: inside the service (queued -> first piece), same requests", len(in1), "—", _q(in1, 0.5),
             _q(in2, 0.5), _q(in1, 0.95), _q(in2, 0.95), f"{in_share:.0%}",
             f"{statistics.median(b / a for a, b in zip(in1, in2)):.0%}" if in1 else "—"]]
    line = (f"second-turn TTFT about a fresh {name} = {share:.0%} of the first turn's (medians, through "
            f"gradio_client; target <= 40%): **{_verdict(share <= 0.40)}**; inside the service {in_share:.0%}"
            + (f"; the do-nothing endpoint's {statistics.median(floor):.2f} s alone is "
               f"{statistics.median(floor) / statistics.median(first):.0%} of this turn 1" if floor else ""))
    return rows, line, len(turns) - len(good)


def _body(server: Any, new_tokens: int, levels: list, turns: dict[str, list[tuple[Sample, Sample]]],
          inside: dict[str, tuple[list[float], list[float]]], floor: list[float], alone: dict[int, float],
          compare: dict[int, float]) -> str:
    info, engine, cpu = server.info, server.level_stats, server.level_cpu
    rows, errors, rate, p95 = [], 0, {}, {}
    for users, per_user, samples, wall, tokens in levels:
        row, ttft, failed = level_row(users, per_user, samples, wall, tokens)
        errors += failed
        rate[users] = tokens / wall
        p95[users] = pctl(ttft, 0.95) if ttft else float("nan")
        base = BASELINE.get(users)
        st = engine.get(users, {})
        c, n = cpu.get(users), max(len(samples), 1)
        run_alone, in_step, reused = st.get("prefilled", 0), st.get("prefilled_in_step", 0), st.get("reused", 0)
        rows.append(row + [f"{st['row_steps'] / st['steps']:.1f}" if st.get("steps") else "—",
                           f"{run_alone / n:.0f} / {in_step / n:.2f} / {reused / n:.0f}" if st else "—",
                           " / ".join(f"{1000 * c[k] / n:.0f}" for k in ("server", "engine", "users")) if c else "—",
                           f"{sum(c.values()) / wall:.2f}" if c else "—",
                           f"{base[0]:.2f} / {base[1]:.1f}" if base else "—"])
    header = LEVEL_HEADER + ["rows per decode step (mean)",
                             "prompt positions per request: run alone / run in a decode step / reused",
                             "CPU ms per request: server / engine / users",
                             "cores busy", "serialised baseline: TTFT p50 s / tokens/s"]
    turn_rows, turn_lines = [], []
    for name, pairs_of in turns.items():
        r, line, failed = _follow_up_rows(name, pairs_of, inside.get(name, ([], [])), floor)
        turn_rows += r
        turn_lines.append(line)
        errors += failed
    turn_rows.append(["floor: an endpoint that does nothing, through gradio_client", len(floor), "—",
                      _q(floor, 0.5), "—", _q(floor, 0.95), "—", "—", "—"])
    turn_header = ["TTFT measured", "conversations", "errors", "turn 1 p50 s", "turn 2 p50 s", "turn 1 p95 s",
                   "turn 2 p95 s", "turn 2 / turn 1 (medians)", "median of per-conversation ratios"]
    top = max(rate)
    speedup = rate[top] / rate[1]
    alone_rows = [[users, f"{rate.get(users, float('nan')):.1f}", f"{rate.get(users, float('nan')) / rate[1]:.2f}x",
                   *([f"{compare[users]:.1f}", f"{compare[users] / compare[1]:.2f}x"] if compare.get(1) and users in compare
                     else ["—", "—"]),
                   f"{alone[users]:.1f}", f"{alone[users] / alone[1]:.2f}x"]
                  for users in sorted(alone)]
    alone_header = ["users", "through the app: tokens/s", "x 1 user",
                    "through the app, engine in the server's process (--engine thread): tokens/s", "x 1 user",
                    "the model service alone: tokens/s", "x 1 user"]
    load, model = run_facts(info)
    targets = [
        f"aggregate tokens/s at {top} users = {speedup:.2f}x one user (target >= 3x): **{_verdict(speedup >= 3)}**",
        f"TTFT p95 at {top} users = {p95[top]:.2f} s (target <= {BASELINE[8][0]:.2f} s, the serialised "
        f"baseline's p50): **{_verdict(p95[top] <= BASELINE[8][0])}**",
        *turn_lines,
    ]
    verdict = "**Zero errors.**" if errors == 0 else f"**{errors} request(s) failed: the run does not count.**"
    return "\n".join([
        "## Batched serving through the app: users, throughput, follow-up turns (bench/bench_serving.py)",
        "",
        f"- Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, no GPU; the app in its own process, torch "
        f"{info['torch']} with {info['threads']} intra-op threads there (set explicitly), the model's engine "
        + (f"in a process of its own (`--engine process`, the app's default) with {info.get('engine_threads')} "
           "intra-op thread(s); " if info.get("engine") == "process" else "in the app's process (`--engine thread`); ")
        + 
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; load average at the end {load} (the machine is "
        "shared: timings are noisy).",
        f"- Model: {model}; the service decodes up to {info.get('max_batch')} requests as one batch "
        "(continuous batching: a request joins at the next step), with the image and prefix caches on "
        "(defaults); Gradio lets as many model events in at once.",
        f"- Levels: bench_app's workload (a new `/chat` conversation per request, an example scene uploaded, "
        f"4 prompt/picture pairs, user u's request r asks pair (u + r) mod 4, greedy, max {new_tokens} new tokens, "
        "users start together, a warm-up request per pair first); tokens counted by the serving engine (one per row of each "
        "decode step and one per prefill). Prompt positions: run alone (a prefill), run as a row of the next decode "
        "step (a prompt known but for its last position joins the batch at once), reused (KV from the prefix "
        "cache or from a row decoding at the time). CPU per request: "
        "the app's process, the engine process and the users' clients (this process), from /proc over the level; "
        "cores busy = their sum / the level's wall time.",
        f"- Follow-ups: one user, {max(map(len, turns.values()), default=0)} conversations per picture: turn 1 "
        f"\"{FIRST}\" about a fresh picture (an example scene with one pixel changed, or a 1600x1200 JPEG the size "
        f"of a phone photo: no cache knows it), turn 2 \"{FOLLOW_UP}\" in the same conversation.",
        "- Inside the service: the same follow-up requests, from the moment the service queues a request for "
        "the model to its first piece (recorded in the server); the difference to the gradio_client figure is "
        "the app's fixed cost per request (HTTP, Gradio's queue and streaming, the handler reading the "
        "conversation from the store), the same for both turns.",
        "- The baseline column quotes bench_app's serialised run (RESULTS.md, section bench_app; same machine "
        "type, model and workload, one request on the model at a time).",
        "",
        md_table(header, rows),
        "",
        md_table(turn_header, turn_rows),
        "",
        "The same levels with the engine in the server's process (a second server, same run), and on the model "
        "service alone (this process, after the servers stopped: no Gradio, HTTP, store or users' clients; the "
        "same engine settings; the engine's counter of generated tokens):",
        "",
        md_table(alone_header, alone_rows),
        "",
        *[f"- {t}" for t in targets],
        "",
        verdict,
    ])


if __name__ == "__main__":
    main()
