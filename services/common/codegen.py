"""Generate the Python stubs for the contracts in ``protos/``.

Run ``python -m services.common.codegen`` after changing a ``.proto`` file; the
stubs land in ``callcenter/v1/`` at the repository root and are committed.
``tests/test_contracts.py`` regenerates them into a temporary directory and
fails when they differ from what is committed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_DIR = Path("callcenter") / "v1"

log = logging.getLogger(__name__)


def proto_files() -> list[Path]:
    """Every contract file, relative to the proto root, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Generate ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in proto_files()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    package = out_dir / PACKAGE_DIR
    for init in (out_dir / "callcenter" / "__init__.py", package / "__init__.py"):
        init.write_text('"""Generated protobuf and gRPC stubs for callcenter.v1."""\n')
    return sorted(p for p in package.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repository root)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(ns.out):
        log.info("generated %s", path.relative_to(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
