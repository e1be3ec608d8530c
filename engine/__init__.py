"""agentrt.engine: a compact local LLM engine (paged KV cache, prefix caching,
continuous batching, grammar-constrained decoding). Knows nothing of agents or tools."""
