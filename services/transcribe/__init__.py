"""Transcribe service: streams Whisper segments over gRPC as faster-whisper decodes them."""
