"""agentrt: an agentic function-calling runtime on a local LLM engine."""
__version__ = "0.1.0"
