"""LLM backends behind one interface: Ollama over HTTP, or llama.cpp embedded.

Both take chat messages plus a JSON schema the answer must follow, run at
temperature 0 with an explicit context size, and return the raw answer text;
validating it is the analyzer's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.analyze.config import LlmSettings

log = logging.getLogger(__name__)
LLAMA_VERBOSITY = 3  # llama.cpp's default threshold: its information, warnings and errors


class BackendUnavailable(Exception):
    """The LLM could not be reached or timed out; worth retrying later."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class LlmBackend(Protocol):
    name: str

    async def complete_json(self, messages: list[dict[str, str]], schema: dict, max_tokens: int) -> Completion:
        """Answer ``messages`` with JSON that follows ``schema``."""

    async def close(self) -> None:
        """Release the model."""


class OllamaBackend:
    """A real Ollama server through the ``ollama`` Python client."""

    def __init__(self, settings: LlmSettings) -> None:
        import ollama

        self.settings = settings
        self.name = settings.model
        self._client = ollama.AsyncClient(host=settings.ollama_host, timeout=settings.timeout_seconds)

    async def complete_json(self, messages, schema, max_tokens) -> Completion:
        import httpx
        import ollama

        started = time.perf_counter()
        try:
            response = await self._client.chat(
                model=self.settings.model,
                messages=messages,
                format=schema,
                options={"temperature": 0, "num_ctx": self.settings.context_tokens, "num_predict": max_tokens},
                keep_alive=self.settings.keep_alive,
            )
        except (httpx.TransportError, ConnectionError, asyncio.TimeoutError) as exc:
            raise BackendUnavailable(f"Ollama at {self.settings.ollama_host} is unreachable: {exc}") from exc
        except ollama.ResponseError as exc:
            if exc.status_code >= 500 or exc.status_code == 429:
                raise BackendUnavailable(f"Ollama answered {exc.status_code}: {exc.error}") from exc
            raise
        return Completion(
            text=response.message.content or "",
            prompt_tokens=response.prompt_eval_count or 0,
            completion_tokens=response.eval_count or 0,
            seconds=time.perf_counter() - started,
        )

    async def close(self) -> None:
        return None


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


class EmbeddedLlamaBackend:
    """llama.cpp in process (PyPI ``xllamacpp``), loaded once at start."""

    def __init__(self, settings: LlmSettings) -> None:
        # llama.cpp's worker threads spin while idle unless told otherwise; on a
        # shared machine that made a request several times slower.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import xllamacpp

        path = Path(settings.model)
        if not path.is_file():
            raise FileNotFoundError(
                f"no GGUF model at {path}: run `python -m callmesh.models` or set LLM_MODEL to a GGUF file "
                "(or OLLAMA_HOST to use an Ollama server)"
            )
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF model (it does not start with 'GGUF'): set LLM_MODEL to the "
                                 "model's .gguf file, or install the model again with `python -m callmesh.models`")
        self.settings = settings
        self.name = path.parent.name if path.name == "model.gguf" else path.stem
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = settings.context_tokens
        params.n_parallel = 1
        params.n_predict = settings.max_answer_tokens
        params.cpuparams.n_threads = settings.threads
        params.cpuparams_batch.n_threads = settings.threads
        params.warmup = False
        # llama.cpp's own log (several lines per request, to stderr, with neither trace nor call id) only at
        # LOG_LEVEL=DEBUG: at INFO the service logs each analysis itself, and llama.cpp's errors come back in
        # its answers.
        params.verbosity = LLAMA_VERBOSITY if log.isEnabledFor(logging.DEBUG) else 0
        started = time.perf_counter()
        try:
            self._server = xllamacpp.Server(params)
        except RuntimeError as exc:  # llama.cpp's own word is "please check the input params"
            if params.verbosity == 0:  # once more with its log on, so that its reason reaches the service's log
                params.verbosity = LLAMA_VERBOSITY
                with contextlib.suppress(RuntimeError):
                    xllamacpp.Server(params)
            raise RuntimeError(f"llama.cpp could not load {path} ({exc}): the file may be cut short or damaged "
                               "(install the model again with `python -m callmesh.models`), or need more memory "
                               f"than there is for LLM_CONTEXT_TOKENS={settings.context_tokens}") from exc
        self._lock = asyncio.Lock()
        log.info("loaded %s embedded (llama.cpp, n_ctx=%d, threads=%d) in %.1f s", self.name,
                 settings.context_tokens, settings.threads, time.perf_counter() - started)

    async def complete_json(self, messages, schema, max_tokens) -> Completion:
        request = {
            "messages": messages,
            "temperature": 0,
            "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        }
        started = time.perf_counter()
        async with self._lock:  # one sequence at a time: n_parallel is 1
            try:
                answer = await asyncio.wait_for(asyncio.to_thread(self._server.handle_chat_completions, request),
                                                timeout=self.settings.timeout_seconds)
            except asyncio.TimeoutError as exc:
                raise BackendUnavailable(f"the embedded LLM took over {self.settings.timeout_seconds:.0f} s") from exc
        if not isinstance(answer, dict) or "choices" not in answer:
            raise BackendUnavailable(f"the embedded LLM failed: {json.dumps(answer)[:500]}")
        usage = answer.get("usage", {})
        return Completion(
            text=answer["choices"][0]["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=time.perf_counter() - started,
        )

    async def close(self) -> None:
        self._server = None


def create_backend(settings: LlmSettings) -> LlmBackend:
    if settings.backend == "ollama":
        log.info("LLM backend: Ollama at %s, model %s", settings.ollama_host, settings.model)
        return OllamaBackend(settings)
    log.info("LLM backend: embedded llama.cpp, model %s", settings.model)
    return EmbeddedLlamaBackend(settings)
