"""Analyze service: summary, topic, sentiment, emotion and translation from a local LLM."""
