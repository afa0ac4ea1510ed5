"""Settings of the analyze service, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.config import GrpcServerSettings, data_dir, env_bool, env_float, env_int, env_list, env_str

DEFAULT_TOPICS = ("Billing", "Technical Support", "Cancellation", "Sales", "Delivery", "Account Access",
                  "Complaint", "Other")
DEFAULT_EMOTIONS = ("calm", "satisfied", "confused", "anxious", "frustrated", "angry")


@dataclass(frozen=True)
class LlmSettings:
    """Which LLM answers, and how."""

    ollama_host: str  # empty: run the model embedded with llama.cpp
    model: str  # Ollama model name, or a GGUF path when embedded
    context_tokens: int
    max_answer_tokens: int
    threads: int
    timeout_seconds: float
    keep_alive: str

    @property
    def backend(self) -> str:
        return "ollama" if self.ollama_host else "embedded"

    @classmethod
    def from_env(cls) -> "LlmSettings":
        host = env_str("OLLAMA_HOST", "")
        default_model = "qwen2.5:7b-instruct" if host else str(
            data_dir() / "models" / "qwen2.5-coder-1.5b-instruct" / "model.gguf")
        return cls(
            ollama_host=host,
            model=env_str("LLM_MODEL", default_model),
            context_tokens=env_int("LLM_CONTEXT_TOKENS", 4096, minimum=512),
            max_answer_tokens=env_int("LLM_MAX_ANSWER_TOKENS", 1024, minimum=64),
            threads=env_int("LLM_THREADS", os.cpu_count() or 1, minimum=1),
            timeout_seconds=env_float("LLM_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            keep_alive=env_str("OLLAMA_KEEP_ALIVE", "30m"),
        )


@dataclass(frozen=True)
class AnalyzeSettings:
    server: GrpcServerSettings
    llm: LlmSettings
    topics: tuple[str, ...]
    emotions: tuple[str, ...]
    max_concurrent: int
    max_queued: int
    redact_pii: bool = False  # mask personal data before the LLM sees the transcript

    @classmethod
    def from_env(cls) -> "AnalyzeSettings":
        return cls(
            server=GrpcServerSettings.from_env("ANALYZE", 50052, 9102),
            llm=LlmSettings.from_env(),
            topics=env_list("ANALYZE_TOPICS", DEFAULT_TOPICS),
            emotions=env_list("ANALYZE_EMOTIONS", DEFAULT_EMOTIONS),
            max_concurrent=env_int("ANALYZE_MAX_CONCURRENT", 1, minimum=1),
            max_queued=env_int("ANALYZE_MAX_QUEUED", 16, minimum=0),
            redact_pii=env_bool("LLM_PII_REDACTION", False),
        )
