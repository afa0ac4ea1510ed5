"""The recordings the tests decode, generated with espeak-ng and ffmpeg; nothing is committed.

    python -m tests.audio DIR    # make them once, for CALLMESH_TEST_AUDIO=DIR on a machine without those two
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from callmesh.samples import SAMPLES, synthesize

LONG_TEXT = (
    "Good morning, thank you for calling. I would like to ask about my last invoice. "
    "The amount is higher than usual and I do not understand the extra charges. "
    "Could you explain what the service fee is for and whether it will appear every month. "
    "I have been a customer for many years and I always paid on time. "
)

# A customer paying by phone: a card number, its security code and a phone number, said digit by digit.
CARD_PAYMENT = ("Hello, I would like to pay my bill today. My card number is 4111 1111 1111 1111. The expiry date is "
                "March 2029, and the security code is 7 4 2. Please call me back on 0 7 7 0 0 9 0 0 1 2 3.")
# A Spanish caller gives a phone number in words, which Whisper's own translation writes in digits.
PHONE_NUMBER_ES = "Buenos días. Mi número de teléfono es el seis cinco cinco, uno dos tres, cuatro cinco seis."

# A mono call where the caller reads a card out to the agent a group at a time, the agent replying in between;
# each line is (voice, text): the agent a female voice, the caller a British one.
CARD_BETWEEN_REPLIES = (("en-us+f3", "Can I have the long number on the card, please?"), ("en-gb", "Sure. It is 4 5 3 9."),
                        ("en-us+f3", "Okay."), ("en-gb", "1 4 8 8."), ("en-us+f3", "Mm-hmm, go on."),
                        ("en-gb", "0 3 4 3."), ("en-us+f3", "Okay, and the last four?"), ("en-gb", "6 4 6 7."),
                        ("en-us+f3", "Thank you."))
CARD_GROUPS = ("4539", "1488", "0343", "6467")

TELEPHONY_RECORDINGS = {  # file name: FFmpeg encoder
    "es-billing-angry-mulaw.wav": "pcm_mulaw", "es-billing-angry-alaw.wav": "pcm_alaw",
    "es-billing-angry-gsm.wav": "libgsm_ms", "es-billing-angry-g726.wav": "g726",
    "es-billing-angry-opus.ogg": "libopus",
}


def _flac(wav: Path) -> bytes:
    """``wav`` encoded as FLAC, with the encoder's seek table and padding ahead of the audio."""
    out = wav.with_suffix(".flac")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), str(out)], check=True)
    return out.read_bytes()


def make_test_audio(d: Path) -> Path:
    """Write every test recording into ``d`` and return it."""
    d.mkdir(parents=True, exist_ok=True)
    for key, sample in SAMPLES.items():
        synthesize(sample.text, sample.voice, d / f"{key}.wav")
    synthesize(LONG_TEXT * 3, "en-us", d / "long-en.wav", speed=160)
    synthesize(CARD_PAYMENT, "en-us", d / "en-card-payment.wav")
    synthesize(PHONE_NUMBER_ES, "es", d / "es-phone-number.wav")
    lines = [synthesize(text, voice, d / f"card-line-{i}.wav") for i, (voice, text) in enumerate(CARD_BETWEEN_REPLIES)]
    inputs = [arg for line in lines for arg in ("-i", str(line))]
    padded = "".join(f"[{i}:a]apad=pad_dur=0.9[p{i}];" for i in range(len(lines)))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *inputs, "-filter_complex",
                    padded + "".join(f"[p{i}]" for i in range(len(lines))) + f"concat=n={len(lines)}:v=0:a=1[a]",
                    "-map", "[a]", "-ar", "16000", str(d / "en-card-between-replies.wav")], check=True)
    # The Spanish call as 8 kHz telephone-band mp3.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "es-billing-angry.wav"), "-ar", "8000",
                    "-ac", "1", str(d / "es-billing-angry-8k.mp3")], check=True)
    # The Spanish call in the codecs telephone systems record in: G.711 (µ-law, A-law), GSM 6.10 and
    # G.726 in WAV at 8 kHz, and Opus in Ogg (WebRTC softphones).
    for name, codec in TELEPHONY_RECORDINGS.items():
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "es-billing-angry.wav"), "-ar",
                        "48000" if codec == "libopus" else "8000", "-ac", "1", "-c:a", codec, str(d / name)], check=True)
    # Stereo: the agent (left) speaks first, the customer (right) answers after.
    synthesize("Thank you for calling, how can I help you today?", "en-us", d / "agent.wav")
    synthesize("My parcel never arrived and I want a refund.", "en-us", d / "customer.wav")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "agent.wav"), "-i", str(d / "customer.wav"),
                    "-filter_complex", "[1:a]adelay=5000[c];[0:a]apad[l];[l][c]join=inputs=2:channel_layout=stereo:map=0.0-FL|1.0-FR[a]",
                    "-map", "[a]", "-shortest", str(d / "stereo-agent-left.wav")], check=True)
    # A call that switches language: the English call, a second of silence, then the Spanish one.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(d / "en-internet-angry.wav"), "-f", "lavfi",
                    "-i", "anullsrc=r=22050:cl=mono", "-i", str(d / "es-billing-angry.wav"), "-filter_complex",
                    "[1:a]atrim=duration=1[s];[0:a][s][2:a]concat=n=3:v=0:a=1[a]", "-map", "[a]", "-ar", "16000",
                    str(d / "switch-en-es.wav")], check=True)
    # Edge cases only the transcriber can judge: 30 s of silence, pink noise, an MP3 cut at 40 %.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "30",
                    str(d / "silence-30s.wav")], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "anoisesrc=d=15:c=pink:a=0.3:r=16000",
                    "-ac", "1", str(d / "noise-15s.wav")], check=True)
    mp3 = (d / "es-billing-angry-8k.mp3").read_bytes()
    (d / "truncated.mp3").write_bytes(mp3[: len(mp3) * 2 // 5])
    (d / "not-audio.txt").write_text("<html><body>This is not a recording.</body></html>\n" * 20)
    # Looks like WAV from its first bytes, but the rest is garbage.
    (d / "broken.wav").write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt " + os.urandom(4000))
    # An MP4 as recorders write them, but with a picture and no sound: the screen recording sent for the call.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=5", "-t", "2",
                    "-c:v", "mpeg4", str(d / "video-only.mp4")], check=True)
    # A FLAC file cut off inside its header, before the first frame of audio.
    (d / "cut-off.flac").write_bytes(_flac(d / "es-billing-angry.wav")[:2000])
    return d


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(make_test_audio(Path(sys.argv[1])))
