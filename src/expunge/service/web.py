"""The status page: one server-rendered HTML page for operators and auditors (runs, their methods and guarantees,
the queue against its deadlines, recent batches, each ledger with its verification), and its login form, which
keeps the token in an HTTP-only cookie. The page reloads itself every few seconds."""

from __future__ import annotations

import datetime
import threading
import time
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, select_autoescape

from ..artifact import RunDirectory
from ..integrity import batch_of, reconcile
from ..unlearn.audit import verify_run
from ..unlearn.run import reading_verifier
from .runs import run_summary

COOKIE = "expunge_token"
REFRESH_S = 5
LEDGER_ROWS = 15  # rows of each ledger shown (the newest)
BATCHES = 20

env = Environment(autoescape=select_autoescape(default=True))

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; } th, td { padding: .25em .6em; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: top; } th { background: #f4f4f4; } .num { text-align: right; }
.ok { color: #176d2b; } .bad { color: #b00020; font-weight: bold; } .warn { color: #a15c00; } code { font-size: 12px; }
header { display: flex; justify-content: space-between; align-items: baseline; } h2 { margin-top: 1.2em; }
</style></head><body>{% block body %}{% endblock %}</body></html>"""

LOGIN = env.from_string(LAYOUT.replace("{% block body %}{% endblock %}", """
<h1>expunge service: sign in</h1>
<p>The status page is for operators and auditors. Paste your API token (from <code>expunge token create</code>).</p>
{% if error %}<p class="bad" id="login-error">{{ error }}</p>{% endif %}
<form method="post" action="/login"><input id="token" name="token" type="password" size="60" autocomplete="off">
<button id="sign-in" type="submit">Sign in</button></form>"""))

PAGE = env.from_string(LAYOUT.replace("{% block body %}{% endblock %}", """
<header><h1>expunge: deletion requests</h1>
<div>{{ principal.name }} ({{ principal.role }}, token {{ principal.token_id }}) &middot; {{ now }}
<form method="post" action="/logout" style="display:inline"><button id="sign-out">Sign out</button></form></div></header>
<p>Open requests: <strong id="queued-total">{{ queued_total }}</strong> queued,
<strong id="applying-total">{{ applying_total }}</strong> being applied.
<a href="/docs">API documentation</a> &middot; <a href="/metrics">metrics</a></p>

<h2>Runs</h2>
<table id="runs"><tr><th>run</th><th>method</th><th>guarantees</th><th>version</th><th>policy</th>
<th>queued</th><th>applying</th><th>oldest request</th></tr>
{% for r in runs %}<tr id="run-{{ r.name }}">
<td><strong>{{ r.name }}</strong><br><small>{{ r.data }}</small></td>
<td>{{ r.method }}{% if r.config_text %}<br><small>{{ r.config_text }}</small>{% endif %}</td>
<td>{{ r.guarantee_text }}</td>
<td class="num">{{ r.version }}</td>
<td><small>batch &le; {{ r.policy.max_batch }}, wait &le; {{ r.policy.max_wait_s }} s, deadline {{ r.deadline_text }}
{% if r.policy.method %}, method {{ r.policy.method }}{% endif %}</small>
{% if r.policy.paused %}<br><span class="warn" id="paused-{{ r.name }}">paused</span>
{% if r.policy.note %}<small> ({{ r.policy.note }})</small>{% endif %}{% endif %}</td>
<td class="num" id="queue-{{ r.name }}">{{ r.queue.queued }}</td>
<td class="num">{{ r.queue.applying }}</td>
<td>{% if r.oldest_text %}<span class="{{ r.oldest_class }}">{{ r.oldest_text }}</span>{% else %}&ndash;{% endif %}</td>
</tr>{% endfor %}</table>

<h2>Recent batches</h2>
<table id="batches"><tr><th>claimed</th><th>run</th><th>kind</th><th>requests</th><th>status</th><th>version</th>
<th>update s</th><th>figures</th></tr>
{% for b in batches %}<tr><td>{{ b.when }}</td><td>{{ b.run }}</td><td>{{ b.kind }}</td><td class="num">{{ b.size }}</td>
<td class="{{ 'bad' if b.status in ('refused', 'failed') else '' }}">{{ b.status }}{% if b.error %}<br><small>{{ b.error }}</small>{% endif %}</td>
<td class="num">{{ b.version if b.version is not none else '' }}</td>
<td class="num">{{ '%.3f'|format(b.seconds) if b.seconds is not none else '' }}</td><td><small>{{ b.figures_text }}</small></td></tr>
{% else %}<tr><td colspan="8">no batches yet</td></tr>{% endfor %}</table>

<h2>Ledgers</h2>
{% for r in runs %}<h3 id="ledger-{{ r.name }}">{{ r.name }}:
{% if r.verification.ok %}<span class="ok">verified</span>{% else %}<span class="bad">{{ r.verification.problems|length }} mismatch(es)</span>{% endif %}</h3>
<p><small>{{ r.verification.checked|join('; ') }}</small></p>
{% for p in r.verification.problems %}<p class="bad">{{ p.where }}: {{ p.what }}. Fix: {{ p.fix }}</p>{% endfor %}
<table><tr><th>row</th><th>version</th><th>at</th><th>kind</th><th>method</th><th>rows</th><th>requested by</th>
<th>reference</th><th>model before &rarr; after</th><th>signed</th></tr>
{% for e in r.ledger %}<tr><td class="num">{{ e.seq }}</td><td>{{ e.version }}{{ e.place }}{{ '' if e.in_file else '*' }}</td>
<td><small>{{ e.at }}</small></td><td>{{ e.kind }}</td><td>{{ e.method }}</td><td class="num">{{ e.n_rows }}</td>
<td><small>{{ e.requested_by or '' }}</small></td><td><small>{{ e.reference or '' }}</small></td>
<td><code>{{ (e.model_hash_before or '-')[:12] }} &rarr; {{ e.model_hash_after[:12] }}</code></td>
<td>{{ e.signer.key_id if e.signer else 'no' }}</td></tr>{% endfor %}</table>
{% if r.ledger_more %}<p><small>{{ r.ledger_more }} earlier row(s): GET /v1/runs/{{ r.name }}/ledger</small></p>{% endif %}
{% endfor %}"""))


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _guarantee_text(run: dict) -> str:
    parts = list(run["guarantees"]) or [f"none beyond each update's own ({run['last_guarantee'] or '?'})"]
    f = run["figures"]
    if run["method"] == "certified" and f.get("budget_left") is not None:
        parts.append(f"epsilon {f['epsilon']:g}, delta {f['delta']:g}; budget left {f['budget_left']:.3g} of "
                     f"{f['budget']:.3g} (about {f.get('removals_left_estimate')} removals)")
    if f.get("epsilon") is not None and run["method"] != "certified":
        parts.append(f"epsilon {f['epsilon']:.3g} at delta {f['delta']:g}")
    if run["method"] == "sisa":
        parts.append(f"{f.get('shards')} shards x {f.get('slices')} slices")
    if f.get("privacy_ended_at_version") is not None:
        parts.append(f"privacy ended at version {f['privacy_ended_at_version']}")
    return "; ".join(parts)


def _figures_text(b: dict) -> str:
    fig = b.get("figures") or {}
    metrics, guarantee = fig.get("metrics") or {}, fig.get("guarantee") or {}
    parts = [f"{fig['ids']} ids" if fig.get("ids") is not None else None,
             fig.get("method"), guarantee.get("kind"),
             f"test acc {metrics['test_acc']:.4f}" if isinstance(metrics.get("test_acc"), float) else None,
             f"moved {metrics['dist_to_previous']:.3g}" if isinstance(metrics.get("dist_to_previous"), float) else None,
             f"budget left {guarantee['budget_left']:.3g}" if isinstance(guarantee.get("budget_left"), float) else None,
             f"{metrics['shards_retrained']} shards retrained" if metrics.get("shards_retrained") is not None else None]
    return ", ".join(p for p in parts if p)


class Verifications:
    """verify_run per run, recomputed only when the run's ledger head moves (it hashes files and the model)."""

    def __init__(self):
        self._done: dict[str, tuple[str, dict]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, path, head: str) -> dict:
        with self._lock:
            found = self._done.get(name)
        if found is not None and found[0] == head:
            return found[1]
        result = verify_run(path).to_dict()
        with self._lock:
            self._done[name] = (head, result)
        return result


def register(app: FastAPI) -> None:
    catalog, queue, token_cache = app.state.catalog, app.state.queue, app.state.tokens
    verifications = Verifications()

    def signed_in(request: Request):
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        return token_cache.authenticate(token)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form():
        return HTMLResponse(LOGIN.render(title="expunge: sign in", error=None, refresh=None))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = parse_qs((await request.body()).decode(errors="replace"))
        principal = token_cache.authenticate((form.get("token") or [""])[0].strip())
        if principal is None or principal.role not in ("operator", "auditor"):
            error = ("unknown or revoked token" if principal is None
                     else f"a {principal.role} token cannot open the status page (operators and auditors can)")
            return HTMLResponse(LOGIN.render(title="expunge: sign in", error=error, refresh=None), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, form["token"][0].strip(), httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request):
        principal = signed_in(request)
        if principal is None:
            return RedirectResponse("/login", status_code=303)
        if principal.role not in ("operator", "auditor"):
            return HTMLResponse(LOGIN.render(title="expunge: sign in", refresh=None, error=(
                f"a {principal.role} token cannot open the status page (operators and auditors can)")), status_code=403)
        return HTMLResponse(PAGE.render(**_context(catalog, queue, verifications, principal)))


def _context(catalog, queue, verifications: Verifications, principal) -> dict:
    now = time.time()
    depth = queue.depth()
    runs = []
    for name in catalog.names():
        path = catalog.path(name)
        directory = RunDirectory(path)
        manifest = directory.read_manifest()
        r = run_summary(catalog, queue, name, depth)
        r["guarantee_text"] = _guarantee_text(r)
        r["config_text"] = ", ".join(f"{k}={v}" for k, v in (r.get("config") or {}).items()
                                     if v is not None and k not in ("backend", "workers", "address"))
        r["deadline_text"] = _duration(r["policy"]["deadline_s"])
        q = r["queue"]
        if q["oldest_age_s"] is not None:
            left = q["oldest_deadline_in_s"]
            r["oldest_text"] = (f"{_duration(q['oldest_age_s'])} old, " +
                                (f"deadline in {_duration(left)}" if left >= 0 else f"OVERDUE by {_duration(left)}"))
            r["oldest_class"] = "bad" if left < 0 else ("warn" if left < 0.1 * r["policy"]["deadline_s"] else "")
        state = reconcile(manifest, directory.ledger, str(path), full=True, verifier=reading_verifier(manifest))
        rows = [(e, True) for e in state.entries or []] + [(e, False) for e in state.pending_rows]
        shown = []
        for e, in_file in reversed(rows[-LEDGER_ROWS:]):
            batch = batch_of(e)
            shown.append(dict(e.body, in_file=in_file, place=f" ({batch['index'] + 1}/{batch['size']})"
                              if batch and batch["size"] > 1 else ""))
        r["ledger"], r["ledger_more"] = shown, max(0, len(rows) - LEDGER_ROWS)
        r["verification"] = verifications.get(name, path, manifest["ledger"]["head"])
        runs.append(r)
    batches = queue.batches(limit=BATCHES)
    for b in batches:
        b["when"], b["figures_text"] = _when(b["created_at"]), _figures_text(b)
    return {"title": "expunge: deletion requests", "refresh": REFRESH_S, "principal": principal, "now": _when(now),
            "runs": runs, "batches": batches,
            "queued_total": sum(d["queued"] for d in depth.values()),
            "applying_total": sum(d["applying"] for d in depth.values())}
