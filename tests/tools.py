"""Command-line tools the tests run, from the system (scripts/setup.sh --dev installs them)."""

from __future__ import annotations

import shutil

import pytest


def system_tool(name: str, package: str) -> str:
    """The path of ``name``, or the test fails saying which Debian package brings it."""
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (Debian: apt-get install {package}; scripts/setup.sh --dev does)",
                    pytrace=False)
    return exe
