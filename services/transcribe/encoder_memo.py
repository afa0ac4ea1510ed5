"""A faster-whisper model that encodes a window once when it is asked twice in a row.

Whisper's encoder costs the same for every 30-s window, whatever it holds (about a
second for the base model on two CPU cores). faster-whisper runs it once to detect the
language and again on the same window to decode it; this model hands the second caller
the output of the first. Only an identical input is answered from memory, so the
results are those of faster-whisper itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from faster_whisper import WhisperModel


@dataclass
class EncoderCounts:
    """How many windows went through the encoder, and how many were answered from memory."""

    encoded: int = 0
    reused: int = 0


class SharedEncoderWhisperModel(WhisperModel):
    """``WhisperModel`` whose ``encode`` remembers its last single window, per decoding thread.

    Each thread keeps one window (its features and the encoder output): a decode runs in one
    thread, so concurrent decodes never see each other's windows. ``forget`` drops the
    current thread's window when its decode ends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last = threading.local()
        self._counts_lock = threading.Lock()
        self.counts = EncoderCounts()

    def encode(self, features: np.ndarray):  # -> ctranslate2.StorageView
        single = features.ndim == 2 or features.shape[0] == 1  # batched decoding never repeats a batch
        if single:
            last = getattr(self._last, "window", None)
            if last is not None and last[0].shape == features.shape and np.array_equal(last[0], features):
                with self._counts_lock:
                    self.counts.reused += 1
                return last[1]
        output = super().encode(features)
        with self._counts_lock:
            self.counts.encoded += 1
        if single:
            self._last.window = (np.array(features, copy=True), output)
        return output

    def forget(self) -> None:
        """Drop the window this thread remembers (its decode is over)."""
        self._last.window = None
