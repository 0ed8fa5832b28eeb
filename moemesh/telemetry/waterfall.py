"""A request's spans as a waterfall: one row per span (worker, name indented under its parent, start, duration,
a bar to scale), in HTML for `GET /traces/{request_id}` and in text for `moemesh trace`. Both take the JSON
that `GET /traces/{request_id}?format=json` serves (`RequestTrace.to_json()`), so the terminal client needs
nothing but that page."""

from __future__ import annotations

import html
import urllib.parse
from typing import Any

BAR_COLUMNS = 48
_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f")


def rows(trace: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, span) in tree order: each span under its parent, siblings by start; spans whose parent is not
    in the trace (a worker that forgot it, or the client's own span) are roots."""
    spans = trace["spans"]
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else ""
        children.setdefault(parent, []).append(span)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: (s["start_ms"], -s["end_ms"])):
            out.append((depth, span))
            walk(span["span_id"], depth + 1)

    walk("", 0)
    return out


def _extent(trace: dict[str, Any]) -> tuple[float, float]:
    spans = trace["spans"]
    start = min([0.0, *(s["start_ms"] for s in spans)])
    end = max([trace.get("total_ms") or 0.0, *(s["end_ms"] for s in spans)])
    return start, max(end, start + 1e-3)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _headline(trace: dict[str, Any]) -> str:
    status = trace["error"] or trace["finish_reason"] or ("running" if trace["total_ms"] is None else "")
    return (f"request {trace['request_id']}  trace {trace['trace_id']}  TTFT {_ms(trace['ttft_ms'])}  "
            f"total {_ms(trace['total_ms'])}  {trace['prompt_tokens']} prompt / {trace['completion_tokens']} "
            f"completion tokens  {status}").rstrip()  # fmt: skip


def text(trace: dict[str, Any], columns: int = BAR_COLUMNS) -> str:
    start, end = _extent(trace)
    scale = columns / (end - start)
    table = rows(trace)
    name_width = max([len("span"), *(2 * d + len(s["name"]) for d, s in table)])
    worker_width = max([len("worker"), *(len(s["worker"]) for _, s in table)])
    lines = [_headline(trace), "",
             f"{'worker':<{worker_width}}  {'span':<{name_width}}  {'start ms':>9}  {'dur ms':>9}  |"
             f"{'':<{columns}}|"]  # fmt: skip
    for depth, span in table:
        left = int((span["start_ms"] - start) * scale)
        width = max(1, round((span["end_ms"] - span["start_ms"]) * scale))
        bar = (" " * left + ("!" if span["error"] else "#") * width)[:columns].ljust(columns)
        name = "  " * depth + span["name"]
        lines.append(f"{span['worker']:<{worker_width}}  {name:<{name_width}}  {span['start_ms']:>9.1f}  "
                     f"{span['end_ms'] - span['start_ms']:>9.1f}  |{bar}|")  # fmt: skip
    if not table:
        lines.append("(no spans gathered yet)")
    return "\n".join(lines)


def page(trace: dict[str, Any]) -> str:
    """A self-contained HTML page (no script, no external asset)."""
    start, end = _extent(trace)
    workers = sorted({s["worker"] for s in trace["spans"]})
    color = {w: _COLORS[i % len(_COLORS)] for i, w in enumerate(workers)}
    body = []
    for depth, span in rows(trace):
        left = 100 * (span["start_ms"] - start) / (end - start)
        width = max(0.2, 100 * (span["end_ms"] - span["start_ms"]) / (end - start))
        attrs = ", ".join(f"{k}={v}" for k, v in sorted(span["attributes"].items()))
        duration = span["end_ms"] - span["start_ms"]
        body.append(
            f'<tr class="span{" error" if span["error"] else ""}" data-span-id="{span["span_id"]}" '
            f'data-parent-id="{span["parent_id"]}"><td class="worker">{html.escape(span["worker"])}</td>'
            f'<td class="name" style="padding-left:{0.4 + 1.2 * depth:.1f}em">{html.escape(span["name"])}</td>'
            f'<td class="ms">{span["start_ms"]:.1f}</td><td class="ms">{duration:.1f}</td>'
            f'<td class="lane"><div class="bar" title="{html.escape(attrs)}" style="left:{left:.3f}%;'
            f'width:{width:.3f}%;background:{color[span["worker"]]}"></div></td>'
            f'<td class="attrs">{html.escape(attrs)}</td></tr>'
        )
    if not body:
        body.append('<tr><td colspan="6">no spans gathered yet</td></tr>')
    title = html.escape(f"moemesh trace {trace['request_id']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font: 13px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.2em; }} .meta {{ color: #555; margin-bottom: 1em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: 3px 6px; border-bottom: 1px solid #eee; white-space: nowrap; }}
td.ms {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.lane {{ position: relative; width: 45%; min-width: 300px; }}
.bar {{ position: absolute; top: 4px; bottom: 4px; border-radius: 2px; min-width: 2px; }}
tr.error td.name {{ color: #c00; }}
td.attrs {{ color: #666; font-size: 11px; white-space: normal; max-width: 28em; }}
</style></head><body>
<h1>{title}</h1>
<div class="meta">{html.escape(_headline(trace))}</div>
<table><thead><tr><th>worker</th><th>span</th><th>start ms</th><th>dur ms</th>
<th>0 – {end - start:.1f} ms</th><th>attributes</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<p><a href="/traces">recent requests</a> · <a href="?format=json">json</a></p>
</body></html>
"""


def index_page(summaries: list[dict[str, Any]]) -> str:
    """`GET /traces` as HTML: recent requests, newest first."""
    body = []
    for s in summaries:
        rid, href = html.escape(s["request_id"]), html.escape(urllib.parse.quote(s["request_id"], safe=""))
        status = html.escape(s["error"] or s["finish_reason"] or ("running" if s["total_ms"] is None else ""))
        body.append(
            f'<tr><td><a href="/traces/{href}">{rid}</a></td><td class="ms">{_ms(s["ttft_ms"])}</td>'
            f'<td class="ms">{_ms(s["total_ms"])}</td><td class="ms">{s["prompt_tokens"]}</td>'
            f'<td class="ms">{s["completion_tokens"]}</td><td>{status}</td></tr>'
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>moemesh traces</title><style>
body {{ font: 13px system-ui, sans-serif; margin: 1.5em; }}
td, th {{ padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; }} td.ms {{ text-align: right; }}
</style></head><body><h1>recent requests</h1>
<table><thead><tr><th>request</th><th>TTFT</th><th>total</th><th>prompt</th><th>completion</th><th></th></tr>
</thead><tbody>
{chr(10).join(body) or '<tr><td colspan="6">no requests yet</td></tr>'}
</tbody></table></body></html>
"""
