"""The benchmark results file: each figure keeps the date and the machine of the run that measured it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common
from bench.common import ratio_result, write_results


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def on(monkeypatch: pytest.MonkeyPatch, cpu: str) -> None:
    monkeypatch.setattr(common, "machine", lambda: {"cores": 2, "cpu": cpu, "gpu": None})


def test_a_figure_not_rerun_keeps_the_machine_it_ran_on(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on(monkeypatch, "first cpu")
    write_results([ratio_result("a", [1.0, 1.1], ">= 1", lambda v: v >= 1)], started=0.0)
    on(monkeypatch, "second cpu")
    write_results([ratio_result("b", [0.5, 0.6], ">= 1", lambda v: v >= 1)], started=86400.0)

    saved = json.loads((results_dir / "latest.json").read_text())
    by_name = {r["name"]: r for r in saved["results"]}
    assert by_name["a"]["machine"]["cpu"] == "first cpu"
    assert by_name["a"]["date"] == "1970-01-01T00:00:00Z"
    assert by_name["b"]["machine"]["cpu"] == "second cpu"
    assert saved["machine"]["cpu"] == "second cpu"


def test_a_figure_rerun_replaces_its_last_one(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on(monkeypatch, "cpu")
    write_results([ratio_result("a", [1.0], ">= 1", lambda v: v >= 1)], started=0.0)
    write_results([ratio_result("a", [2.0], ">= 1", lambda v: v >= 1)], started=60.0)

    saved = json.loads((results_dir / "latest.json").read_text())
    assert [(r["name"], r["ratio"]) for r in saved["results"]] == [("a", 2.0)]
