"""A faster-whisper model whose encoder reads only as much of a window as it holds, and once.

Whisper's encoder takes 30-s windows; faster-whisper pads a shorter one (a short call, the
last window of every call, a short first piece) with empty frames up to 30 s, and the
encoder and every decoding step's cross-attention then work on those too. With
``fit_context`` this model hands the encoder the window's content and two seconds of
its padding, no more (as whisper.cpp's ``audio_ctx`` does). On two CPU cores the
evaluation set then decodes in less time, with no more errors (``bench/quality.py``).

faster-whisper also runs the encoder once to detect the language and again on the same
window to decode it; this model hands the second caller the output of the first. Only
an identical input is answered from memory, so the results are those of the encoder.
It keeps three windows: a call whose first piece leaves the language unsure has the 10 s
of speech after the piece, and then perhaps its first window of speech, encoded between the
piece's detection and its decode, and the piece is then still remembered.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from faster_whisper import WhisperModel

FIT_MARGIN_FRAMES = 200  # padding kept after a window's content (2 s): Whisper hears where speech ends
FIT_STEP_FRAMES = 100  # the kept length is rounded up to whole seconds
REMEMBERED_WINDOWS = 3  # per decoding thread: a first piece and the (up to two) windows that decided its language


@dataclass
class EncoderCounts:
    """How many windows went through the encoder, and how many were answered from memory."""

    encoded: int = 0
    reused: int = 0


def fitted_frames(features: np.ndarray) -> int:
    """How many frames of ``features`` (mel × frames, or a batch of them) to encode: the content
    of the longest window, up to its last frame that is not padding, plus ``FIT_MARGIN_FRAMES``."""
    frames = features.shape[-1]
    flat = features.reshape(-1, frames)
    used = np.flatnonzero(np.any(flat != 0, axis=0))
    content = int(used[-1]) + 1 if used.size else 0
    keep = -(-(content + FIT_MARGIN_FRAMES) // FIT_STEP_FRAMES) * FIT_STEP_FRAMES
    return min(frames, keep)


class SharedEncoderWhisperModel(WhisperModel):
    """``WhisperModel`` whose ``encode`` fits the window (``fit_context``) and remembers the last
    windows it encoded one at a time (not batches), per decoding thread.

    Each thread keeps its last ``REMEMBERED_WINDOWS`` windows (their features and encoder
    outputs): a decode runs in one thread, so concurrent decodes never see each other's
    windows. ``forget`` drops the current thread's windows when its decode ends."""

    def __init__(self, *args, fit_context: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fit_context = fit_context
        self._last = threading.local()
        self._counts_lock = threading.Lock()
        self.counts = EncoderCounts()

    def encode(self, features: np.ndarray):  # -> ctranslate2.StorageView
        single = features.ndim == 2 or features.shape[0] == 1  # batched decoding never repeats a batch
        remembered: list = getattr(self._last, "windows", None) or []
        if single:
            for seen, output in remembered:
                if seen.shape == features.shape and np.array_equal(seen, features):
                    with self._counts_lock:
                        self.counts.reused += 1
                    return output
        given = features
        if self.fit_context:
            keep = fitted_frames(features)
            if keep < features.shape[-1]:
                features = np.ascontiguousarray(features[..., :keep])
        output = super().encode(features)
        with self._counts_lock:
            self.counts.encoded += 1
        if single:
            self._last.windows = [(np.array(given, copy=True), output), *remembered][:REMEMBERED_WINDOWS]
        return output

    def forget(self) -> None:
        """Drop the windows this thread remembers (its decode is over)."""
        self._last.windows = None
