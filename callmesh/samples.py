"""Sample calls generated with espeak-ng, so no audio is committed."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleCall:
    key: str
    language: str
    voice: str
    text: str
    keywords: tuple[str, ...]  # words the transcript must hold
    sentiment: str


SAMPLES = {
    "es-billing-angry": SampleCall(
        "es-billing-angry", "es", "es",
        "Hola, buenos días. Llamo porque me cobraron dos veces la factura de este mes. "
        "Estoy muy enfadado, es la tercera vez que pasa. Quiero que me devuelvan el dinero hoy mismo.",
        ("factura", "dinero"), "negative",
    ),
    "en-internet-angry": SampleCall(
        "en-internet-angry", "en", "en-us",
        "This is the third time I am calling about my internet connection. It has been down for a week. "
        "I am furious and I want to cancel my contract today.",
        ("internet", "contract"), "negative",
    ),
}


class SampleError(RuntimeError):
    pass


def synthesize(text: str, voice: str, out: Path, *, speed: int = 140) -> Path:
    """Speak ``text`` with espeak-ng into a WAV file."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SampleError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(out), text], check=True, capture_output=True)
    return out


def make_sample(key: str, directory: Path) -> tuple[SampleCall, Path]:
    sample = SAMPLES[key]
    return sample, synthesize(sample.text, sample.voice, directory / f"{key}.wav")
