"""The host's panel (a tab only the host sees) and its two API endpoints; the work is done in
`app.handlers.host`.

elem_ids: tab-host, host-summary, host-table, host-plot, host-corrections, host-sync,
host-refresh, host-export, host-export-file, host-status.

Whether a page is the host's is decided once, when it loads (the Space owner's login, or
`?host=TOKEN`), and kept in a server-side gr.State the browser cannot set; every panel event
checks it. The API endpoints `/host_overview` and `/host_export` check the
`x-sphinx-host-token` header of each call.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from .handlers import host
from .handlers.common import AppContext
from .wiring import CHEAP, guard, soft

TABLE_HEADERS = ["day", "model version", "conversations", "turns", "likes", "dislikes", "corrections"]
CORRECTION_HEADERS = ["when", "model version", "question", "answer", "correction"]
KINDS = ("likes", "dislikes", "corrections")


def _plot_frame(ov: host.Overview) -> pd.DataFrame:
    days: dict[str, dict[str, int]] = {}
    for r in ov.rows:
        d = days.setdefault(r.day.isoformat(), dict.fromkeys(KINDS, 0))
        for k in KINDS:
            d[k] += getattr(r, k)
    return pd.DataFrame([{"day": day, "feedback": k, "count": n} for day, d in sorted(days.items())
                         for k, n in d.items()], columns=["day", "feedback", "count"])


def _summary(ov: host.Overview) -> str:
    t = ov.totals()
    return (f"**{t['conversations']}** conversations · **{t['turns']}** turns · **{t['likes']}** likes · "
            f"**{t['dislikes']}** dislikes · **{t['corrections']}** corrections")


def _sync_text(state: dict[str, Any]) -> str:
    if state.get("repo") is None:
        return f"**Hub sync** {state['state']}"
    lines = [f"**Hub sync** to dataset `{state['repo']}`: {state['state']}, every {state['every_min']:g} min",
             f"last push: {state['last_push']} · next push: {state['next_push']} · "
             f"pending conversations: {state['pending']} · pushes: {state['pushes']} · failed: {state['failures']}"]
    if state.get("last_error"):
        lines.append(f"⚠ last error: `{state['last_error']}`")
    return "  \n".join(lines)


def panel_values(ctx: AppContext, granted: bool) -> tuple[Any, ...]:
    ov = host.overview(ctx, granted)
    table = [[r.day.isoformat(), r.model_version, r.conversations, r.turns, r.likes, r.dislikes, r.corrections]
             for r in ov.rows]
    corrections = [[c.at.strftime("%Y-%m-%d %H:%M"), c.model_version, c.question, c.answer, c.corrected]
                   for c in ov.corrections]
    return (_summary(ov), table, _plot_frame(ov), corrections, _sync_text(host.sync_state(ctx, granted)))


def host_tab(ctx: AppContext, granted: gr.State) -> dict[str, Any]:
    gr.Markdown("For the app's host: what visitors said, per day and model version.")
    summary = gr.Markdown("", elem_id="host-summary")
    plot = gr.BarPlot(pd.DataFrame(columns=["day", "feedback", "count"]), x="day", y="count", color="feedback",
                      title="Feedback per day", elem_id="host-plot", height=260)
    table = gr.Dataframe(headers=TABLE_HEADERS, label="Per day and model version", elem_id="host-table",
                         interactive=False)
    corrections = gr.Dataframe(headers=CORRECTION_HEADERS, label="Latest corrections", elem_id="host-corrections",
                               interactive=False, wrap=True)
    sync = gr.Markdown("", elem_id="host-sync")
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="host-refresh")
        export = gr.Button("Download the export (zip)", elem_id="host-export")
    file = gr.File(label="Export", elem_id="host-export-file", interactive=False)
    status = gr.Markdown("", elem_id="host-status")
    outputs = [summary, table, plot, corrections, sync]

    @soft(6, 5)
    def do_refresh(ok: bool):
        return (*panel_values(ctx, ok), "")

    @soft(2, 1)
    def do_export(ok: bool):
        path = host.export_zip(ctx, ok)
        return str(path), f"Export written: {path.name}"

    refresh.click(do_refresh, [granted], [*outputs, status], **CHEAP)
    export.click(do_export, [granted], [file, status], **CHEAP)
    return {"outputs": outputs}


def grant_on_load(demo: gr.Blocks, ctx: AppContext, tab: gr.Tab, granted: gr.State, panel: dict[str, Any]) -> None:
    """On each page load: the host's page shows the tab, filled; any other page shows nothing."""
    def decide(username: str | None, request: gr.Request) -> tuple[Any, ...]:
        token = request.query_params.get(host.QUERY) if request is not None else None
        ok = host.is_host(ctx, username=username, token=token)
        if not ok:
            return (gr.update(visible=False), False, *[gr.skip()] * len(panel["outputs"]))
        return (gr.update(visible=True), True, *panel_values(ctx, True))

    if ctx.settings.on_space:
        def on_load(request: gr.Request, profile: gr.OAuthProfile | None):
            return decide(profile.username if profile is not None else None, request)
    else:
        def on_load(request: gr.Request):
            return decide(None, request)
    demo.load(guard(on_load), None, [tab, granted, *panel["outputs"]], **CHEAP)


def host_api(ctx: AppContext) -> None:
    """`/host_overview` (JSON) and `/host_export` (the zip) for a client sending the host token."""
    with gr.Column(visible=False):
        result = gr.JSON(label="overview")
        zipped = gr.File(label="export")
        buttons = [gr.Button("api-host-overview"), gr.Button("api-host-export")]

    def granted(request: gr.Request) -> bool:
        return host.is_host(ctx, token=request.headers.get(host.HEADER) if request is not None else None)

    @guard
    def api_overview(request: gr.Request) -> dict:
        ok = granted(request)
        return {**host.overview(ctx, ok).to_dict(), "hub_sync": host.sync_state(ctx, ok)}

    @guard
    def api_export(request: gr.Request) -> str:
        return str(host.export_zip(ctx, granted(request)))

    buttons[0].click(api_overview, None, [result], api_name="host_overview", queue=False, api_visibility="undocumented")
    buttons[1].click(api_export, None, [zipped], api_name="host_export", queue=False, api_visibility="undocumented")
