"""Helpers shared by the test modules: tiny models, tokenizers, scripted LLMs, live servers."""
