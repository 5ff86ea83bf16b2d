"""The task page behind the `url` the sandbox reports: `GET /dashboard/tasks/{taskId}`, plain HTML.

It shows the task (status, worker, times, totals), each turn (status, usage, input, answer, error,
sources and output files as links) for a person who follows the link in a reply. Everything on it is
attacker text (mail in, agent out), so jinja2 escapes every value, only http(s) URLs become links, and
the answer headers forbid scripts, frames, sniffing and referrers. Inputs and answers longer than
`SHOWN` characters are cut, with the number left out stated, so a 10 MB answer gives a small page.

No key is asked for: a browser following a mailed link cannot send the bearer key, and the real
dashboard's login has no sandbox counterpart. The URL's unguessable part is the task id, when it is a
ULID (80 random bits), as mailgate's and the sandbox's own ids are; the sandbox listens on loopback and
holds test data only. See docs/sandbox.md.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import jinja2
from starlette.responses import HTMLResponse

from mailgate.sandbox._state import SandboxTask, SandboxTurn

SHOWN = 64 * 1024
HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ task.title }} · sandbox task</title>
<style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
pre{white-space:pre-wrap;background:#f4f4f4;padding:.6em;overflow-wrap:anywhere}
dt{font-weight:600}section{border-top:1px solid #ccc;margin-top:1.5em}</style></head>
<body><h1>{{ task.title }}</h1>
<p>Task <code>{{ task.id }}</code> on worker <code>{{ task.worker_id }}</code>:
<strong>{{ task.status }}</strong>
{%- if task.archived %} (archived){% endif %}. Mailgate sandbox, not the Handinger dashboard.</p>
<dl><dt>Created</dt><dd>{{ task.created_at }} (triggered by {{ task.triggered_by }})</dd>
<dt>Completed</dt><dd>{{ task.completed_at or "not yet" }}</dd>
<dt>Totals</dt><dd>{{ turns|length }} turns, {{ credits }} credits, {{ duration_ms }} ms</dd></dl>
{% for turn in turns %}<section id="turn-{{ turn.seq }}">
<h2>Turn {{ turn.seq + 1 }}: {{ turn.status }}</h2>
<p>Started {{ turn.started_at }}{% if turn.completed_at %}, completed {{ turn.completed_at }}{% endif %};
{{ turn.credits }} credits, {{ turn.duration_ms }} ms, {{ turn.input_tokens }} input and
{{ turn.output_tokens }} output tokens.</p>
<h3>Input</h3><pre>{{ turn.input_shown }}</pre>
<h3>Answer</h3><pre>{{ turn.answer_shown }}</pre>
{% if turn.error %}<p><strong>Error:</strong> {{ turn.error }}</p>{% endif %}
{% if turn.links %}<h3>Files and sources</h3><ul>{% for link in turn.links %}<li>
{%- if link.href %}<a href="{{ link.href }}" rel="noreferrer nofollow">{{ link.label }}</a>
{%- else %}{{ link.label }}{% endif %}{% if link.note %} ({{ link.note }}){% endif %}</li>
{% endfor %}</ul>{% endif %}</section>
{% else %}<p>No turn yet.</p>{% endfor %}
</body></html>
"""
_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_TEMPLATE = _ENV.from_string(_PAGE)
_MISSING = _ENV.from_string(
    "<!doctype html><title>Not found</title><p>No task <code>{{ id }}</code> in this sandbox.</p>"
)


def task_page(task: SandboxTask) -> HTMLResponse:
    """The page for `task` (200, text/html, with the restrictive headers above)."""
    turns = [_turn_view(turn) for turn in task.turns]
    html = _TEMPLATE.render(
        task=task,
        turns=turns,
        credits=sum(t.credits for t in task.turns),
        duration_ms=sum(t.duration_ms for t in task.turns),
    )
    return HTMLResponse(html, headers=HEADERS)


def missing_page(task_id: str) -> HTMLResponse:
    """404 for an unknown task, as a page (a browser asked)."""
    return HTMLResponse(_MISSING.render(id=task_id[:200]), status_code=404, headers=HEADERS)


def _turn_view(turn: SandboxTurn) -> dict[str, object]:
    links = [
        {"label": str(f.get("filename") or f.get("url")), "href": _href(f.get("url")), "note": _size(f)}
        for f in turn.files
    ]
    links += [
        {"label": str(s.get("title") or s.get("url")), "href": _href(s.get("url")), "note": "source"}
        for s in turn.sources
    ]
    return {
        "seq": turn.seq,
        "status": turn.status,
        "started_at": turn.started_at,
        "completed_at": turn.completed_at,
        "credits": turn.credits,
        "duration_ms": turn.duration_ms,
        "input_tokens": turn.input_tokens,
        "output_tokens": turn.output_tokens,
        "input_shown": _cut(turn.input),
        "answer_shown": _cut(turn.output_text) if turn.output_text else "(none yet)",
        "error": turn.error,
        "links": links,
    }


def _cut(text: str) -> str:
    if len(text) <= SHOWN:
        return text
    return f"{text[:SHOWN]}\n[… {len(text) - SHOWN} more characters not shown]"


def _href(url: object) -> str | None:
    """`url` when it is an absolute http(s) URL (anything else, `javascript:` say, is shown as text)."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc else None


def _size(file: dict[str, object]) -> str:
    size = file.get("size")
    kind = str(file.get("mediaType") or "")
    return f"{kind}, {size} bytes" if isinstance(size, int) else kind
