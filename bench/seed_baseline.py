"""The customer's seed design, rebuilt as a baseline: one synchronous request does everything.

``python -m bench.seed_baseline --ready FILE --crm URL`` serves ``POST /webhook`` on
127.0.0.1 with a single-threaded HTTP server (as a Flask development server handles
one request at a time per worker): download the recording, transcribe it with
faster-whisper, analyse it with the same LLM, POST the record to the CRM, and only
then answer. Same models and settings as the mesh; only the architecture differs.
Used by bench/pipeline_bench.py, never by the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from services.analyze.analyzer import Analyzer, Utterance
from services.analyze.backends import EmbeddedLlamaBackend
from services.analyze.config import AnalyzeSettings
from services.transcribe.config import EngineSettings
from services.transcribe.engine import TranscribeOptions, WhisperEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--crm", required=True)
    args = parser.parse_args()
    engine = WhisperEngine(EngineSettings.from_env())
    settings = AnalyzeSettings.from_env()
    loop = asyncio.new_event_loop()
    backend = loop.run_until_complete(_backend(settings))
    analyzer = Analyzer(backend, settings.topics, settings.emotions, settings.llm.context_tokens,
                        settings.llm.max_answer_tokens)

    class Webhook(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with tempfile.NamedTemporaryFile(suffix=".audio") as f:
                f.write(urllib.request.urlopen(body["recording_url"], timeout=60).read())
                f.flush()
                segments, info = engine.model.transcribe(f.name, **engine._transcribe_kwargs(TranscribeOptions(),
                                                                                               None))
                texts = [s.text.strip() for s in segments]
            result = loop.run_until_complete(analyzer.analyze([Utterance("unknown", 0.0, " ".join(texts))],
                                                              info.language))
            record = {"call_id": body["call_id"], "language": info.language, "transcript": " ".join(texts),
                      "translated_transcript": result.translated_transcript, "summary": list(result.summary),
                      "topic": result.topic, "sentiment": result.sentiment, "emotion": result.emotion}
            request = urllib.request.Request(args.crm, data=json.dumps(record).encode(), method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "Idempotency-Key": body["call_id"]})
            urllib.request.urlopen(request, timeout=30).read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "done"}')

    server = HTTPServer(("127.0.0.1", 0), Webhook)
    args.ready.write_text(json.dumps({"address": f"127.0.0.1:{server.server_address[1]}"}))
    server.serve_forever()


async def _backend(settings: AnalyzeSettings) -> EmbeddedLlamaBackend:
    return EmbeddedLlamaBackend(settings.llm)


if __name__ == "__main__":
    main()
