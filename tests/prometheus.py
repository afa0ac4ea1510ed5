"""Reading a Prometheus scrape in the tests."""

from __future__ import annotations

import re


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        body, value = line.rsplit(" ", 1)
        have = dict(re.findall(r'(\w+)="([^"]*)"', body))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(value), True
    assert found, f"no {name} {labels} in the scrape"
    return total
