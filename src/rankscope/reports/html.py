"""report.html: one jinja2 template with autoescape, the only path by which values reach the page.

Every run name, status, error, config value, metric name and number is passed to the template as
data and escaped by jinja2; nothing is pasted into HTML by string formatting. Layout: a summary (verdict
counts, the primary endpoints' rows, the headline table), the key figures (loss; PER of weights, updates
and gradients), the scale box (and tuned values) with the paper's reference numbers beside them (labelled
as the paper's, at pico scale), the other figures, then the long tables (every findings row, per-seed
differences, per-domain tables, every run) each in a collapsible <details>
block. Failed, unfinished or excluded runs are listed right after the summary. Without findings rows (a single run, or
one method) the summary is the headline table and one line says why nothing was tested; the paper's numbers follow the key
figures.
"""

from __future__ import annotations

from typing import Any

import jinja2

CSS = """body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 8px}
table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}.top{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.top>div{flex:1 1 480px}.paper{background:#fff6e0;border:2px dashed #c90;padding:8px}.bad{color:#b00}.note{color:#555;font-size:13px}
details.long{margin:4px 0}details.long>summary{cursor:pointer;font-weight:bold;padding:3px 0}"""

TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>rankscope report</title><style>{{ css }}</style></head><body>
{%- macro table(t) %}
<h3>{{ t.title }}</h3>{% if t.note %}<p class="note">{{ t.note }}</p>{% endif %}
<table><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{%- for row in t.rows %}<tr>{% for c in row %}<td title="{{ c.title }}">{{ c.text }}</td>{% endfor %}</tr>{% endfor %}</table>
{%- endmacro %}
<h1>rankscope report</h1>
<p>{{ stamp }} — inputs: {{ inputs }}</p>
<p>{{ intro }}</p>
{%- if counts or summary %}
<h2>Summary</h2>
{%- if counts %}<p class="note">At a glance (rows per verdict, by rule): {{ counts }}</p>{% endif %}
{%- for t in summary %}{{ table(t) }}{% endfor %}
{%- endif %}
{%- if problems %}
<h3 class="bad">Failed, unfinished or excluded runs</h3>
<table><tr><th>run</th><th>status</th><th>error</th><th>log</th></tr>
{%- for p in problems %}<tr class="bad"><td>{{ p.run }}</td><td>{{ p.status }}</td><td>{{ p.error }}</td><td>{{ p.log }}</td></tr>{% endfor %}
</table>
{%- endif %}
{%- for f in key_figures %}
<h3>{{ f.title }}</h3><img alt="{{ f.title }}" src="{{ f.src }}"><p class="note">{{ f.caption }}</p>
{%- endfor %}
{%- if findings %}
<div class="top">
<div class="findings">
{%- for t in findings %}{{ table(t) }}{% endfor %}
</div>
<div class="paper">{{ table(paper) }}<p class="note">{{ paper_note }}</p><img alt="paper reference" src="{{ paper_png }}"></div>
</div>
{%- else %}
<h3>Findings</h3><p class="note">{{ no_findings }}</p>
<div class="paper">{{ table(paper) }}<p class="note">{{ paper_note }}</p><img alt="paper reference" src="{{ paper_png }}"></div>
{%- endif %}
{%- for f in figures %}
<h3>{{ f.title }}</h3><img alt="{{ f.title }}" src="{{ f.src }}"><p class="note">{{ f.caption }}</p>
{%- endfor %}
{%- if tables %}
<h2>Tables</h2>
{%- for t in tables %}<details class="long"><summary>{{ t.title }} ({{ t.rows|length }} rows)</summary>{{ table(t) }}</details>{% endfor %}
{%- endif %}
</body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(**context: Any) -> str:
    """The page; `context` holds plain strings and lists (see TEMPLATE), all escaped on output."""
    return _ENV.from_string(TEMPLATE).render(css=jinja2.utils.markupsafe.Markup(CSS), **context)
