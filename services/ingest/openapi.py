"""The OpenAPI 3.1 document of the ingest HTTP API, served at ``GET /openapi.json``.

Written by hand next to the handlers in ``api.py``; ``tests/test_openapi.py``
fuzzes the running service against it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from services.ingest.store import CALL_ID_RE, MAX_OFFSET, METADATA_QUERY_RE, STATES

CALL_ID_PATTERN = f"^{CALL_ID_RE.pattern}$"
_TS = {"type": ["string", "null"], "format": "date-time"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _json(description: str, ref: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}
    if headers:
        out["headers"] = headers
    return out


_UNAUTHORIZED = _problem("API_TOKEN is set and the bearer token is missing or wrong")
_FROM_ANOTHER_SITE = _problem("Sent by a browser from a page of another site (Sec-Fetch-Site or Origin)")
_CALL_ID_PARAM = {"name": "call_id", "in": "path", "required": True, "description": "The recorder's call id",
                  "schema": {"type": "string"}}
_SIGNATURE_HEADERS = [
    {"name": "webhook-id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 256},
     "description": "Standard Webhooks message id; a replayed id is acknowledged without new work"},
    {"name": "webhook-timestamp", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Unix seconds; refused more than 5 minutes away from now"},
    {"name": "webhook-signature", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Space-separated v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>"},
]

SCHEMAS: dict[str, Any] = {
    "SetAside": {
        "type": "object",
        "description": "Why a call's record is taken out of the CRM queue.",
        "required": ["reason"],
        "examples": [{"reason": "the CRM answers 500 to this record only; ticket CRM-1234"}],
        "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 500,
                                  "pattern": r"^[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*$",
                                  "description": "Kept as the call's error, after \"set aside: \""}},
    },
    "Webhook": {
        "type": "object",
        "description": "What the recorder posts when a call ends.",
        "required": ["call_id", "recording_url"],
        "examples": [{"call_id": "call-0001", "recording_url": "http://127.0.0.1:8000/recordings/call-0001.wav"},
                     {"call_id": "call-0002", "recording_url": "http://127.0.0.1:8000/recordings/call-0002.mp3",
                      "language": "es", "agent_channel": "left",
                      "metadata": {"agent_id": "A-117", "queue": "billing", "direction": "inbound"}}],
        "properties": {
            "call_id": {"type": "string", "pattern": CALL_ID_PATTERN, "description": "Not made of dots only"},
            "recording_url": {"type": "string", "maxLength": 2048, "format": "uri",
                              "description": "http(s) URL on an allow-listed recorder host, or a file: URL under "
                                             "RECORDING_FILE_ROOTS"},
            "language": {"type": "string", "pattern": "^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$",
                         "description": "ISO 639-1 hint, or a locale (es-MX) whose language is taken; absent: "
                                        "detected"},
            "agent_channel": {"type": "string", "enum": ["left", "right"],
                              "description": "Stereo recordings: the agent's channel"},
            "metadata": {"type": "object", "maxProperties": 32,
                         "propertyNames": {"pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                         "additionalProperties": {"type": "string", "maxLength": 1024},
                         "description": "The recorder's own fields about the call (agent, queue, direction, the "
                                        "customer's number…): passed to the CRM record's metadata as sent"},
        },
    },
    "Ack": {
        "type": "object",
        "required": ["call_id", "status", "status_url", "trace_id", "duplicate"],
        "properties": {
            "call_id": {"type": "string"},
            "status": {"type": "string", "enum": list(STATES)},
            "status_url": {"type": "string"},
            "trace_id": {"type": "string", "description": "Follow the call in Jaeger"},
            "duplicate": {"type": "boolean", "description": "The call (or this webhook-id) was received before"},
        },
    },
    "Call": {
        "type": "object",
        "required": ["call_id", "status", "status_url", "recording_url", "created_at", "updated_at", "stages",
                     "attempts", "trace_id", "error", "progress"],
        "properties": {
            "call_id": {"type": "string"},
            "status": {"type": "string", "enum": list(STATES)},
            "status_url": {"type": "string"},
            "recording_url": {"type": "string", "description": "The recording's link, the values of its query "
                              "hidden (a signed link's query lets whoever reads it fetch the recording)"},
            "options": {"type": "object"},
            "created_at": _TS,
            "updated_at": _TS,
            "stages": {"type": "object", "additionalProperties": _TS,
                       "description": "When the call entered each stage"},
            "attempts": {"type": "integer", "minimum": 0},
            "trace_id": {"type": "string"},
            "error": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["stage", "message"],
                "properties": {"stage": {"type": ["string", "null"]}, "message": {"type": "string"}}}]},
            "next_attempt_at": _TS,
            "recording_kept": {"type": "boolean", "description": (
                "Failed calls: whether the downloaded recording is kept for a retry (for "
                "RECORDING_FAILED_RETENTION_HOURS); false: a retry downloads it again")},
            "progress": {"type": "object", "properties": {
                "language": {"type": ["string", "null"], "description": "Language detected so far"},
                "segments": {"type": "integer", "minimum": 0, "description": "Transcript segments so far"},
                "audio_seconds": {"type": ["number", "null"], "minimum": 0, "description": (
                    "Length of the recording, once Transcribe has read it")},
                "transcribed_seconds": {"type": ["number", "null"], "minimum": 0, "description": (
                    "How much of the recording is transcribed: to the end of the last segment so far, all of "
                    "it once the transcript is complete")},
                "transcript_complete": {"type": "boolean"},
                "in_progress": {"type": "boolean", "description": (
                    "A pipeline worker is on the call now; false while it waits its turn (every slot of "
                    "its stage taken) or its next attempt")},
            }},
            "delivery": {"type": "object"},
            "result": {"type": ["object", "null"], "description": "The CRM record, once done"},
        },
    },
    "CallList": {
        "type": "object",
        "required": ["calls", "counts"],
        "properties": {
            "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                       "detail": {"type": "string"}, "status_url": {"type": "string"}},
    },
}


_STORE_UNAVAILABLE = "the job store cannot serve requests now (a full disk, a database that is down)"
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before sending the request again",
                                "schema": {"type": "string"}}}


def _with_store_unavailable(document: dict[str, Any]) -> dict[str, Any]:
    """Every operation on calls can answer 503 when the job store cannot serve it (beside its own reasons)."""
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for operation in operations.values():
            own = operation["responses"].get("503")
            described = f"{own['description']}, or {_STORE_UNAVAILABLE}" if own else _STORE_UNAVAILABLE.capitalize()
            operation["responses"]["503"] = {**_problem(described), "headers": _RETRY_AFTER}
    return document


def openapi_document(metrics: bool = True) -> dict[str, Any]:
    """The API's OpenAPI document; ``metrics``: whether ``/metrics`` is on the API's port."""
    document = _with_store_unavailable(_document())
    if not metrics:  # served apart (INGEST_METRICS_LISTEN)
        del document["paths"]["/metrics"]
    return document


def _document() -> dict[str, Any]:
    location = {"Location": {"description": "The status URL", "schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Callmesh ingest", "version": "1.0.0",
                 "description": "The recorder's webhook and the status of every call."},
        "paths": {
            "/v1/calls": {
                "post": {
                    "operationId": "receiveCall",
                    "summary": "The recorder's call-ended webhook; answers at once, the work happens later",
                    "parameters": _SIGNATURE_HEADERS,
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Webhook"}}}},
                    "responses": {
                        "202": {**_json("Stored durably (or received before; a new recording_url for a call whose recording is "
                                       "not downloaded yet replaces the earlier link)", "Ack", location), "links": {
                            "GetCall": {"operationId": "getCall",
                                        "parameters": {"call_id": "$response.body#/call_id"}},
                            "RetryCall": {"operationId": "retryCall",
                                          "parameters": {"call_id": "$response.body#/call_id"}},
                            "EraseCall": {"operationId": "eraseCall",
                                          "parameters": {"call_id": "$response.body#/call_id"}}}},
                        "400": _problem("The body is not JSON"),
                        "401": _problem("Missing, wrong or stale webhook signature"),
                        "403": _FROM_ANOTHER_SITE,
                        "408": _problem("The body did not all arrive within INGEST_READ_TIMEOUT_SECONDS"),
                        "409": _problem("This call_id was received with another recording_url, and its recording is "
                                        "downloaded and kept (or the call is done): a new link is taken only while "
                                        "the call has no recording"),
                        "413": _problem("The body is over 64 KiB"),
                        "415": _problem("Not application/json"),
                        "422": _problem("A field is missing or invalid, or the URL is not allowed"),
                    },
                },
                "get": {
                    "operationId": "listCalls",
                    "summary": "Calls, newest first; ?status=failed lists the dead letters",
                    "security": [{"bearer": []}, {}],
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(STATES)},
                         "description": "Only calls in this state"},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                         "description": "Page size (default 100)"},
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                         "description": "Calls to skip"},
                        {"name": "metadata", "in": "query",
                         "schema": {"type": "string", "pattern": f"^{METADATA_QUERY_RE.pattern}$"},
                         "description": "KEY=VALUE: only calls whose webhook metadata had that value (a customer's "
                                        "number, for an erasure request)"},
                    ],
                    "responses": {"200": _json("A page of calls and the count per state", "CallList"),
                                  "400": _problem("A query parameter is invalid"), "401": _UNAUTHORIZED},
                },
            },
            "/v1/calls/{call_id}": {
                "get": {
                    "operationId": "getCall",
                    "summary": "Where a call is: stage times, attempts, error, CRM record when done",
                    "security": [{"bearer": []}, {}],
                    "parameters": [_CALL_ID_PARAM],
                    "responses": {"200": _json("The call", "Call"), "401": _UNAUTHORIZED,
                                  "404": _problem("No such call, or it was done longer ago than "
                                                  "CALL_RETENTION_DAYS")},
                },
                "delete": {
                    "operationId": "eraseCall",
                    "summary": "Erase a done or failed call, for a caller who asks that their data be erased: "
                               "its row here, its record in the CRM outbox and a failed call's recording "
                               "(the CRM's own copy is not touched)",
                    "security": [{"bearer": []}, {}],
                    "parameters": [_CALL_ID_PARAM],
                    "responses": {"204": {"description": "Erased"}, "401": _UNAUTHORIZED,
                                  "403": _FROM_ANOTHER_SITE, "404": _problem("No such call"),
                                  "409": _problem("The call is still in the pipeline, or a POST of its record "
                                                  "to the CRM is in flight"),
                                  "503": _problem("The crm service did not answer")},
                },
            },
            "/v1/calls/{call_id}:retry": {
                "post": {
                    "operationId": "retryCall",
                    "summary": "Replay a failed call from the stage it failed in",
                    "security": [{"bearer": []}, {}],
                    "parameters": [_CALL_ID_PARAM],
                    "responses": {"202": _json("Queued again", "Call"), "401": _UNAUTHORIZED,
                                  "403": _FROM_ANOTHER_SITE,
                                  "404": _problem("No such call or action"),
                                  "409": _problem("The call has not failed")},
                },
            },
            "/v1/calls/{call_id}:reanalyze": {
                "post": {
                    "operationId": "reanalyzeCall",
                    "summary": "Analyse a done call again (after a change of taxonomy, prompt or model) and send the "
                               "CRM the new record: revision one more than its last, under an idempotency key of "
                               "its own",
                    "security": [{"bearer": []}, {}],
                    "parameters": [_CALL_ID_PARAM],
                    "responses": {"202": _json("Back at analyzing", "Call"), "401": _UNAUTHORIZED,
                                  "403": _FROM_ANOTHER_SITE,
                                  "404": _problem("No such call or action"),
                                  "409": _problem("The call is not done, or its transcript is not kept")},
                },
            },
            "/v1/calls/{call_id}:setAside": {
                "post": {
                    "operationId": "setAsideCall",
                    "summary": "Take a call's record out of the CRM queue, for a record the CRM fails on while it "
                               "takes the others; the call fails at delivery with the reason, :retry sends it again",
                    "security": [{"bearer": []}, {}],
                    "parameters": [_CALL_ID_PARAM],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SetAside"}}}},
                    "responses": {"202": _json("Set aside; the call fails at delivery in a moment", "Call"),
                                  "400": _problem("The body is not JSON"), "401": _UNAUTHORIZED,
                                  "403": _FROM_ANOTHER_SITE, "404": _problem("No such call or action"),
                                  "409": _problem("The call is not waiting for the CRM, its record is not queued "
                                                  "yet, or a POST of it is in flight"),
                                  "415": _problem("Not application/json"), "422": _problem("No reason given"),
                                  "503": _problem("The crm service did not answer")},
                },
            },
            "/healthz": {
                "get": {"operationId": "health", "summary": "Liveness",
                        "responses": {"200": _json("Serving", "Health"),
                                      "503": _json("The job store does not answer", "Health")}},
            },
            "/metrics": {
                "get": {"operationId": "metrics", "summary": "Prometheus metrics (OpenTelemetry)",
                        "responses": {"200": {"description": "Prometheus text exposition format",
                                              "content": {"text/plain": {"schema": {"type": "string"}}}}}},
            },
            "/openapi.json": {
                "get": {"operationId": "openapi", "summary": "This document",
                        "responses": {"200": {"description": "OpenAPI 3.1",
                                              "content": {"application/json": {"schema": {"type": "object"}}}}}},
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "API_TOKEN; required only when it is set"}},
        },
    }
