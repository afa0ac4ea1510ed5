"""Small conversions between protobuf well-known types and Python values."""

from __future__ import annotations

from datetime import datetime, timezone

from google.protobuf import duration_pb2, timestamp_pb2


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def timestamp(when: datetime | float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if when is None:
        ts.GetCurrentTime()
    elif isinstance(when, datetime):
        ts.FromDatetime(when.astimezone(timezone.utc))
    else:
        ts.FromNanoseconds(int(when * 1e9))
    return ts
