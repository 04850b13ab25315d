"""One run as one self-contained HTML page (`depio report [RUN]`): no CDN, no network access.

The page shows the run's summary, a timeline of its tasks per worker coloured by status (an SVG
drawn by inline JS from an embedded JSON blob: one `<rect class="bar" data-task=...>` per task, or,
above `bar_limit` tasks, one `<rect class="bar bucket" data-count=...>` per worker and time slice,
which the page says), the failures with the tail of their logs (read from the run's log folder:
`<seq>-<name>.err`, else `.out`, as depio/view/logs.py writes them) and the slowest tasks.
"""
from __future__ import annotations

import html
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .records import RunTask
from .location import DEFAULT_LOG_DIR
from .store import StateStore

BAR_LIMIT = 2000
STATUS_COLOURS = {"FINISHED": "#2e9e44", "FAILED": "#d63b3b", "DEPFAILED": "#e58e26", "CANCELED": "#8a8a8a",
                  "SKIPPED": "#9ecae1", "RUNNING": "#e8c547", "UNKNOWN": "#b0b0b0"}
_SEVERITY = ("FAILED", "DEPFAILED", "CANCELED", "UNKNOWN", "RUNNING", "FINISHED", "SKIPPED")


def _log_folder(run: Dict) -> Optional[Path]:
    """The run's log folder: as recorded at its start, else where DEPIO_LOG_DIR / the default puts it."""
    if run.get("log_dir"):
        return Path(run["log_dir"])
    value = os.environ.get("DEPIO_LOG_DIR", "").strip()
    if value.lower() in ("off", "none", "0", "false", "no") and value:
        return None
    root = Path(os.path.expanduser(value or DEFAULT_LOG_DIR))
    return (root if root.is_absolute() else Path(run.get("cwd") or ".") / root) / run["id"]


def log_tail(folder: Optional[Path], seq: int, lines: int = 40, limit: int = 8192) -> str:
    """The last `lines` lines of a task's stderr (else stdout) in a run's log folder, or ""."""
    if folder is None or not folder.is_dir():
        return ""
    for suffix in (".err", ".out"):
        for path in sorted(folder.glob(f"{seq}-*{suffix}")):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - limit))
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            return "\n".join(text.splitlines()[-lines:])
    return ""


def _natural(text: str) -> list:
    """w2 before w10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _lane(t: RunTask) -> str:
    if t.host and t.worker:
        return f"{t.host}:{t.worker}"
    return t.worker or t.host or "local"


def timeline(tasks: List[RunTask], t0: float, bar_limit: int = BAR_LIMIT) -> Dict:
    """The JSON the page draws: lanes, statuses and bars ([lane, start, end, status, name, seq] in
    seconds from t0), or buckets ([lane, start, end, status, count, counts by status]) when there are
    more than `bar_limit` tasks with a start."""
    drawn = [t for t in tasks if t.start is not None]
    lanes = sorted({_lane(t) for t in drawn}, key=_natural)
    lane_of = {name: i for i, name in enumerate(lanes)}
    statuses = sorted({t.status for t in drawn})
    status_of = {s: i for i, s in enumerate(statuses)}
    span = max([(t.end if t.end is not None else t.start) - t0 for t in drawn] + [0.001])
    data = {"lanes": lanes, "statuses": statuses, "colours": [STATUS_COLOURS.get(s, "#b0b0b0") for s in statuses],
            "span": span, "tasks": len(drawn), "aggregated": len(drawn) > bar_limit}
    if not data["aggregated"]:
        data["bars"] = [[lane_of[_lane(t)], round(t.start - t0, 4), round((t.end or t.start) - t0, 4),
                         status_of[t.status], t.name, t.seq] for t in drawn]
        return data
    slices = max(10, bar_limit // max(1, len(lanes)))
    width = span / slices
    buckets: Dict[Tuple[int, int], Dict[str, int]] = {}
    for t in drawn:
        k = (lane_of[_lane(t)], min(slices - 1, int((t.start - t0) / width)))
        counts = buckets.setdefault(k, {})
        counts[t.status] = counts.get(t.status, 0) + 1
    rank = {s: i for i, s in enumerate(_SEVERITY)}
    data["slice"] = width
    data["bars"] = [[lane, round(i * width, 4), round((i + 1) * width, 4),
                     status_of[min(counts, key=lambda s: rank.get(s, len(rank)))], sum(counts.values()), counts]
                    for (lane, i), counts in sorted(buckets.items())]
    return data


def _fmt_time(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def write_report(store: StateStore, run_id: Optional[str], path: os.PathLike, bar_limit: int = BAR_LIMIT,
                 tail_lines: int = 40, slowest: int = 20, max_failures: int = 200) -> Path:
    """Write the report of `run_id` (the latest run with None) to `path`; returns the path.
    Raises KeyError when the store has no such run."""
    run = store.run(run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r} in {store.path}" if run_id else f"no run in {store.path}")
    tasks = store.run_tasks(run["id"])
    starts = [t.start for t in tasks if t.start is not None]
    t0 = min(starts) if starts else (run["start"] or 0.0)
    data = timeline(tasks, t0, bar_limit)
    folder = _log_folder(run)
    counts = run["counts"] or {}
    parts = [f"<h1>depio run {_esc(run['id'])}</h1>",
             "<table class='meta'>" + "".join(f"<tr><th>{k}</th><td>{_esc(v)}</td></tr>" for k, v in (
                 ("script", run["script"] or "-"), ("folder", run["cwd"]), ("host", run["host"]), ("pid", run["pid"]),
                 ("start", _fmt_time(run["start"])), ("end", _fmt_time(run["end"])),
                 ("tasks", ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or len(tasks)))) + "</table>",
             "<h2>Timeline</h2>"]
    n = len(data["bars"])
    if data["aggregated"]:
        parts.append(f"<p id='timeline-note' data-bars='{n}'>{data['tasks']:,} tasks are drawn as {n:,} bars: one per "
                     f"worker and time slice of {data['slice']:.3g} s (more than {bar_limit:,} tasks), coloured by "
                     f"the worst status among them; hover a bar for its counts.</p>")
    else:
        parts.append(f"<p id='timeline-note' data-bars='{n}'>{n:,} tasks, one bar each; hover a bar for the task.</p>")
    skipped = len(tasks) - data["tasks"]
    if skipped:
        parts.append(f"<p>{skipped:,} recorded task{'s' if skipped > 1 else ''} never started: no bar.</p>")
    parts.append("<div class='legend'>" + "".join(f"<span><i style='background:{c}'></i>{_esc(s.lower())}</span>"
                                                 for s, c in zip(data["statuses"], data["colours"])) + "</div>")
    parts.append("<div id='timeline'></div>")
    failed = [t for t in tasks if t.status == "FAILED"]
    parts.append(f"<h2>Failures ({len(failed):,})</h2>")
    if not failed:
        parts.append("<p>None.</p>")
    for t in failed[:max_failures]:
        tail = log_tail(folder, t.seq, tail_lines)
        parts.append(f"<div class='failure' data-task='{_esc(t.name)}'><h3>{_esc(t.name)} <small>#{t.seq}"
                     f"{' on ' + _esc(_lane(t)) if t.worker or t.host else ''}</small></h3>"
                     + (f"<p>{_esc(t.reason)}</p>" if t.reason else "")
                     + (f"<pre class='tail'>{_esc(tail)}</pre>" if tail else "<p><em>no log</em></p>") + "</div>")
    if len(failed) > max_failures:
        parts.append(f"<p>… and {len(failed) - max_failures:,} more failures.</p>")
    timed = sorted((t for t in tasks if t.start is not None and t.end is not None), key=lambda t: t.start - t.end)
    parts.append(f"<h2>Slowest tasks</h2><table class='slow'><tr><th>#</th><th>task</th><th>seconds</th><th>status"
                 "</th><th>worker</th><th>attempts</th><th>reason</th></tr>"
                 + "".join(f"<tr><td>{t.seq}</td><td>{_esc(t.name)}</td><td>{t.end - t.start:.3f}</td><td>"
                           f"{_esc(t.status.lower())}</td><td>{_esc(_lane(t))}</td><td>{t.attempts}</td>"
                           f"<td>{_esc(t.reason)}</td></tr>" for t in timed[:slowest]) + "</table>")
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = _PAGE.format(title=_esc(f"depio run {run['id']}"), body="\n".join(parts), data=blob, css=_CSS, js=_JS)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}th,td{padding:2px 8px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}
.meta th{color:#666;font-weight:normal}#timeline{overflow:auto;border:1px solid #ddd;max-height:70vh}
.legend span{margin-right:1em}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
.failure{border-left:4px solid #d63b3b;padding:0 1em;margin:1em 0}
pre.tail{background:#f6f6f6;padding:.5em;overflow:auto;max-height:20em;white-space:pre-wrap}
svg text{font-size:11px;fill:#444}rect.bar:hover{stroke:#000}"""

_JS = r"""(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("run-data").textContent);
  var NS = "http://www.w3.org/2000/svg", laneH = 16, left = 160, width = 1000, top = 20;
  var svg = document.createElementNS(NS, "svg");
  var height = top + data.lanes.length * laneH + 4;
  svg.setAttribute("width", left + width + 60);
  var digits = data.span < 1 ? 3 : data.span < 10 ? 2 : data.span < 100 ? 1 : 0;
  svg.setAttribute("height", height);
  function el(name, attrs, text) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  var scale = width / (data.span || 1);
  for (var i = 0; i <= 10; i++) {
    var x = left + i * width / 10;
    svg.appendChild(el("line", {x1: x, x2: x, y1: top - 4, y2: height, stroke: "#eee"}));
    svg.appendChild(el("text", {x: x + 2, y: top - 6}, (data.span * i / 10).toFixed(digits) + " s"));
  }
  data.lanes.forEach(function (name, i) {
    svg.appendChild(el("text", {x: 4, y: top + i * laneH + 12}, name.length > 24 ? name.slice(0, 23) + "…" : name));
  });
  var frag = document.createDocumentFragment();
  data.bars.forEach(function (b) {
    var w = Math.max(1, (b[2] - b[1]) * scale);
    var attrs = {x: left + b[1] * scale, y: top + b[0] * laneH + 2, width: w, height: laneH - 4,
                 fill: data.colours[b[3]]};
    var title;
    if (data.aggregated) {
      attrs["class"] = "bar bucket";
      attrs["data-count"] = b[4];
      title = b[4] + " tasks starting in " + b[1].toFixed(3) + "–" + b[2].toFixed(3) + " s: " +
        Object.keys(b[5]).map(function (s) { return b[5][s] + " " + s.toLowerCase(); }).join(", ");
    } else {
      attrs["class"] = "bar";
      attrs["data-task"] = b[4];
      title = "#" + b[5] + " " + b[4] + " (" + data.statuses[b[3]].toLowerCase() + "): " +
        b[1].toFixed(3) + "–" + b[2].toFixed(3) + " s";
    }
    var r = el("rect", attrs);
    r.appendChild(el("title", {}, title));
    frag.appendChild(r);
  });
  svg.appendChild(frag);
  document.getElementById("timeline").appendChild(svg);
  document.body.setAttribute("data-drawn", String(data.bars.length));
})();"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="data:,"><style>{css}</style></head>
<body>
{body}
<script id="run-data" type="application/json">{data}</script>
<script>{js}</script>
</body></html>
"""

__all__ = ["write_report", "timeline", "log_tail", "BAR_LIMIT", "STATUS_COLOURS"]
