"""The transcription evaluation set: scripted calls generated here, never committed as audio.

Six languages (en, es, fr, de, it, pt), each a short agent/customer dialogue spoken by
espeak-ng's voice for that language, plus the English dialogue in festival's voice.
Every dialogue is laid out on one timeline (agent on the left channel, customer on the
right, turns one after another) and written in several forms: mono and stereo, 16 kHz
and 8 kHz telephone band (300–3400 Hz), wav, mp3 and ogg. The script is the reference.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from callmesh.samples import synthesize

RATE = 16_000
GAP_SECONDS = 0.5

# (language, espeak-ng voice, dialogue as (speaker, line) turns)
DIALOGUES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "en": ("en-us", [
        ("agent", "Thank you for calling, my name is Anna. How can I help you today?"),
        ("customer", "Hello, my internet connection has been very slow since Monday."),
        ("agent", "I am sorry to hear that. Let me check your line and restart the router from here."),
        ("customer", "Thank you, it works much better now."),
    ]),
    "es": ("es", [
        ("agent", "Gracias por llamar, le atiende Marta. ¿En qué puedo ayudarle?"),
        ("customer", "Hola, me han cobrado dos veces la factura de este mes."),
        ("agent", "Lo siento mucho. Voy a revisar su cuenta y a devolverle el dinero."),
        ("customer", "Muchas gracias, es usted muy amable."),
    ]),
    "fr": ("fr", [
        ("agent", "Merci de votre appel, je suis Claire. Comment puis-je vous aider?"),
        ("customer", "Bonjour, mon colis n'est toujours pas arrivé depuis deux semaines."),
        ("agent", "Je suis désolée. Je vais contacter le transporteur et vous envoyer un nouveau colis."),
        ("customer", "Merci beaucoup, bonne journée."),
    ]),
    "de": ("de", [
        ("agent", "Vielen Dank für Ihren Anruf, mein Name ist Thomas. Wie kann ich Ihnen helfen?"),
        ("customer", "Guten Tag, ich möchte meinen Vertrag kündigen."),
        ("agent", "Das tut mir leid. Darf ich fragen, warum Sie kündigen möchten?"),
        ("customer", "Der Preis ist mir einfach zu hoch geworden."),
    ]),
    "it": ("it", [
        ("agent", "Grazie per aver chiamato, sono Giulia. Come posso aiutarla?"),
        ("customer", "Buongiorno, non riesco ad accedere al mio conto da ieri."),
        ("agent", "Mi dispiace. Le mando subito un codice per cambiare la password."),
        ("customer", "Perfetto, adesso funziona. Grazie mille."),
    ]),
    "pt": ("pt", [
        ("agent", "Obrigado por ligar, o meu nome é Pedro. Como posso ajudar?"),
        ("customer", "Bom dia, quero saber o preço do novo plano de telemóvel."),
        ("agent", "O novo plano custa vinte euros por mês, com chamadas ilimitadas."),
        ("customer", "Muito bem, quero mudar para esse plano."),
    ]),
}

# (name, channels, sample rate, container)
FORMS = (("mono-16k", 1, 16_000, "wav"), ("mono-8k", 1, 8_000, "mp3"), ("stereo-16k", 2, 16_000, "ogg"),
         ("stereo-8k", 2, 8_000, "wav"))
FESTIVAL_FORMS = (("mono-16k", 1, 16_000, "wav"), ("stereo-8k", 2, 8_000, "mp3"))
LONG_REPEATS = 3  # a long call: the dialogue three times over, about a minute
LONG_FORMS = (("long-mono-16k", 1, 16_000, "wav"), ("long-mono-8k", 1, 8_000, "mp3"))


@dataclass(frozen=True)
class EvalFile:
    path: Path
    language: str
    voice: str  # "espeak-ng:<voice>" or "festival"
    form: str  # e.g. "stereo-8k"
    container: str
    stereo: bool
    reference: str  # the script, turns in order
    duration: float
    turns: tuple[tuple[str, str], ...] = ()  # (speaker, line): who says what, for speaker-attributed WER


def _festival(text: str, out: Path) -> Path:
    exe = shutil.which("text2wave")
    if exe is None:
        raise RuntimeError("festival is not installed (Debian: apt-get install festival festvox-kallpc16k)")
    src = out.with_suffix(".txt")
    src.write_text(text)
    subprocess.run([exe, "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def _samples(path: Path) -> np.ndarray:
    from faster_whisper import decode_audio

    return decode_audio(str(path), sampling_rate=RATE)


def _timeline(turns: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Agent turns on the left channel, customer turns on the right, one after another."""
    gap = int(GAP_SECONDS * RATE)
    length = sum(a.size + gap for _, a in turns) + gap
    stereo = np.zeros((length, 2), dtype=np.float32)
    at = gap
    for speaker, audio in turns:
        stereo[at:at + audio.size, 0 if speaker == "agent" else 1] = audio
        at += audio.size + gap
    return stereo


def _write_wav(samples: np.ndarray, path: Path) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def _encode(master: Path, out: Path, channels: int, rate: int) -> None:
    filters = ["highpass=f=300", "lowpass=f=3400"] if rate == 8_000 else []
    args = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(master), "-ac", str(channels), "-ar", str(rate)]
    if filters:
        args += ["-af", ",".join(filters)]
    subprocess.run([*args, str(out)], check=True)


def generate(directory: Path) -> list[EvalFile]:
    """Write the set under ``directory`` (reused when already there) and describe each file."""
    directory.mkdir(parents=True, exist_ok=True)
    files: list[EvalFile] = []
    jobs = [(lang, f"espeak-ng:{voice}", turns, FORMS) for lang, (voice, turns) in DIALOGUES.items()]
    jobs.append(("en", "festival", DIALOGUES["en"][1], FESTIVAL_FORMS))
    for lang, voice, turns, forms in jobs:
        stem = f"{lang}-{voice.split(':')[-1]}"
        master = directory / f"{stem}-master.wav"
        if not master.exists():
            spoken = []
            for i, (speaker, line) in enumerate(turns):
                part = directory / f"{stem}-turn{i}.wav"
                if voice == "festival":
                    _festival(line, part)
                else:
                    synthesize(line, voice.split(":", 1)[1], part, speed=150)
                spoken.append((speaker, _samples(part)))
            _write_wav(_timeline(spoken), master)
        files += _forms(master, directory / stem, forms, lang, voice, tuple(turns))
    return files


def _forms(master: Path, stem: Path, forms: tuple[tuple[str, int, int, str], ...], language: str, voice: str,
           turns: tuple[tuple[str, str], ...]) -> list[EvalFile]:
    """``master`` written in each of ``forms`` (``<stem>-<form>.<container>``, kept when already there)."""
    with wave.open(str(master)) as w:
        duration = w.getnframes() / w.getframerate()
    files = []
    for form, channels, rate, container in forms:
        out = stem.with_name(f"{stem.name}-{form}.{container}")
        if not out.exists():
            _encode(master, out, channels, rate)
        files.append(EvalFile(out, language, voice, form, container, channels == 2,
                              " ".join(line for _, line in turns), duration, turns))
    return files


def generate_long(directory: Path) -> list[EvalFile]:
    """Calls longer than one Whisper window: each dialogue of :func:`generate` spoken ``LONG_REPEATS``
    times over (a second apart), as mono 16 kHz wav and 8 kHz telephone-band mp3."""
    files: list[EvalFile] = []
    for short in generate(directory):
        if short.form != "mono-16k":
            continue
        stem = short.path.name.removesuffix("-mono-16k.wav")
        master = directory / f"{stem}-long-master.wav"
        if not master.exists():
            with wave.open(str(directory / f"{stem}-master.wav")) as w:
                once = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
            pause = np.zeros((RATE, once.shape[1]), dtype=np.float32)
            _write_wav(np.concatenate([part for _ in range(LONG_REPEATS) for part in (once / 32767, pause)]), master)
        files += _forms(master, directory / stem, LONG_FORMS, short.language, short.voice,
                        short.turns * LONG_REPEATS)
    return files
