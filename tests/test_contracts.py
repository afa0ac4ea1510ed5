"""The contracts: buf lint passes and the committed stubs are what the protos generate."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

from services.common.codegen import PACKAGE_DIR, REPO_ROOT, generate


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    committed_dir = REPO_ROOT / PACKAGE_DIR
    names = sorted(p.name for p in generated)
    assert names == sorted(p.name for p in committed_dir.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")), \
        "the set of stub files differs: run `python -m services.common.codegen`"
    drifted = [n for n in names if not filecmp.cmp(tmp_path / PACKAGE_DIR / n, committed_dir / n, shallow=False)]
    assert drifted == [], f"stubs out of date: {drifted}; run `python -m services.common.codegen`"


def buf_binary() -> str:
    local = REPO_ROOT / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed: `npm install` (package.json pins @bufbuild/buf)", pytrace=False)
    return found


def test_buf_lint_passes() -> None:
    result = subprocess.run([buf_binary(), "lint"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_rejects_an_uncommented_field(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    with (tmp_path / "protos" / "callcenter" / "v1" / "crm.proto").open("a") as f:
        f.write("\n// Extra is a message whose field has no comment.\nmessage Extra {\n  string note = 1;\n}\n")
    result = subprocess.run([buf_binary(), "lint"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Field \"note\" should have a non-empty comment" in result.stdout + result.stderr
