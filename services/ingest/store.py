"""The durable job store: one row per call, from webhook to CRM.

SQLite by default (WAL, ``synchronous=FULL``); PostgreSQL when ``DATABASE_URL`` is
set, so several ingest replicas share the queue: a claim takes due jobs with
``FOR UPDATE SKIP LOCKED``, so two replicas never take the same job. A job is held
under a lease; a worker that dies leaves a lease that expires, and the job is
claimed again by whichever replica comes first.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.database import connect
from services.common.schema_version import SchemaVersion

RECEIVED, DOWNLOADING, TRANSCRIBING, ANALYZING, DELIVERING, DONE, FAILED = (
    "received", "downloading", "transcribing", "analyzing", "delivering", "done", "failed")
STATES = (RECEIVED, DOWNLOADING, TRANSCRIBING, ANALYZING, DELIVERING, DONE, FAILED)
ACTIVE_STATES = (RECEIVED, DOWNLOADING, TRANSCRIBING, ANALYZING, DELIVERING)
CALL_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")  # @: a SIP Call-ID (1234abcd@pbx.example) as it is
MAX_OFFSET = 2**31 - 1  # the furthest a page of calls may start (PostgreSQL's integer)
# The recorder's own fields about a call (the webhook's ``metadata``), kept with it and found by one of them.
METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_METADATA_ENTRIES = 32
MAX_METADATA_VALUE = 1024
# KEY=VALUE; a NUL is no metadata's (the webhook refuses it) and no PostgreSQL text's
METADATA_QUERY_RE = re.compile(rf"{METADATA_KEY_RE.pattern}=[^\x00]{{0,{MAX_METADATA_VALUE}}}")


def metadata_query(text: str) -> tuple[str, str] | None:
    """``KEY=VALUE`` (the ``metadata`` filter of the status API and the calls page) as (key, value); None when it
    is not that."""
    if not METADATA_QUERY_RE.fullmatch(text):
        return None
    key, _, value = text.partition("=")
    return key, value

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    call_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    recording_url TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT,
    error_stage TEXT,
    stage_times TEXT NOT NULL DEFAULT '{}',
    trace_context TEXT NOT NULL DEFAULT '{}',
    trace_id TEXT NOT NULL DEFAULT '',
    recording_path TEXT,
    transcript TEXT,
    analysis TEXT,
    result TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);  -- MAX(seq) on every insert, newest-first lists
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);  -- ?status=failed, newest first
CREATE INDEX IF NOT EXISTS jobs_state_updated ON jobs (state, updated_at);  -- done calls past their retention
CREATE TABLE IF NOT EXISTS webhook_ids (
    webhook_id TEXT PRIMARY KEY,
    call_id TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_ids_age ON webhook_ids (received_at);
CREATE TABLE IF NOT EXISTS call_metadata (  -- the recorder's metadata, a row a field, to find a caller's calls
    name TEXT NOT NULL,
    digest TEXT NOT NULL,  -- of the value (up to 1,024 characters: more than PostgreSQL indexes); the job has it
    call_id TEXT NOT NULL REFERENCES jobs (call_id) ON DELETE CASCADE,
    PRIMARY KEY (name, digest, call_id)
);
CREATE INDEX IF NOT EXISTS call_metadata_call ON call_metadata (call_id);  -- for the cascade
"""


def value_digest(value: str) -> str:
    """What ``call_metadata`` keeps of a metadata value: its index entry, never read back as the value."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _index_metadata(c: Any, call_id: str, metadata: dict[str, str] | None) -> None:
    """The rows of ``call_metadata`` for a call's metadata (in the transaction that stores the call)."""
    if metadata:
        c.executemany("INSERT INTO call_metadata (name, digest, call_id) VALUES (?, ?, ?)",
                      [(name, value_digest(value), call_id) for name, value in metadata.items()])


def _index_kept_metadata(c: Any) -> None:
    """Version 1 to 2: ``call_metadata`` filled from the calls kept, a thousand at a time."""
    after = ""
    while rows := c.execute("SELECT call_id, options FROM jobs WHERE call_id > ? ORDER BY call_id LIMIT 1000",
                            (after,)).fetchall():
        for row in rows:
            _index_metadata(c, row["call_id"], json.loads(row["options"]).get("metadata"))
        after = rows[-1]["call_id"]


# The version of the tables above: raised, with an upgrade from the one before, whenever they change.
# 2: call_metadata.
SCHEMA_VERSION = SchemaVersion("ingest.jobs", 2, upgrades={1: _index_kept_metadata})

# A signed webhook older than 5 minutes is refused anyway; ids are kept a day to spare the clocks.
WEBHOOK_ID_RETENTION_SECONDS = 86400.0
WEBHOOK_ID_PURGE_SECONDS = 60.0  # expired webhook ids are deleted at most this often (not on every webhook)


def transcribed_seconds(transcript: dict[str, Any]) -> float | None:
    """How much of the recording is transcribed: up to the end of the last segment so far, all of it once
    complete; None before anything is."""
    if transcript.get("complete"):
        return transcript.get("audio_duration")
    segments = transcript.get("segments") or []
    return max(s["end"] for s in segments) if segments else None


@dataclass(frozen=True)
class JobOptions:
    """What the webhook said about the recording beyond its URL."""

    language: str | None = None
    agent_channel: str | None = None  # "left"/"right" for stereo recordings; None for mono
    metadata: dict[str, str] | None = None  # the recorder's own fields about the call, passed to the CRM record

    def given(self) -> dict[str, Any]:
        """The options the webhook set."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def to_json(self) -> str:
        """As the job row keeps them."""
        return json.dumps(self.given())


@dataclass
class Job:
    call_id: str
    recording_url: str
    options: JobOptions
    state: str
    attempts: int
    next_attempt_at: float
    error: str | None
    error_stage: str | None
    stage_times: dict[str, float]
    trace_context: dict[str, str]
    trace_id: str
    recording_path: str | None
    transcript: dict | None
    analysis: dict | None
    result: dict | None
    created_at: float
    updated_at: float
    lease_owner: str | None = None
    lease_until: float = 0.0  # a worker holds the job until then
    extra: dict[str, Any] = field(default_factory=dict)

    def in_progress(self, now: float) -> bool:
        """Whether a worker is on the call at ``now``: false while it waits for a free slot or its next attempt."""
        return self.state in ACTIVE_STATES and self.lease_until > now

    @classmethod
    def from_row(cls, row: Any) -> "Job":
        def j(name: str) -> Any:
            value = row[name]
            return json.loads(value) if value else None

        return cls(
            call_id=row["call_id"], recording_url=row["recording_url"], options=JobOptions(**j("options")),
            state=row["state"], attempts=row["attempts"], next_attempt_at=row["next_attempt_at"],
            error=row["error"], error_stage=row["error_stage"], stage_times=j("stage_times") or {},
            trace_context=j("trace_context") or {}, trace_id=row["trace_id"], recording_path=row["recording_path"],
            transcript=j("transcript"), analysis=j("analysis"), result=j("result"),
            created_at=row["created_at"], updated_at=row["updated_at"], lease_owner=row["lease_owner"],
            lease_until=row["lease_until"],
        )


def awaits_recording(job: Job) -> bool:
    """Whether the call has not got its recording yet: it is at or before the download, or failed there."""
    stage = job.error_stage if job.state == FAILED else job.state
    return job.recording_path is None and stage in (RECEIVED, DOWNLOADING)


def _entering(state: str, stage_times: str, now: float) -> dict[str, Any]:
    """The columns that move a job into ``state`` at ``now``: its time stamped, its attempts counted anew."""
    times = json.loads(stage_times)
    times[state] = now
    return {"state": state, "stage_times": json.dumps(times), "attempts": 0}


def _remember_webhook(c: Any, webhook_id: str, call_id: str, now: float) -> None:
    """Keep the webhook id a day, so the same webhook sent again is known (see WEBHOOK_ID_RETENTION_SECONDS)."""
    c.execute("INSERT INTO webhook_ids (webhook_id, call_id, received_at) VALUES (?,?,?) "
              "ON CONFLICT (webhook_id) DO UPDATE SET call_id = excluded.call_id, "
              "received_at = excluded.received_at", (webhook_id, call_id, now))


class JobStore:
    def __init__(self, location: Path | str) -> None:
        """``location``: a SQLite file, or a ``postgresql://`` URL."""
        self.db = connect(location, SCHEMA, sequences=("jobs",), version=SCHEMA_VERSION)
        self._purged_at = 0.0

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def create(self, call_id: str, recording_url: str, options: JobOptions, trace_context: dict[str, str],
                     trace_id: str, webhook_id: str | None = None) -> tuple[Job, bool]:
        """Store a new job, or return the existing one for this call_id; says whether it is new.

        A ``webhook_id`` seen before returns the job that webhook created, whatever this body says."""
        now = time.time()
        opts = options.to_json()

        purge = webhook_id is not None and now - self._purged_at >= WEBHOOK_ID_PURGE_SECONDS
        if purge:
            self._purged_at = now

        def tx(c: Any) -> tuple[Job, bool]:
            if webhook_id is not None:
                seen = c.execute("SELECT call_id FROM webhook_ids WHERE webhook_id = ?", (webhook_id,)).fetchone()
                if seen is not None:
                    row = c.execute("SELECT * FROM jobs WHERE call_id = ?", (seen[0],)).fetchone()
                    if row is not None:
                        return Job.from_row(row), False
            # One statement for a new call (its arrival number taken inside it); a read only for a known one.
            cur = c.execute(
                "INSERT INTO jobs (call_id, seq, recording_url, options, state, next_attempt_at, "
                f"stage_times, trace_context, trace_id, created_at, updated_at) VALUES (?,({self.db.next_seq('jobs')}),"
                "?,?,?,?,?,?,?,?,?) ON CONFLICT (call_id) DO NOTHING",
                (call_id, recording_url, opts, RECEIVED, now, json.dumps({RECEIVED: now}),
                 json.dumps(trace_context), trace_id, now, now))
            new = cur.rowcount == 1
            if new:
                _index_metadata(c, call_id, options.metadata)
                job = Job(call_id=call_id, recording_url=recording_url, options=options, state=RECEIVED, attempts=0,
                          next_attempt_at=now, error=None, error_stage=None, stage_times={RECEIVED: now},
                          trace_context=dict(trace_context), trace_id=trace_id, recording_path=None, transcript=None,
                          analysis=None, result=None, created_at=now, updated_at=now)
            else:
                job = Job.from_row(c.execute("SELECT * FROM jobs WHERE call_id = ?", (call_id,)).fetchone())
            if webhook_id is not None and job.recording_url == recording_url:
                if purge:
                    c.execute("DELETE FROM webhook_ids WHERE received_at < ?", (now - WEBHOOK_ID_RETENTION_SECONDS,))
                _remember_webhook(c, webhook_id, call_id, now)
            return job, new

        return await self.db.grouped(tx)

    async def relink(self, call_id: str, recording_url: str, options: JobOptions,
                     webhook_id: str | None = None) -> Job | None:
        """Take a new link to the call's recording (with the new webhook's options), if the call has no recording:
        return the job as it is now, or None when its recording is downloaded (or it is done), where another link
        no longer counts.

        Recording stores hand out signed links that expire, and a recorder re-signs the link when it sends a call
        again: a call whose download failed on an expired link goes back to the download with the new one, and a
        call waiting for its next download attempt tries the new link at once. A download in flight goes on with
        the link it has (the worker tries the new one if that download fails). A call that failed past its download
        and whose recording was let go (RECORDING_FAILED_RETENTION_HOURS) keeps the new link for its retry, which
        downloads the recording again: it stays failed."""
        now = time.time()

        def tx(c: Any) -> Job | None:
            row = c.execute(f"SELECT * FROM jobs WHERE call_id = ?{self.db.for_update}", (call_id,)).fetchone()
            if row is None:
                return None
            job = Job.from_row(row)
            sets: dict[str, Any] = {"recording_url": recording_url, "options": options.to_json(), "updated_at": now}
            if awaits_recording(job):
                sets["attempts"] = 0
                if job.lease_until < now:  # nobody is downloading it: the new link is tried now
                    sets["next_attempt_at"] = now
                if job.state == FAILED:
                    sets.update(_entering(DOWNLOADING, row["stage_times"], now), error=None, error_stage=None)
            elif not (job.state == FAILED and job.recording_path is None):  # a failed call's recording, let go
                return None
            assignments = ", ".join(f"{k} = ?" for k in sets)
            c.execute(f"UPDATE jobs SET {assignments} WHERE call_id = ?", (*sets.values(), call_id))
            c.execute("DELETE FROM call_metadata WHERE call_id = ?", (call_id,))  # the new webhook's metadata counts
            _index_metadata(c, call_id, options.metadata)
            if webhook_id is not None:
                _remember_webhook(c, webhook_id, call_id, now)
            return Job.from_row(c.execute("SELECT * FROM jobs WHERE call_id = ?", (call_id,)).fetchone())

        return await self.db.transaction(tx)

    async def release_leases(self, owner: str) -> int:
        """Hand back the jobs an earlier run of this same worker held when it died."""
        def tx(c: Any) -> int:
            return c.execute("UPDATE jobs SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = ?",
                             (owner,)).rowcount

        return await self.db.transaction(tx)

    async def ping(self) -> None:
        """Raise unless the database answers."""
        await self.db.fetchone("SELECT 1")

    async def get(self, call_id: str) -> Job | None:
        row = await self.db.fetchone("SELECT * FROM jobs WHERE call_id = ?", (call_id,))
        return Job.from_row(row) if row else None

    async def list(self, state: str | None = None, limit: int = 100, offset: int = 0,
                   metadata: tuple[str, str] | None = None) -> list[Job]:
        """Calls newest first: those in ``state``, and those whose recorder's ``metadata`` (key, value) has that
        value (a customer's number, for an erasure request), found through ``call_metadata``."""
        source = "jobs"
        where: list[str] = []
        params: list[Any] = []
        if metadata is not None:
            # The caller's calls first, then their state: SQLite joins a CROSS JOIN's tables in the order written,
            # where it would otherwise read every call in that state (no statistics tell it which is fewer).
            name, value = metadata
            source = "call_metadata CROSS JOIN jobs"
            field, field_params = self.db.json_text("options", "metadata", name)
            where += ["call_metadata.call_id = jobs.call_id", "name = ?", "digest = ?",
                      f"{field} = ?"]  # the value itself, not only its digest
            params += [name, value_digest(value), *field_params, value]
        if state:
            where.append("state = ?")
            params.append(state)
        condition = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self.db.fetchall(f"SELECT jobs.* FROM {source} {condition}ORDER BY seq DESC LIMIT ? OFFSET ?",
                                      (*params, limit, offset))
        return [Job.from_row(r) for r in rows]

    async def recordings_in_use(self) -> set[str]:
        """The file names of the recordings that calls not yet done still hold (failed ones included,
        for a retry)."""
        holding = (*ACTIVE_STATES, FAILED)
        rows = await self.db.fetchall(f"SELECT recording_path FROM jobs WHERE state IN ({','.join('?' * len(holding))}) "
                                      "AND recording_path IS NOT NULL", holding)
        return {Path(r[0]).name for r in rows}

    async def release_failed_recordings(self, failed_before: float) -> list[tuple[str, str]]:
        """Let go of the recordings of calls that failed before ``failed_before`` (their retention is over):
        return (call_id, recording_path) of each; a retry of such a call downloads its recording again."""

        def tx(c: Any) -> list[tuple[str, str]]:
            rows = c.execute(f"SELECT call_id, recording_path FROM jobs WHERE state = ? AND recording_path IS NOT NULL "
                             f"AND updated_at < ?{self.db.for_update}", (FAILED, failed_before)).fetchall()
            c.executemany("UPDATE jobs SET recording_path = NULL WHERE call_id = ?", [(r[0],) for r in rows])
            return [(r[0], r[1]) for r in rows]

        return await self.db.transaction(tx)

    async def erase_finished(self, call_id: str) -> Job | None:
        """Delete the call, and the webhook ids that named it, if it is done or failed (no worker will touch it
        again unless it is retried); return it as it was, or None when it is unknown or still in the pipeline."""

        def tx(c: Any) -> Job | None:
            row = c.execute(f"SELECT * FROM jobs WHERE call_id = ?{self.db.for_update}", (call_id,)).fetchone()
            if row is None or row["state"] not in (DONE, FAILED):
                return None
            c.execute("DELETE FROM jobs WHERE call_id = ?", (call_id,))
            # And the webhook ids that named it (kept a day against replays). No index leads there: a scan of a
            # day of webhook ids, for a rare request, costs less than an index written with every webhook.
            c.execute("DELETE FROM webhook_ids WHERE call_id = ?", (call_id,))
            return Job.from_row(row)

        return await self.db.transaction(tx)

    async def delete_done(self, done_before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` calls that were done before ``done_before`` (their retention is over), the
        oldest first; return how many. Their records are in the CRM; their status answers 404 from now on."""
        return await self.db.transaction(lambda c: c.execute(
            "DELETE FROM jobs WHERE call_id IN (SELECT call_id FROM jobs WHERE state = ? AND updated_at < ? "
            "ORDER BY updated_at LIMIT ?)", (DONE, done_before, limit)).rowcount)

    async def oldest_active_created_at(self) -> float | None:
        """When the oldest call still in the pipeline arrived (None when none is)."""
        placeholders = ",".join("?" * len(ACTIVE_STATES))
        row = await self.db.fetchone(f"SELECT MIN(created_at) FROM jobs WHERE state IN ({placeholders})", ACTIVE_STATES)
        return row[0] if row else None

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {r[0]: r[1] for r in rows}

    async def claim(self, owner: str, limit: int, lease_seconds: float,
                    states: tuple[str, ...] = ACTIVE_STATES) -> list[Job]:
        """Lease up to ``limit`` due jobs in ``states``: calls furthest along first, then oldest first.

        Finishing what was started comes before starting new calls, so a call waiting for its
        CRM confirmation is not kept behind a queue of new arrivals."""
        now = time.time()
        placeholders = ",".join("?" * len(states))
        progress = " ".join(f"WHEN '{state}' THEN {rank}" for rank, state in enumerate(reversed(ACTIVE_STATES)))

        def tx(c: Any) -> list[Job]:
            rows = c.execute(
                f"SELECT * FROM jobs WHERE state IN ({placeholders}) AND next_attempt_at <= ? AND lease_until < ? "
                f"ORDER BY CASE state {progress} END, next_attempt_at, seq LIMIT ?{self.db.skip_locked}",
                (*states, now, now, limit)).fetchall()
            for r in rows:
                c.execute("UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE call_id = ?",
                          (owner, now + lease_seconds, r["call_id"]))
            return [Job.from_row(r) for r in rows]

        return await self.db.transaction(tx)

    async def next_due_at(self, states: tuple[str, ...] = ACTIVE_STATES) -> float | None:
        """When the next job in ``states`` can be claimed (None when there is none)."""
        placeholders = ",".join("?" * len(states))
        row = await self.db.fetchone(
            "SELECT MIN(CASE WHEN next_attempt_at > lease_until THEN next_attempt_at ELSE lease_until END) "
            f"FROM jobs WHERE state IN ({placeholders})", states)
        return row[0] if row else None

    async def renew(self, call_id: str, owner: str, lease_seconds: float) -> bool:
        def tx(c: Any) -> bool:
            cur = c.execute("UPDATE jobs SET lease_until = ? WHERE call_id = ? AND lease_owner = ?",
                            (time.time() + lease_seconds, call_id, owner))
            return cur.rowcount == 1

        return await self.db.transaction(tx)

    async def update(self, call_id: str, owner: str | None, *, state: str | None = None, release: bool = False,
                     **fields: Any) -> None:
        """Write ``fields`` (JSON-encoding dicts); entering a new ``state`` stamps its time and resets attempts."""
        now = time.time()

        def tx(c: Any) -> None:
            row = c.execute(f"SELECT state, stage_times, lease_owner FROM jobs WHERE call_id = ?{self.db.for_update}",
                            (call_id,)).fetchone()
            if row is None:
                raise KeyError(call_id)
            if owner is not None and row["lease_owner"] != owner:
                raise LeaseLost(f"job {call_id} is leased by {row['lease_owner']}, not {owner}")
            sets: dict[str, Any] = {"updated_at": now}
            if state is not None and state != row["state"]:
                sets.update(_entering(state, row["stage_times"], now))
            for key, value in fields.items():
                sets[key] = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
            if release:
                sets.update(lease_owner=None, lease_until=0)
            assignments = ", ".join(f"{k} = ?" for k in sets)
            c.execute(f"UPDATE jobs SET {assignments} WHERE call_id = ?", (*sets.values(), call_id))

        await self.db.transaction(tx)


class LeaseLost(Exception):
    """Another worker holds the job now; stop working on it."""
