"""The calls web page, served by ingest: server-rendered HTML with a little JavaScript.

``/`` lists the calls, 200 a page (filter by status; find a call by its id, or calls by a field of the
recorder's metadata as KEY=VALUE: a caller's number); ``/calls/{call_id}`` shows one call:
the transcript as a conversation, the English translation beside it, summary,
topic, sentiment, emotion, the recorder's metadata, talk time per speaker, the
stage timeline and the trace id; beside an unfinished call's status, whether a worker is on it or it
waits. While a call is in progress the page polls the status API and
refreshes when something changes. A failed call's page retries it; a call whose
record the CRM keeps failing on can be set aside from its page (both through the
status API's actions). With ``API_TOKEN`` set, ``/login`` takes the
token once and keeps it in an HttpOnly cookie that the status API also accepts.
"""

from __future__ import annotations

import hmac
import time
from datetime import datetime, timezone
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from services.common.config import env_str
from services.ingest.store import (
    ACTIVE_STATES, DELIVERING, DONE, FAILED, MAX_OFFSET, STATES, Job, JobStore, metadata_query, transcribed_seconds,
)

TOKEN_COOKIE = "callmesh_token"
POLL_MS = 2000
PAGE_ROWS = 200  # calls listed on a page of the list

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:.7rem 1.5rem;display:flex;gap:1.5rem;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:1rem 1.5rem;max-width:1200px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:.45rem .6rem;border-bottom:1px solid #e3e6ea;text-align:left;font-size:.92rem}
th{background:#eef1f5}
.badge{padding:.1rem .5rem;border-radius:.7rem;font-size:.8rem;background:#dde3ea}
.done{background:#cdeccd}.failed{background:#f6c6c6}.negative{color:#a11}.positive{color:#174}
.filters a{margin-right:.6rem}
.find{margin:.4rem 0}.find input{padding:.3rem .4rem}.pages a{margin-right:1rem}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
.card{background:#fff;border:1px solid #e3e6ea;border-radius:.4rem;padding:.8rem 1rem;margin-bottom:1rem}
.turn{margin:.35rem 0;max-width:85%;padding:.4rem .7rem;border-radius:.6rem}
.turn.agent{background:#e3edf9;margin-right:auto}.turn.customer{background:#fdf0dc;margin-left:auto}
.turn.unknown{background:#eee}
.who{font-size:.75rem;color:#555}
.bar{height:1rem;background:#457b9d;border-radius:.2rem}
.bar.customer{background:#e9a13b}.bar.unknown{background:#999}
ol.timeline{padding-left:1.2rem}
.muted{color:#666}
.activity{font-size:.8rem;margin-left:.4rem}
"""


def _page(title: str, body: str, script: str = "", status: int = 200) -> web.Response:
    html = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)} · Callmesh</title>"
            f"<meta name='viewport' content='width=device-width'><style>{STYLE}</style></head><body>"
            "<header><a href='/'>Callmesh</a><span>calls</span></header>"
            f"<main>{body}</main>{f'<script>{script}</script>' if script else ''}</body></html>")
    return web.Response(text=html, status=status, content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _record(job: Job) -> dict[str, Any]:
    return (job.result or {}).get("record") or {}


def call_summary(job: Job) -> dict[str, Any]:
    """What the list shows of a call, whether it is finished or not."""
    record, transcript, analysis = _record(job), job.transcript or {}, job.analysis or {}
    return {
        "language": record.get("language", transcript.get("language", "")),
        "topic": record.get("topic", analysis.get("topic", "")),
        "sentiment": record.get("sentiment", analysis.get("sentiment", "")),
        "duration": record.get("audio_duration_seconds", transcript.get("audio_duration")),
    }


def held_up_at_the_crm(job: Job) -> dict[str, Any] | None:
    """The delivery of a call waiting for the CRM after the CRM failed on its record (see `callmesh set-aside`)."""
    delivery = (job.result or {}).get("delivery") or {}
    return delivery if job.state == DELIVERING and delivery.get("last_error") else None


def activity(job: Job, now: float) -> str:
    """What is happening to a call that is not finished: worked on, waiting for a slot, or waiting to retry."""
    if job.state not in ACTIVE_STATES:
        return ""
    if job.in_progress(now):
        return "in progress"
    if delivery := held_up_at_the_crm(job):
        return f"waiting for the CRM: {delivery.get('attempts', 0)} attempt(s), last: {delivery['last_error']}"
    if job.error and job.next_attempt_at > now:
        return f"next attempt at {_when(job.next_attempt_at)} UTC"
    return "waiting for a free worker"


def talk_time(segments: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of speech per speaker."""
    totals: dict[str, float] = {}
    for s in segments:
        totals[s["speaker"]] = totals.get(s["speaker"], 0.0) + max(0.0, s["end"] - s["start"])
    return totals


def authorized(request: web.Request, token: str) -> bool:
    """``Authorization: Bearer <token>`` or the login cookie; always true without a token."""
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    cookie = request.cookies.get(TOKEN_COOKIE, "")
    return (hmac.compare_digest(header.encode(), f"Bearer {token}".encode())
            or hmac.compare_digest(cookie.encode(), token.encode()))


class WebPages:
    def __init__(self, store: JobStore, token: str) -> None:
        self.store = store
        self.token = token
        self.jaeger = env_str("JAEGER_UI_URL", "").rstrip("/")

    def _guard(self, request: web.Request) -> None:
        if not authorized(request, self.token):
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs)}")

    async def index(self, request: web.Request) -> web.Response:
        self._guard(request)
        status = request.query.get("status")
        if status not in STATES:
            status = None
        try:
            offset = max(0, min(int(request.query.get("offset", "0")), MAX_OFFSET))
        except ValueError:
            offset = 0
        find = request.query.get("find", "").strip()
        metadata = metadata_query(find) if find else None
        not_found = ""
        if find and metadata is None:  # a call id: its page, when it is there
            if "\x00" not in find and await self.store.get(find) is not None:  # no text of PostgreSQL's has one
                raise web.HTTPFound(f"/calls/{quote(find, safe='')}")
            not_found = (f"<p class='muted' id='not-found'>There is no call {escape(find)} (or it was erased, or "
                         "deleted after CALL_RETENTION_DAYS). A recorder's field is found as KEY=VALUE.</p>")
        jobs = await self.store.list(status, PAGE_ROWS, offset, metadata)
        counts = await self.store.counts()
        filters = " ".join(
            f"<a href='/?status={s}'>{s} ({counts.get(s, 0)})</a>" for s in STATES) + " <a href='/'>all</a>"
        search = ("<form class='find' method='get' action='/'><input name='find' size='40' "
                  f"value='{escape(find)}' placeholder='call id, or KEY=VALUE of the recorder&#39;s metadata' "
                  "aria-label='find a call'>"
                  + (f"<input type='hidden' name='status' value='{status}'>" if status else "")
                  + "<button type='submit'>Find</button></form>")
        found = find if metadata else ""
        pages = []
        if offset:
            newer = _listing(status, found, "find", offset=max(0, offset - PAGE_ROWS))
            pages.append(f"<a id='newer' href='/?{escape(newer)}'>&larr; newer calls</a>")
        if len(jobs) == PAGE_ROWS:
            older = _listing(status, found, "find", offset=offset + PAGE_ROWS)
            pages.append(f"<a id='older' href='/?{escape(older)}'>older calls &rarr;</a>")
        rows = []
        now = time.time()
        for job in jobs:
            info = call_summary(job)
            duration = f"{info['duration']:.1f} s" if info["duration"] else ""
            rows.append(
                f"<tr data-call='{escape(job.call_id)}' data-status='{job.state}' "
                f"data-busy='{str(job.in_progress(now)).lower()}'>"
                f"<td><a href='/calls/{quote(job.call_id)}'>{escape(job.call_id)}</a></td>"
                f"<td><span class='badge {job.state}'>{job.state}</span>"
                f"<span class='activity muted'>{escape(activity(job, now))}</span></td>"
                f"<td>{escape(info['language'] or '')}</td><td>{escape(info['topic'] or '')}</td>"
                f"<td class='{escape(info['sentiment'] or '')}'>{escape(info['sentiment'] or '')}</td>"
                f"<td>{duration}</td><td class='muted'>{_when(job.updated_at)}</td></tr>")
        table = ("<table id='calls'><thead><tr><th>call</th><th>status</th><th>language</th><th>topic</th>"
                 "<th>sentiment</th><th>duration</th><th>updated (UTC)</th></tr></thead><tbody>"
                 + ("".join(rows) or "<tr><td colspan='7' class='muted'>No calls yet.</td></tr>")
                 + "</tbody></table>")
        title = f"Calls{f' — {status}' if status else ''}{f' — {escape(find)}' if metadata else ''}"
        body = (f"<h1>{title}</h1>{search}<p class='filters'>{filters}</p>{not_found}{table}"
                f"<p class='pages'>{' '.join(pages)}</p>")
        # Live: poll the status API and reload when any call on the page changes state, or a worker
        # takes it up or hands it back.
        query = _listing(status, found, "metadata", limit=PAGE_ROWS, offset=offset)
        script = ("const seen=new Map([...document.querySelectorAll('tr[data-call]')]"
                  ".map(r=>[r.dataset.call,r.dataset.status+' '+r.dataset.busy]));"
                  f"setInterval(async()=>{{const r=await fetch('/v1/calls?{query}');if(!r.ok)return;"
                  "const d=await r.json();if(d.calls.length!==seen.size||"
                  "d.calls.some(c=>seen.get(c.call_id)!==c.status+' '+c.progress.in_progress))"
                  f"location.reload();}},{POLL_MS});")
        return _page("Calls", body, script)

    async def call(self, request: web.Request) -> web.Response:
        self._guard(request)
        call_id = request.match_info["call_id"]
        job = await self.store.get(call_id)
        if job is None:
            return _page("Not found", f"<h1>No call {escape(call_id)}</h1><p>It never came, or it was erased or "
                         "done longer ago than CALL_RETENTION_DAYS.</p><p><a href='/'>All calls</a></p>", status=404)
        record, transcript, analysis = _record(job), job.transcript or {}, job.analysis or {}
        segments = record.get("segments") or transcript.get("segments") or []
        info = call_summary(job)
        now = time.time()
        parts = [f"<h1>Call {escape(job.call_id)} <span class='badge {job.state}' id='status'>{job.state}</span>"
                 f"<span class='activity muted' id='activity'>{escape(activity(job, now))}</span></h1>"]
        if job.error:
            retry = (f" <button id='retry'>Retry from {escape(job.error_stage or 'the start')}</button>"
                     if job.state == FAILED else "")
            parts.append(f"<div class='card failed' id='error'><b>{'Failed' if job.state == FAILED else 'Last error'}"
                         f" at {escape(job.error_stage or '')}:</b> {escape(job.error)}{retry}</div>")
        if held_up_at_the_crm(job):
            parts.append("<div class='card' id='held-up'>The CRM keeps failing on this record, and the records "
                         "behind it wait. Set it aside (the call fails at delivery with your reason; retry it once "
                         "the CRM is fixed): <input id='reason' maxlength='500' size='40' "
                         "placeholder='why, e.g. a ticket number'> <button id='set-aside'>Set aside</button></div>")
        if job.state == DONE and job.transcript is not None:
            revision = record.get("revision") or 1
            parts.append("<div class='card' id='reanalyze-card'>The CRM has revision "
                         f"{int(revision)} of this call's record. After a change of topics, prompt or model: "
                         "<button id='reanalyze'>Analyse again</button> (the CRM gets the next revision)</div>")
        parts.append("<p class='negative' id='action-error' role='alert'></p>")
        facts = [("Language", info["language"]), ("Topic", info["topic"]), ("Sentiment", info["sentiment"]),
                 ("Emotion", record.get("emotion", analysis.get("emotion", ""))),
                 ("Duration", f"{info['duration']:.1f} s" if info["duration"] else "")]
        parts.append("<div class='card' id='facts'>" + " · ".join(
            f"<b>{k}:</b> <span id='{k.lower()}'>{escape(str(v or '—'))}</span>" for k, v in facts) + "</div>")
        if job.options.metadata:  # what the recorder said about the call: agent, queue, …
            parts.append("<div class='card' id='metadata'>" + " · ".join(
                f"<b>{escape(key)}:</b> {escape(value)}" for key, value in sorted(job.options.metadata.items()))
                + "</div>")
        summary = record.get("summary") or analysis.get("summary") or []
        if summary:
            parts.append("<div class='card' id='summary'><h2>Summary</h2><ul>"
                         + "".join(f"<li>{escape(s)}</li>" for s in summary) + "</ul></div>")
        turns = "".join(
            f"<div class='turn {escape(s['speaker'])}'><div class='who'>{escape(s['speaker'].capitalize())} · "
            f"{_clock(s['start'])}–{_clock(s['end'])}</div>{escape(s['text'].strip())}</div>" for s in segments)
        translation = record.get("translated_transcript") or analysis.get("translated_transcript") or ""
        silent = transcript.get("complete") and not turns  # transcribed whole: no speech in the recording
        audio, done_to = transcript.get("audio_duration"), transcribed_seconds(transcript)
        so_far = (f"<p class='muted' id='transcribed'>Transcribed up to {_clock(done_to or 0.0)} of {_clock(audio)}."
                  "</p>" if audio and not transcript.get("complete") and job.state in ACTIVE_STATES else "")
        parts.append(
            "<div class='grid'><div class='card' id='conversation'><h2>Transcript</h2>" + so_far
            + (turns or f"<p class='muted'>{'No speech in the recording.' if silent else 'No speech yet.'}</p>")
            + "</div><div class='card' id='translation'><h2>English translation</h2>"
            + (f"<p>{escape(translation)}</p>" if translation else "<p class='muted'>" + (
                "Nothing to translate." if silent else "Already in English." if info["language"] == "en"
                else "Not yet.") + "</p>")
            + "</div></div>")
        totals = talk_time(segments)
        if totals:
            longest = max(totals.values()) or 1.0
            bars = "".join(
                f"<tr><td>{escape(who.capitalize())}</td><td style='width:70%'><div class='bar {escape(who)}' "
                f"style='width:{100 * secs / longest:.0f}%'></div></td><td>{secs:.1f} s</td></tr>"
                for who, secs in sorted(totals.items()))
            parts.append(f"<div class='card' id='talk-time'><h2>Talk time</h2><table>{bars}</table></div>")
        timeline = "".join(f"<li><b>{escape(stage)}</b> <span class='muted'>{_when(ts)}</span></li>"
                           for stage, ts in sorted(job.stage_times.items(), key=lambda kv: kv[1]))
        trace = escape(job.trace_id)
        trace_html = f"<a href='{escape(self.jaeger)}/trace/{trace}'>{trace}</a>" if self.jaeger else trace
        parts.append(f"<div class='card' id='timeline'><h2>Stages</h2><ol class='timeline'>{timeline}</ol>"
                     f"<p>Trace: <code id='trace'>{trace_html}</code> · attempts {job.attempts}</p></div>")
        script = (f"async function act(action,body){{const r=await fetch('/v1/calls/{quote(job.call_id)}:'+action,"
                  "{method:'POST',headers:body?{'Content-Type':'application/json'}:{},"
                  "body:body?JSON.stringify(body):undefined});if(r.ok){location.reload();return;}"
                  "const p=await r.json().catch(()=>({}));"
                  "document.getElementById('action-error').textContent=p.detail||('HTTP '+r.status);}"
                  "document.getElementById('retry')?.addEventListener('click',()=>act('retry'));"
                  "document.getElementById('reanalyze')?.addEventListener('click',()=>act('reanalyze'));"
                  "document.getElementById('set-aside')?.addEventListener('click',()=>act('setAside',"
                  "{reason:document.getElementById('reason').value}));")
        if job.state in ACTIVE_STATES:
            script += (f"const s='{job.state}',n={len(segments)},b={str(job.in_progress(now)).lower()};"
                      f"setInterval(async()=>{{const r=await fetch('/v1/calls/{quote(job.call_id)}');if(!r.ok)return;"
                      "const d=await r.json();"
                      "if(d.status!==s||d.progress.segments!==n||d.progress.in_progress!==b)location.reload();},"
                      f"{POLL_MS});")
        return _page(f"Call {job.call_id}", "".join(parts), script)

    async def login_form(self, request: web.Request) -> web.Response:
        target = request.query.get("next", "/")
        return _page("Sign in", "<h1>Sign in</h1><form method='post' action='/login'>"
                     f"<input type='hidden' name='next' value='{escape(target)}'>"
                     "<label>API token <input type='password' name='token' autofocus></label> "
                     "<button type='submit'>Sign in</button></form>")

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        token, target = str(form.get("token", "")), str(form.get("next", "/"))
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if self.token and not hmac.compare_digest(token.encode(), self.token.encode()):
            return _page("Sign in", "<h1>Sign in</h1><p class='failed'>That token is not right.</p>"
                         "<p><a href='/login'>Try again</a></p>")
        response = web.HTTPSeeOther(target)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
        raise response

    ROUTES = (("GET", "/"), ("GET", "/calls/{call_id}"), ("GET", "/login"), ("POST", "/login"))

    def register(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/calls/{call_id}", self.call)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)


def _listing(status: str | None, metadata: str, metadata_name: str, **page: int) -> str:
    """The query string of a listing: its status, its metadata filter (as the page's ``find`` or the API's
    ``metadata``) and ``page`` (offset, limit), those set; percent-encoded, quotes included, so that it goes as it
    is into an attribute or a script's string."""
    fields: dict[str, Any] = {"status": status, metadata_name: metadata, **page}
    return urlencode({name: value for name, value in fields.items() if value}, quote_via=quote)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"

